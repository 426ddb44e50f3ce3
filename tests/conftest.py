"""Shared fixtures: every test starts from a clean ipad environment."""

from __future__ import annotations

import compileall
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options of the chaos test (tests/test_e2e_chaos.py): a longer run, or one seed again."""
    group = parser.getgroup("chaos", "the chaos test against a live daemon")
    group.addoption(
        "--chaos-minutes",
        type=float,
        default=None,
        metavar="N",
        help="run chaos episodes for N minutes instead of the bounded three",
    )
    group.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="run the one chaos episode of this seed (printed on failure)",
    )


@pytest.fixture(autouse=True)
def _clean_ipad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own IPAD_* variables must not steer what a test sees."""
    for name in list(os.environ):
        if name.startswith("IPAD_") or name == "JOURNAL_STREAM":
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """A test that configures logging (as the CLIs do) must not change the next test's."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session", autouse=True)
def _bytecode() -> None:
    """Compile ipad and its modules once, as installing it would.

    The tests start hundreds of daemons and workers; where Python may not
    write bytecode (PYTHONDONTWRITEBYTECODE, set on CI machines) each would
    compile every module from source.
    """
    repo = Path(__file__).resolve().parent.parent
    for directory in ("ipad", "workers", "tests/modules"):
        compileall.compile_dir(repo / directory, quiet=1)


# Real-daemon fixtures, shared by the integration tests.
from tests.buffers import make_buffer, memfd  # noqa: E402, F401
from tests.daemon_process import daemon_env, start_daemon  # noqa: E402, F401
from tests.notify_manager import manager  # noqa: E402, F401
from tests.privileges import shared_dir, user_install_cleanup  # noqa: E402, F401
from tests.raw_client import raw_connect  # noqa: E402, F401
