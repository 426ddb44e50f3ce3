"""``ipadctl stop MODULE`` against everything else issue 20 added, with real daemons.

A module the operator stops is no crash (no crash report, no restart in the
metrics), its in-flight call's error says "stopped by operator" in both
clients and with either isolation, the code edited while it was stopped is
what ``start`` runs, and the daemon's own stop is clean in each of those states.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from ipad import client as ipc
from tests.client_drivers import Connect, Start, connect
from tests.daemon_process import TEST_MODULES, WAIT, DaemonProcess, alive, wait_until
from tests.test_e2e_code_identity import Module, status, value_of_new_proxy
from tests.test_e2e_metrics import metrics, of

__all__ = ["connect"]  # the fixture: each behaviour test runs with both clients

pytestmark = pytest.mark.timeout(120)

STUCK = (
    '[modules.stuck]\nisolation = "{isolation}"\n[modules.stuck.restart]\n'
    'stop_timeout = "2s"\ncall_timeout = "1min"\nheartbeat_timeout = "1min"\n'
)


def stuck_daemon(start_daemon: Start, tmp_path: Path, isolation: str) -> DaemonProcess:
    """A daemon running the stuck module (its calls can block its worker) and echo."""
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n[modules.echo]\n'
                      + STUCK.format(isolation=isolation))  # fmt: skip
    return start_daemon(config)


def call_in_thread(call: Any) -> tuple[threading.Thread, list[BaseException | object]]:
    """Run ``call()`` in a thread; its result or exception lands in the list."""
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("isolation", ["module", "proxy"])
def test_a_call_in_flight_when_the_operator_stops_says_so_and_is_no_crash(
    start_daemon: Start, tmp_path: Path, connect: Connect, isolation: str
) -> None:
    """The blocked call fails with "stopped by operator"; no crash report, no restart counted."""
    daemon = stuck_daemon(start_daemon, tmp_path, isolation)
    driver = connect(daemon.socket)
    proxy = driver.request_proxy("stuck")
    pid = driver.call(proxy, "pid")
    mark = tmp_path / "mark"
    args = {"seconds": 60, "mark": str(mark)}
    thread, outcome = call_in_thread(lambda: driver.call(proxy, "block_beating", args, timeout=30))
    wait_until(mark.exists)  # the call is in the worker, its loop blocked
    before = metrics(daemon)
    assert daemon.ctl("stop", "stuck").stdout == "stuck: stopped\n"
    assert not alive(pid)
    thread.join(WAIT)
    assert not thread.is_alive()
    [error] = outcome
    assert isinstance(error, ipc.WorkerCrashed), error
    assert not isinstance(error, ipc.CallNotSent)
    assert "stopped by operator" in error.message, error.message
    assert "stopped by operator" in error.details["cause"]
    # The operator's stop is neither a crash nor a restart, and the module is down.
    crashes = daemon.ctl("--json", "crashes", "stuck", check=False)
    assert json.loads(crashes.stdout)["crashes"] == [], crashes.stdout
    after = metrics(daemon)
    restarts = {k: v for k, v in after.items() if k[0] == "ipad_module_restarts_total"}
    assert restarts == {k: v for k, v in before.items() if k[0] == "ipad_module_restarts_total"}
    assert of(after, "ipad_module_up", module="stuck") == 0
    assert of(after, "ipad_module_uptime_seconds", module="stuck") == 0
    assert daemon.ctl("status", "stuck", check=False).returncode == 3
    # Started again, the same proxy recovers on a new worker.
    assert daemon.ctl("start", "stuck").stdout == "stuck: running\n"
    assert driver.call(proxy, "pid", wait=WAIT) != pid
    assert of(metrics(daemon), "ipad_module_up", module="stuck") == 1


@pytest.mark.parametrize("isolation", ["module", "proxy"])
@pytest.mark.parametrize("reload", [False, True], ids=["start", "reload-then-start"])
def test_code_edited_while_stopped_runs_when_started(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], reload: bool, isolation: str
) -> None:
    """Stop, edit (reload: says so, keeps it stopped), start: the first worker runs the edit."""
    module = Module(tmp_path, isolation=isolation)
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    assert value_of_new_proxy(daemon) == 1
    if isolation == "module":  # a per-proxy module keeps a loaded spare instead
        wait_until(lambda: status(daemon)["standby_code_id"] is not None)
    before = status(daemon)["code_id"]
    assert daemon.ctl("stop", "af").stdout == "af: stopped\n"
    module.edit(2)
    if reload:
        reloaded = json.loads(daemon.ctl("--json", "reload").stdout)
        assert reloaded["code_changed"] == ["af"], reloaded
        assert (status(daemon)["state"], status(daemon)["reason"]) == (
            "stopped", "stopped by operator")  # fmt: skip
    assert daemon.ctl("start", "af").stdout == "af: running\n"
    assert value_of_new_proxy(daemon) == 2
    assert status(daemon)["code_id"] not in (None, before)
    # A reload afterwards finds nothing changed: the running worker has the code on disk.
    assert json.loads(daemon.ctl("--json", "reload").stdout)["changed"] == []


@pytest.mark.parametrize("isolation", ["module", "proxy"])
@pytest.mark.parametrize("state", ["stopped", "stopping", "started-while-stopping"])
def test_the_daemon_stops_cleanly_with_a_module_stopped_by_the_operator(
    start_daemon: Start, tmp_path: Path, state: str, isolation: str
) -> None:
    """SIGTERM while stopped by the operator, stopping, or started while stopping: clean.

    The module's stuck worker still ends, or a start waits for it to go: the
    daemon exits cleanly within its bound, and every ipadctl with it.
    """
    daemon = stuck_daemon(start_daemon, tmp_path, isolation)
    mark = tmp_path / "mark"
    blocked = daemon.ctl_argv("call", "stuck", "block_beating",
                              json.dumps({"seconds": 60, "mark": str(mark)}))  # fmt: skip
    procs = [subprocess.Popen(blocked, env=daemon.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)]  # fmt: skip
    try:
        wait_until(mark.exists)
        stopper = subprocess.Popen(daemon.ctl_argv("stop", "stuck"), env=daemon.env,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(stopper)
        if state == "stopped":
            assert stopper.communicate(timeout=WAIT)[0] == "stuck: stopped\n"
        else:
            wait_until(lambda: status(daemon, "stuck")["state"] == "stopping")
        if state == "started-while-stopping":
            procs.append(subprocess.Popen(daemon.ctl_argv("start", "stuck"), env=daemon.env,
                                          stdout=subprocess.PIPE, text=True))  # fmt: skip
            daemon.wait_for("module.start_requested", lambda r: r.get("module") == "stuck")
        report = daemon.stop_cleanly("sigterm")
        report.check()
        for proc in procs:
            proc.communicate(timeout=WAIT)
        assert procs[0].returncode == 1  # the call failed with its worker
        if state == "started-while-stopping":
            assert procs[2].returncode == 1  # it never started: the daemon stopped
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_start_after_the_operator_stopped_a_failing_module_is_no_recovery(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """Down (cooldown), stopped, then started: no crash-to-running time is observed.

    The operator's stop ends the outage the metrics time: however long the
    module stayed stopped, its start is no recovery from the failure before.
    """
    flag = tmp_path / "crash"
    flag.write_text("")
    tuning = tmp_path / "faulty.toml"
    tuning.write_text(f'crash_if_exists = "{flag}"\n')
    daemon_env["IPAD_FAULTY_TUNING_FILE"] = str(tuning)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n[modules.faulty]\n'
        '[modules.faulty.restart]\nmax_failures = 1\ncooldown_interval = "1h"\n'
    )
    daemon = start_daemon(config, wait=False)
    daemon.wait_for("module.cooldown", lambda r: r["module"] == "faulty")
    assert of(metrics(daemon), "ipad_module_restarts_total", module="faulty",
              reason="start_failed") >= 1  # fmt: skip
    assert daemon.ctl("stop", "faulty").stdout == "faulty: stopped\n"
    flag.unlink()
    assert daemon.ctl("start", "faulty").stdout == "faulty: running\n"
    found = metrics(daemon)
    assert of(found, "ipad_module_recovery_seconds_count", module="faulty") == 0
    assert of(found, "ipad_module_up", module="faulty") == 1
    # A crash from here on is timed as before: killed, it runs again, one observation.
    pid = status(daemon, "faulty")["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: status(daemon, "faulty")["worker_pid"] not in (None, pid))
    found = metrics(daemon)
    assert of(found, "ipad_module_recovery_seconds_count", module="faulty") == 1
    assert of(found, "ipad_module_restarts_total", module="faulty", reason="signal") == 1
    # `restart` of a stopped module starts it, as `start` does: no worker ended, no restart.
    assert daemon.ctl("stop", "faulty").stdout == "faulty: stopped\n"
    assert daemon.ctl("restart", "faulty").stdout == "faulty: running\n"
    found = metrics(daemon)
    assert of(found, "ipad_module_restarts_total", module="faulty", reason="operator") == 0
    assert of(found, "ipad_module_recovery_seconds_count", module="faulty") == 1


def test_stop_during_an_operators_restart_wins(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """`stop` while `restart` still ends a stuck worker: stopped, and everyone is told so."""
    daemon = stuck_daemon(start_daemon, tmp_path, "module")
    driver = connect(daemon.socket)
    proxy = driver.request_proxy("stuck")
    mark = tmp_path / "mark"
    args = {"seconds": 60, "mark": str(mark)}
    thread, outcome = call_in_thread(lambda: driver.call(proxy, "block_beating", args, timeout=30))
    wait_until(mark.exists)
    restarting = subprocess.Popen(daemon.ctl_argv("restart", "stuck"), env=daemon.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        daemon.wait_for("module.restart_requested", lambda r: r.get("module") == "stuck")
        assert daemon.ctl("stop", "stuck").stdout == "stuck: stopped\n"
        out, err = restarting.communicate(timeout=WAIT)
        assert restarting.returncode == 1, (out, err)
        assert "did not start: stopped by operator" in err
    finally:
        if restarting.poll() is None:
            restarting.kill()
            restarting.wait()
    thread.join(WAIT)
    [error] = outcome
    assert isinstance(error, ipc.WorkerCrashed), error
    assert "module stuck stopped by operator (" in error.message, error.message
    assert status(daemon, "stuck")["state"] == "stopped"
