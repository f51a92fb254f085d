"""The long-running part of the lab: the queue's tables (store), the lanes and leases
(scheduler), the operations the CLI, the GitHub bridge and the MCP server share (queue), and
the `make demo` walk-through (demo)."""
