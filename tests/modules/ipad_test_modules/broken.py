"""A module whose import fails, as a module with a missing dependency would."""

raise ImportError("ipad_test_modules.broken needs a library that is not installed")
