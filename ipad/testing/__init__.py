"""Testing IPA modules: in-process with ``ModuleHarness``, or under a real daemon.

``ModuleHarness`` runs a module in-process as the worker host does
(docs/modules.md, "Testing a module"); ``ipad.testing.daemon.run_daemon`` runs
a private daemon for a ``with`` block; the pytest plugin
``ipad.testing.pytest_plugin``, installed with ipad, gives the fixtures
``ipad_daemon``, ``ipad_module`` and ``ipad_project`` (docs/modules.md,
"Testing under a real daemon").

Names are imported on first use (PEP 562): pytest loads the plugin, and so
this package, in every session of an environment where ipad is installed,
and should not pay for the client, the configuration code and trio there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # "X as X": the names are exported for mypy's strict no-implicit-reexport.
    from ipad.testing.daemon import Daemon as Daemon
    from ipad.testing.daemon import DaemonError as DaemonError
    from ipad.testing.daemon import DaemonStartError as DaemonStartError
    from ipad.testing.daemon import DaemonStopError as DaemonStopError
    from ipad.testing.daemon import run_daemon as run_daemon
    from ipad.testing.harness import ModuleHarness as ModuleHarness
    from ipad.testing.harness import ModuleInstance as ModuleInstance

#: Public name -> the module (under ipad.testing.) that defines it.
_EXPORTS: dict[str, str] = {
    "Daemon": "daemon",
    "DaemonError": "daemon",
    "DaemonStartError": "daemon",
    "DaemonStopError": "daemon",
    "run_daemon": "daemon",
    "ModuleHarness": "harness",
    "ModuleInstance": "harness",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ipad.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ipad.testing.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
