"""IPA modules that misbehave on purpose, for the daemon's integration tests."""
