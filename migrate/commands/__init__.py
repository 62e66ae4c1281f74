"""What the `migrate` command and the control socket run: the control-socket commands
(`control`), the exit statuses (`exits`), the rounds drawn (`plot`)."""
