"""Testing IPA modules: a real daemon for tests (and its pytest plugin).

``ipad.testing.daemon.run_daemon`` runs a private daemon for a ``with`` block;
the pytest plugin ``ipad.testing.pytest_plugin``, installed with ipad, gives
the fixtures ``ipad_daemon``, ``ipad_module`` and ``ipad_project``
(docs/modules.md, "Testing under a real daemon").
"""

from __future__ import annotations

from ipad.testing.daemon import (
    Daemon,
    DaemonError,
    DaemonStartError,
    DaemonStopError,
    run_daemon,
)

__all__ = ["Daemon", "DaemonError", "DaemonStartError", "DaemonStopError", "run_daemon"]
