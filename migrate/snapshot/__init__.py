"""Snapshots: files (`files`), taking, restoring and inspecting them (`snapshots`), and the
guest memory's verification (`verify`)."""
