"""Running one job: `workers.run` is the job's own process (GPU lock, heartbeat, the kind's
`run`, result into the store); `workers.supervise` starts it in its own process group from the
daemon and enforces timeout and cancel (SIGTERM, grace, SIGKILL of the group); a training lane's
standbys are forked from `workers.fork_server`, which preloaded torch once per commit
(`workers.forked` is the daemon's side of it)."""
