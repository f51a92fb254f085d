"""The GitHub bridge: issues labelled `gpu`/`cpu` become jobs, results go back as comments.
`github` syncs (the API client, issue specs, the sync loop and its lease), `outbox` holds every
write as a row until it is sent exactly once, `render` turns jobs into comment text. It submits
through the service layer (daemon/service.py) and reads the store; nothing below imports it."""
