"""Testing IPA modules: ``ModuleHarness`` runs one in-process as the worker host does.

Installed with ipad, for module authors' tests (docs/modules.md, "Testing a module").
"""

from __future__ import annotations

from ipad.testing.harness import ModuleHarness, ModuleInstance

__all__ = ["ModuleHarness", "ModuleInstance"]
