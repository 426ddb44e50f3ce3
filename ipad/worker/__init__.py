"""Runs inside a worker or the fork server: no trio, no threads, no pathlib, fast start."""
