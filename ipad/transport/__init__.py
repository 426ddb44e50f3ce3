"""Trio I/O on SEQPACKET sockets, shared by the daemon and the trio client."""
