"""The wire protocol, sans I/O: messages, fd passing, errors. Every process; no trio."""
