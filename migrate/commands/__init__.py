"""What the `migrate` command and the control socket run: the subcommands' handlers (`snapshotting`:
snapshot, restore, inspect, verify; `sending`: send, status, cancel, start-postcopy, resolve, plot;
`receiving`: recv; `demo`), what they share (`common`), the control-socket commands (`control`),
the exit statuses (`exits`), the rounds drawn (`plot`)."""
