"""Tests for ipad: unit tests with real files, and integration tests with real processes."""
