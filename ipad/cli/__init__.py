"""The command lines: ``ipad`` (the daemon and --check-config) and ``ipadctl``."""
