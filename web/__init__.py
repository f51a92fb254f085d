"""The read-only web dashboard (`lab serve`): app.py (routes, the guard, the event stream),
data.py (what each page reads, through the same service and records functions as the CLI),
templates/ (Jinja2, autoescaped) and static/ (app.js, app.css and uPlot, vendored: no CDN)."""
