"""The configuration and what it means on this machine: loading, checks, plans. No trio."""
