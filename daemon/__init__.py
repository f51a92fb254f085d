"""The queue core's long-running part: the lanes, leases and dispatch (scheduler), the service
layer every adapter calls — the CLI, the GitHub bridge and the MCP server — (service), the MCP
server itself (mcp_server), the systemd unit (systemd) and the `make demo` walk-through (demo).
The queue's tables are the top-level `store` module, a leaf that the job process uses too."""
