"""Crash reports from a daemon run by an unprivileged user (CI runs as root: the other path)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess, write_config
from tests.privileges import as_user, needs_setpriv, user_install
from tests.test_e2e_unprivileged import nobody_dir, nobody_env

__all__ = ["nobody_dir", "nobody_env"]  # fixtures, used by name

pytestmark = [pytest.mark.timeout(90), needs_setpriv]

Start = Callable[..., DaemonProcess]


@pytest.mark.parametrize("proxy", ["isolated", "sandboxed"])
def test_an_unprivileged_daemon_reports_stacks_and_causes(
    start_daemon: Start, nobody_dir: Path, nobody_env: dict[str, str], proxy: str
) -> None:
    """As nobody (a sandbox in a user namespace): segfault and hang leave stacks and causes."""
    modules = (
        f'[modules.crashy]\nproxy = "{proxy}"\n[modules.crashy.restart]\n'
        'heartbeat_interval = "100ms"\nheartbeat_timeout = "1s"\ncall_timeout = "300ms"\n'
    )
    head = f'[daemon]\nmodule_dirs = ["{user_install().test_modules}"]\n'
    daemon = start_daemon(write_config(nobody_dir, head, modules=modules), env=nobody_env,
                          prefix=as_user())  # fmt: skip
    daemon.wait_for("worker.ready", lambda r: r["module"] == "crashy")
    crashed = daemon.ctl("call", "crashy", "segfault", check=False)
    assert "worker exited with signal SIGSEGV in segfault()" in crashed.stderr
    hung = daemon.ctl("call", "crashy", "spin", check=False)
    assert "call_timeout of 300ms in spin()" in hung.stderr
    reply = json.loads(daemon.ctl("crashes", "--json").stdout)  # its own user is admin
    kinds = [(r["kind"], r["method"]) for r in reply["crashes"]]
    assert kinds == [("signal SIGSEGV", "segfault"), ("hung", "spin")]
    assert "in segfault" in reply["crashes"][0]["stack"]
    assert "in spin" in reply["crashes"][1]["stack"]
