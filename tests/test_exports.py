"""The public front: every re-exported name imports, and importing ipad stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ipad


@pytest.mark.parametrize("name", ipad.__all__)
def test_public_name_resolves(name: str) -> None:
    """Each name in ipad.__all__ is importable from ipad."""
    assert getattr(ipad, name) is not None


def test_unknown_name_raises_attribute_error() -> None:
    """A typo in a public name is an AttributeError, as for any module."""
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ipad.nope


def imported_of(modules: str, heavy: tuple[str, ...], *flags: str) -> str:
    """Which of ``heavy`` a fresh interpreter has loaded after importing ``modules``."""
    code = f"import sys, {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=30,
        check=True,
    )  # fmt: skip
    return result.stdout.strip()


@pytest.mark.timeout(60)
def test_import_ipad_does_not_import_heavy_dependencies() -> None:
    """Workers import ipad's package; that alone must not pull in trio, cattrs or structlog."""
    assert imported_of("ipad", ("trio", "cattrs", "structlog")) == "[]"


@pytest.mark.timeout(60)
def test_worker_runtime_imports_no_trio_structlog_or_threading() -> None:
    """What the fork server imports stays small, and free of threading's after-fork hook.

    ``threading`` registers a handler that runs in every forked worker, and it
    cost each fork about 65 page faults (ipad/protocol/fdpass.py); pathlib is memory
    every worker maps and its exit tears down (ipad/worker/sandbox.py); trio and
    structlog would add ~100 ms to a spawned worker's start.
    """
    heavy = ("trio", "structlog", "cattrs", "attrs", "threading", "pathlib")
    assert imported_of("ipad.worker.forkserver, ipad.worker.host", heavy, "-I") == "[]"
