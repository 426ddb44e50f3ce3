"""Testing IPA modules: in-process with ``ModuleHarness``, or under a real daemon.

Installed with ipad, for module authors' tests (docs/modules.md, "Testing a
module" and "Testing under a real daemon"). ``ModuleHarness`` runs a module
in-process as the worker host does; ``ipad.testing.daemon.run_daemon`` runs a
private daemon for a ``with`` block, and the pytest plugin
``ipad.testing.pytest_plugin``, installed with ipad, gives the fixtures
``ipad_daemon``, ``ipad_module`` and ``ipad_project``.
"""

from ipad.testing.daemon import (
    Daemon,
    DaemonError,
    DaemonStartError,
    DaemonStopError,
    run_daemon,
)
from ipad.testing.harness import ModuleHarness, ModuleInstance

__all__ = [
    "Daemon",
    "DaemonError",
    "DaemonStartError",
    "DaemonStopError",
    "ModuleHarness",
    "ModuleInstance",
    "run_daemon",
]
