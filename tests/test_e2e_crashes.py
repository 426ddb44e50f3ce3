"""Crash reports with real daemons: a dead worker's stack and method in flight, kept and shown."""

from __future__ import annotations

import grp
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.daemon.crashes import RING_SIZE
from tests.daemon_process import (
    REPO,
    TEST_MODULES,
    WAIT,
    DaemonProcess,
    of_module,
    wait_until,
    write_config,
)
from tests.privileges import NOBODY, as_user, needs_setpriv

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., DaemonProcess]

CRASHY = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'
#: A short hang: the tests need not wait the default seconds.
QUICK_HANG = (
    '[modules.crashy]\n[modules.crashy.restart]\nheartbeat_interval = "100ms"\n'
    'heartbeat_timeout = "1s"\ncall_timeout = "300ms"\n'
)


def crashes(daemon: DaemonProcess, *args: str) -> list[dict[str, object]]:
    """``ipadctl crashes --json`` records."""
    reply = json.loads(daemon.ctl("crashes", "--json", *args).stdout)
    records: list[dict[str, object]] = reply["crashes"]
    return records


@pytest.mark.parametrize(
    ("method", "signal", "fault"),
    [("segfault", "SIGSEGV", "Segmentation fault"), ("abort", "SIGABRT", "Aborted")],
)
def test_a_signal_death_reports_stack_and_method(
    start_daemon: Start, tmp_path: Path, method: str, signal: str, fault: str
) -> None:
    """A worker killed by a signal leaves its Python stack and the call it ran: logged and kept."""
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules="[modules.crashy]\n"))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("crashy")
        pid = proxy.call("pid")
        with pytest.raises(ipc.WorkerCrashed):
            proxy.call(method)
        # Its client still there, the proxy is named (a proxy gone by the reap is not).
        report = daemon.wait_for("worker.crash_report", lambda r: r["worker_pid"] == pid)
    assert (report["module"], report["kind"], report["signal"]) == ("crashy", f"signal {signal}",
                                                                      signal)  # fmt: skip
    assert (report["method"], report["proxy_id"]) == (method, proxy.proxy_id)
    assert f"Fatal Python error: {fault}" in report["stack"]
    assert f"in {method}" in report["stack"]  # the module's own frame
    # The reason the proxies turned invalid with names the method too.
    state = daemon.wait_for("module.state_changed", lambda r: r["module"] == "crashy"
                            and r["state"] == "exited")  # fmt: skip
    assert state["reason"] == f"worker exited with signal {signal} in {method}()"
    [record] = crashes(daemon, "crashy")
    assert {k: record[k] for k in ("worker_pid", "kind", "method", "proxy_id", "signal")} == {
        "worker_pid": pid, "kind": f"signal {signal}", "method": method,
        "proxy_id": proxy.proxy_id, "signal": signal,
    }  # fmt: skip
    assert record["stack"] == report["stack"]
    assert isinstance(record["running_for"], float)
    assert record["running_for"] >= 0
    table = daemon.ctl("crashes").stdout
    assert f"{method}()" in table
    assert str(pid) in table
    assert "Fatal Python error" in table


@pytest.mark.parametrize("sandboxed", [False, True], ids=["isolated", "sandboxed"])
def test_a_hung_worker_dumps_its_stack_before_the_kill(
    start_daemon: Start, tmp_path: Path, sandboxed: bool
) -> None:
    """A call in an endless loop is killed as hung, its stack (inside the loop) dumped first."""
    modules = QUICK_HANG.replace("]\n", ']\nproxy = "sandboxed"\n', 1) if sandboxed else QUICK_HANG
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules=modules))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("crashy")
        proxy.call("pid")
        with pytest.raises(ipc.WorkerCrashed):
            proxy.call("spin", timeout=20)
    report = daemon.wait_for("worker.crash_report", of_module("crashy"))
    pid = report["worker_pid"]
    assert (report["kind"], report["signal"], report["method"]) == ("hung", "SIGKILL", "spin")
    assert "in spin" in report["stack"]
    hung = daemon.wait_for("worker.hung", lambda r: r["worker_pid"] == pid)
    assert hung["heartbeat"] == "call"
    state = daemon.wait_for("module.state_changed", lambda r: r["module"] == "crashy"
                            and r["state"] == "exited")  # fmt: skip
    assert state["reason"].endswith("call_timeout of 300ms in spin()")


def test_a_worker_deaf_to_the_dump_signal_is_killed_all_the_same(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Blocking SIGUSR1 costs a hung worker its stack, not its kill; the module comes back."""
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules=QUICK_HANG))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("crashy")
        pid = proxy.call("pid")
        with pytest.raises(ipc.WorkerCrashed):
            proxy.call("spin_deaf", timeout=20)
    report = daemon.wait_for("worker.crash_report", lambda r: r["worker_pid"] == pid)
    assert (report["kind"], report["signal"], report["method"]) == ("hung", "SIGKILL", "spin_deaf")
    assert report["stack"] == ""
    daemon.wait_for("worker.ready", lambda r: r["module"] == "crashy" and r["worker_pid"] != pid)


def test_a_worker_that_closes_its_dump_descriptor_is_still_reported(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Without its dump descriptor the crash has no stack, but its signal and method stand."""
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules="[modules.crashy]\n"))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("crashy")
        pid = proxy.call("pid")
        with pytest.raises(ipc.WorkerCrashed):
            proxy.call("close_dump_then_segfault")
    report = daemon.wait_for("worker.crash_report", lambda r: r["worker_pid"] == pid)
    assert (report["signal"], report["method"], report["stack"]) == (
        "SIGSEGV",
        "close_dump_then_segfault",
        "",
    )


def test_a_scribbled_board_is_read_as_a_bounded_claim(start_daemon: Start, tmp_path: Path) -> None:
    """Lies on the board (a huge length, escapes, a future time) come out clipped and inert."""
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules="[modules.crashy]\n"))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("crashy")
        pid = proxy.call("pid")
        with pytest.raises(ipc.WorkerCrashed):
            proxy.call("scribble_then_segfault")
    report = daemon.wait_for("worker.crash_report", lambda r: r["worker_pid"] == pid)
    assert report["signal"] == "SIGSEGV"
    assert report["proxy_id"] is None  # the instance it claims is no proxy's
    for text in (report["method"], report["stack"]):
        assert "\x1b" not in text
        assert "\x07" not in text
        assert "\\x1b" in text
    assert len(report["method"]) < 1024
    assert len(report["stack"]) < 9 * 1024
    [record] = crashes(daemon)
    assert record["running_for"] is None  # a "since" in the future is not believed
    daemon.wait_for("worker.ready", lambda r: r["module"] == "crashy" and r["worker_pid"] != pid)


def test_crashes_of_an_unknown_module_exit_4(start_daemon: Start, tmp_path: Path) -> None:
    """``ipadctl crashes NOPE`` says there is no such module and exits 4; none yet is no error."""
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules="[modules.crashy]\n"))
    result = daemon.ctl("crashes", "nope", check=False)
    assert result.returncode == 4
    assert "no module 'nope'" in result.stderr
    assert daemon.ctl("crashes", "crashy").stdout.strip() == "no crashes recorded"
    assert crashes(daemon) == []
    daemon.wait_for("worker.ready", of_module("crashy"))


#: The ways a worker is started, each with its own route for the board: forked from the
#: fork server, spawned (no fork server), and forked into a sandbox (PID namespace, seccomp).
STARTS = {
    "forked": (CRASHY, "[modules.crashy]\n"),
    "spawned": (f"{CRASHY}forkserver = false\n", "[modules.crashy]\n"),
    "sandboxed": (CRASHY, '[modules.crashy]\nproxy = "sandboxed"\n'),
}


@pytest.mark.parametrize("start", list(STARTS))
def test_every_kind_of_worker_reports_its_stack(
    start_daemon: Start, tmp_path: Path, start: str
) -> None:
    """Forked, spawned or sandboxed, a segfaulting worker's stack and method reach the report."""
    head, modules = STARTS[start]
    daemon = start_daemon(write_config(tmp_path, head, modules=modules))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("crashy")
        pid = proxy.call("pid")
        with pytest.raises(ipc.WorkerCrashed):
            proxy.call("segfault")
        report = daemon.wait_for("worker.crash_report", lambda r: r["module"] == "crashy")
    assert (report["signal"], report["method"]) == ("SIGSEGV", "segfault")
    assert "in segfault" in report["stack"]
    if start == "sandboxed":
        assert pid == 1  # its own PID namespace: the daemon still reads its board
    if start == "spawned":
        assert not daemon.events("forkserver.started")


@needs_setpriv
def test_crash_reports_are_for_admins_only(
    start_daemon: Start, shared_dir: Path, daemon_env: dict[str, str]
) -> None:
    """A client outside the admin group may not read crash reports (stacks may show data)."""
    config = write_config(shared_dir, f"""{CRASHY}socket_group = "nogroup"
[access]
admin_groups = ["adm"]
""", modules="[modules.crashy]\n")  # fmt: skip
    env = {**daemon_env, "IPAD_SOCKET": str(shared_dir / "run" / "ipad.sock")}
    daemon = start_daemon(config, env=env)
    result = subprocess.run(
        [*as_user(NOBODY, grp.getgrnam("nogroup").gr_gid, []), sys.executable, "-m",
         "ipad.cli.ctl", "--socket", str(daemon.socket), "crashes"],
        capture_output=True, text=True, cwd=REPO, env=daemon.env, timeout=WAIT, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "may not use the admin operation 'crashes'" in result.stderr
    assert daemon.ctl("crashes").returncode == 0  # root may


def test_a_worker_that_crashes_as_it_loads_leaves_its_stack(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A segfault during LOAD (the module's own start) is a failed start with its stack."""
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules="[modules.crashy_load]\n"),
                          wait=False)  # fmt: skip
    report = daemon.wait_for("worker.crash_report", of_module("crashy_load"))
    assert (report["kind"], report["method"]) == ("signal SIGSEGV", None)
    assert "in __init__" in report["stack"]
    state = daemon.wait_for("module.state_changed", lambda r: r["module"] == "crashy_load"
                            and r["state"] == "exited")  # fmt: skip
    assert state["reason"].startswith("failed to start")


def test_a_flood_of_crashes_keeps_the_ring_bounded(start_daemon: Start, tmp_path: Path) -> None:
    """A crash loop with no cooldown in sight: the daemon keeps 16 reports, counts the rest."""
    modules = (
        "[modules.crashy_load]\n[modules.crashy_load.restart]\nmax_failures = 1000\n"
        'initial_delay = "1ms"\nmax_delay = "2ms"\nstandby = false\n'
    )
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules=modules), wait=False)

    def enough() -> bool:
        return len(daemon.events("worker.crash_report")) > 2 * RING_SIZE

    wait_until(enough, timeout=60)
    reply = json.loads(daemon.ctl("crashes", "crashy_load", "--json", "-n", "1000").stdout)
    assert len(reply["crashes"]) == RING_SIZE
    assert reply["dropped"] >= RING_SIZE
    assert reply["left_off"] == 0
    pids = [r["worker_pid"] for r in reply["crashes"]]
    assert len(set(pids)) == RING_SIZE  # each a crash of its own, oldest first
    assert [r["time"] for r in reply["crashes"]] == sorted(r["time"] for r in reply["crashes"])


def test_a_crash_in_a_proxy_s_own_worker_is_the_module_s(
    start_daemon: Start, tmp_path: Path
) -> None:
    """With isolation per proxy the report names that proxy and outlives its worker's cell."""
    modules = '[modules.crashy]\nisolation = "proxy"\n'
    daemon = start_daemon(write_config(tmp_path, CRASHY, modules=modules))
    with BlockingClient(daemon.socket) as client:
        first, second = client.request_proxy("crashy"), client.request_proxy("crashy")
        pid = second.call("pid")
        with pytest.raises(ipc.WorkerCrashed) as caught:
            second.call("segfault")
        assert caught.value.details["cause"] == "worker exited with signal SIGSEGV in segfault()"
        daemon.wait_for("worker.crash_report", lambda r: r["worker_pid"] == pid)
        second.release()
        assert isinstance(first.call("pid"), int)  # the other proxy's worker did not end
    [record] = crashes(daemon, "crashy")
    assert (record["worker_pid"], record["proxy_id"], record["method"]) == (
        pid, second.proxy_id, "segfault")  # fmt: skip
