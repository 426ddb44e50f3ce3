"""The ``isolated`` proxy kind: each module in a plain worker process of its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ipad.config.proxy_kinds import ProxyKind, register_proxy

#: Enough of a file to see a "#!" line; longer lines are not Python shebangs we start.
_SHEBANG_PROBE = 256


@register_proxy("isolated")
class IsolatedProcess(ProxyKind):
    """One worker process per module, with no sandbox beyond the process boundary."""

    def worker_argv(self, executable: Path) -> list[str]:
        """Start Python workers with this interpreter directly.

        Going through the script's ``#!/usr/bin/env python3`` costs a second exec
        and may pick another interpreter; ``-I`` keeps the user's site-packages
        and PYTHON* variables from leaking into the worker.
        """
        if is_python_script(executable):
            return [sys.executable, "-I", str(executable)]
        return [str(executable)]

    def problems(self, executable: Path) -> list[str]:
        """A Python worker needs this interpreter to be executable by the daemon's user."""
        if is_python_script(executable) and not os.access(sys.executable, os.X_OK):
            interpreter = sys.executable
            return [f"the Python interpreter {interpreter} is not executable by this user"]
        return []


def is_python_script(executable: Path) -> bool:
    """Whether a file starts with a shebang naming a Python interpreter."""
    try:
        with executable.open("rb") as file:
            head = file.read(_SHEBANG_PROBE)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0]
    return first.startswith(b"#!") and b"python" in first
