"""The restart defaults against a real daemon: a camera's AWB killed again and again keeps going.

Issue 20's story, compressed: the shipped ``awb`` module, under the default
``[restart]`` policy, SIGKILLed 10 times, each kill once its worker has
served ``served_after`` and a standby is loaded (how fast the policy allows);
every kill is followed by a call that is served, and the module never backs
off nor cools down. Beside it, ``faulty`` crashing as it loads, under the same
defaults, still backs off and reaches cooldown.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from ipa_modules.awb import pack_zones

from ipad.client import make_buffer
from ipad.config.model import RestartPolicy
from tests.client_drivers import Connect, Driver, connect
from tests.daemon_process import REPO, TEST_MODULES, DaemonProcess, of_module, wait_until

__all__ = ["connect"]  # the fixture that runs the test against both clients

KILLS = 10
SERVED = RestartPolicy().served_after.seconds


def _config(tmp_path: Path) -> Path:
    """The awb and faulty modules, both on the default policy (no [restart] key set anywhere)."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[daemon]\nmodule_dirs = ["{REPO / "workers" / "modules"}", "{TEST_MODULES}"]\n'
        "[modules.awb]\n[modules.faulty]\n"
    )
    return path


def _standby_loaded(client: Driver) -> int | None:
    """The awb worker's pid once it runs with a loaded standby behind it, else None."""
    awb = client.status().modules["awb"]
    if awb["state"] == "running" and awb["standby_pid"] is not None:
        pid = awb["worker_pid"]
        return pid if isinstance(pid, int) else None
    return None


@pytest.mark.timeout(120)
def test_a_killed_camera_module_is_served_after_every_kill_and_never_cools_down(
    start_daemon: Callable[..., DaemonProcess],
    tmp_path: Path,
    daemon_env: dict[str, str],
    connect: Connect,
) -> None:
    """10 kills of a served awb worker: each followed by a served call; no backoff, no cooldown.

    faulty, crashing as it loads under the same defaults, reaches cooldown.
    """
    flag = tmp_path / "crash"
    flag.write_text("")
    tuning = tmp_path / "faulty.toml"
    tuning.write_text(f'crash_if_exists = "{flag}"\n')
    env = {**daemon_env, "IPAD_FAULTY_TUNING_FILE": str(tuning)}
    daemon = start_daemon(_config(tmp_path), env=env)
    cooldown = daemon.wait_for("module.cooldown", of_module("faulty"))
    assert cooldown["retry_in"] == RestartPolicy().cooldown_interval.seconds
    assert len([r for r in daemon.events("module.backoff") if r["module"] == "faulty"]) >= 3

    stats = make_buffer(pack_zones([(4000, 5000, 4500, 100)] * 64))
    try:
        client = connect(daemon.socket)
        awb = client.request_proxy("awb")
        client.call(awb, "init")
        client.call(awb, "process_stats", {"frame": 0}, {"stats": stats})
        killed: list[int] = []
        for frame in range(1, KILLS + 1):
            since = time.monotonic()
            wait_until(lambda: _standby_loaded(client) is not None)
            time.sleep(max(0.0, since + SERVED + 0.2 - time.monotonic()))  # it served
            pid = _standby_loaded(client)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            result = client.call(awb, "process_stats", {"frame": frame}, {"stats": stats})
            assert result["frame"] == frame
        assert client.attr(awb, "recoveries") == KILLS
        awb_status = client.status().modules["awb"]
    finally:
        os.close(stats)
    assert awb_status["state"] == "running"
    assert awb_status["consecutive_failures"] <= 1
    exits = [r for r in daemon.events("worker.exited") if r["module"] == "awb"]
    assert [r["worker_pid"] for r in exits] == killed
    promoted = [r for r in daemon.events("worker.ready")
                if r["module"] == "awb" and r.get("standby") is True]  # fmt: skip
    assert len(promoted) == KILLS  # each kill promoted the loaded standby
    for event in ("module.backoff", "module.backoff_skipped", "module.cooldown"):
        assert not [r for r in daemon.events(event) if r["module"] == "awb"], event
    states = [r["state"] for r in daemon.events("module.state_changed") if r["module"] == "awb"]
    assert "backoff" not in states
    assert "cooldown" not in states


@pytest.mark.timeout(120)
def test_a_module_dying_ms_after_every_start_still_cools_down(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A module that dies 20 ms after READY (fleeting) backs off and cools down by default.

    Its deaths are runs far shorter than served_after: none counts as served,
    so the loop stays the few forks it was before the defaults changed.
    """
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n[modules.fleeting]\n')
    daemon = start_daemon(path)
    cooldown = daemon.wait_for("module.cooldown", of_module("fleeting"))
    assert cooldown["retry_in"] == RestartPolicy().cooldown_interval.seconds
    assert [r for r in daemon.events("module.backoff") if r["module"] == "fleeting"]
    forks = [r for r in daemon.events("worker.forked") if r.get("module") == "fleeting"]
    # Six counted deaths and the standbys between them (each standby dies too, and backs off).
    assert len(forks) <= 3 * (RestartPolicy().max_failures + 1), len(forks)
    status = json.loads(daemon.ctl("--json", "status").stdout)["modules"]["fleeting"]
    assert status["state"] == "cooldown"
