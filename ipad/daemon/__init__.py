"""Runs in the daemon (trio): supervision, launching, the client server, systemd and journald."""
