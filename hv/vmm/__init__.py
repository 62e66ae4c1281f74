"""The VMM: a running machine (vCPU threads, buses, lifecycle), the builder, the control socket
and the `hv` command."""
