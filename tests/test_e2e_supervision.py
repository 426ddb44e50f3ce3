"""Supervision with real processes: crashes, hangs, crash loops, leftovers, reload, stop."""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.daemon.sandbox_status import _limits
from tests.buffers import MakeFd, write_memfd
from tests.daemon_process import (
    REPO,
    TEST_MODULES,
    DaemonProcess,
    alive,
    of_module,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., DaemonProcess]

FAULTY = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (every thread's)."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(x) for x in (task / "children").read_text().split()]
    return pids


def zombies_among(pids: list[int]) -> list[int]:
    """Those of ``pids`` that are zombies."""
    found = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # reaped before or while we read
            continue
        if state == "Z":
            found.append(pid)
    return found


async def test_kill9_under_concurrent_calls(start_daemon: Start, memfd: MakeFd) -> None:
    """Calls in flight fail fast, later calls succeed after the replay, AWB state survives."""
    daemon = start_daemon()
    zones = [(120 * n, 100 * n, 70 * n, n) for n in (100, 200)]
    stats = b"".join(struct.pack("<4I", *z) for z in zones)
    target_red = sum(z[1] for z in zones) / sum(z[0] for z in zones)
    async with ipc.open_client(daemon.socket) as client:
        awb = await client.request_proxy("awb")
        await awb.call("init", {"settings": {"initial_red_gain": 2.0, "initial_blue_gain": 1.0}})
        await awb.call("configure")
        pid = (
            await awb.call("process_stats", {"frame": 0}, fds={"stats": memfd(stats)})
            and (daemon.worker_pids()["awb"])
        )
        failures: list[BaseException] = []
        after_recovery = 0
        enough = trio.Event()

        async def caller() -> None:
            nonlocal after_recovery
            frame = 0
            while not enough.is_set():
                frame += 1
                fd = write_memfd(stats)
                try:
                    await awb.call("process_stats", {"frame": frame}, fds={"stats": fd}, wait=10)
                except ipc.WorkerCrashed as exc:
                    failures.append(exc)
                finally:
                    os.close(fd)
                if awb.recoveries:
                    after_recovery += 1
                    if after_recovery >= 100:
                        enough.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(caller)
                await trio.sleep(0.05)
                # Stopped, the worker answers nothing: once every caller has a call in
                # flight, the kill lands on four calls for certain.
                os.kill(pid, signal.SIGSTOP)
                while _process_state(pid) != "T":
                    await trio.sleep(0.001)
                # Replies it sent just before it stopped are read by now (a busy machine
                # can leave one in the socket a moment): only unanswerable calls remain.
                await trio.sleep(0.05)
                while len(awb.requests) < 4:
                    await trio.sleep(0.001)
                os.kill(pid, signal.SIGKILL)
        # Exactly the calls in flight at the kill failed, but the newest: the stopped
        # worker never read it (the channel ends with ECONNRESET), so it never ran and
        # is sent again after the recovery. Every later call waited and succeeded.
        assert len(failures) == 3
        assert all(not isinstance(exc, ipc.CallNotSent) for exc in failures)
        assert awb.recoveries == 1
        # A fresh instance after the replay of init(initial_red_gain=2.0) and configure():
        await awb.call("configure")
        result = await awb.call("process_stats", {"frame": 1}, fds={"stats": memfd(stats)})
        assert result["red_gain"] == pytest.approx(2.0 + 0.5 * (target_red - 2.0))


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_crash_loop_cools_down_and_restart_ends_it(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A module crashing as it loads backs off, cools down, and `ipadctl restart` brings it back."""
    flag = tmp_path / "crash"
    flag.write_text("")
    tuning = tmp_path / "faulty.toml"
    tuning.write_text(f'crash_if_exists = "{flag}"\n')
    env = {**daemon_env, "IPAD_FAULTY_TUNING_FILE": str(tuning)}
    config = write_config(
        tmp_path, FAULTY, modules="[modules.faulty]\n[modules.faulty.restart]\nmax_failures = 3\n"
    )
    daemon = start_daemon(config, env=env)
    record = daemon.wait_for("module.cooldown", lambda r: r["module"] == "faulty")
    assert "exited before it was ready" in record["reason"] or "exit status 7" in record["reason"]
    assert record["retry_in"] == 30.0
    starts = daemon.events("worker.start_failed")
    assert len(starts) == 4
    status = json.loads(daemon.ctl("--json", "status").stdout)["modules"]["faulty"]
    assert status["state"] == "cooldown"
    flag.unlink()
    result = json.loads(daemon.ctl("--json", "restart", "faulty").stdout)
    assert result == {"module": "faulty", "state": "running", "reason": None}
    events = [json.loads(x) for x in daemon.ctl("--json", "events").stdout.splitlines()]
    states = [e["state"] for e in events if e["module"] == "faulty" and e["kind"] == "module"]
    assert "cooldown" in states
    assert states[-1] == "running"


def test_hung_worker_is_killed_and_restarted(start_daemon: Start, tmp_path: Path) -> None:
    """A worker that stops answering heartbeats is killed as hung and started again."""
    config = write_config(
        tmp_path,
        FAULTY,
        modules="[modules.faulty]\n[modules.faulty.restart]\n"
        'heartbeat_interval = "100ms"\nheartbeat_timeout = "300ms"\n',
    )
    daemon = start_daemon(config)
    with BlockingClient(daemon.socket) as client:
        faulty = client.request_proxy("faulty")
        pid = faulty.call("pid")
        with pytest.raises(ipc.WorkerCrashed):
            faulty.call("hang", timeout=10)
    hung = daemon.wait_for("worker.hung", lambda r: r["module"] == "faulty")
    assert (hung["worker_pid"], hung["heartbeat"]) == (pid, "board")
    exited = daemon.wait_for("worker.exited", lambda r: r["module"] == "faulty")
    assert (exited["cause"], exited["signal"]) == ("hung", "SIGKILL")
    # A forked worker beats on a board: the reason says so, not "no reply" to a PING.
    state = daemon.wait_for(
        "module.state_changed", lambda r: r["module"] == "faulty" and r["state"] == "exited"
    )
    assert state["reason"] == (
        "worker hung: its heartbeat counter did not move within 300ms in hang()"
    )
    daemon.wait_for("worker.ready", lambda r: r["module"] == "faulty" and r["worker_pid"] != pid)
    # The new worker is the promoted standby, which beat once an hour while it
    # waited: promoted, it beats at the module's interval again (HEARTBEAT), so
    # idling for many timeouts is not a hang, and hanging again is one.
    promoted = daemon.wait_for("worker.ready", lambda r: r["module"] == "faulty"
                               and r["worker_pid"] != pid)  # fmt: skip
    assert promoted.get("standby") is True
    time.sleep(1.5)  # five heartbeat timeouts
    assert len(daemon.events("worker.hung")) == 1
    with BlockingClient(daemon.socket) as client:
        faulty = client.request_proxy("faulty")
        assert faulty.call("pid") == promoted["worker_pid"]
        with pytest.raises(ipc.WorkerCrashed):
            faulty.call("hang", timeout=10)
    daemon.wait_for("worker.hung", lambda r: r["worker_pid"] == promoted["worker_pid"])
    assert not alive(pid)


def test_a_worker_that_closes_its_control_socket_is_killed(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Cut off from the daemon but alive, a worker is killed after a grace, then restarted."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    with BlockingClient(daemon.socket) as client:
        faulty = client.request_proxy("faulty")
        pid = faulty.call("pid")
        with pytest.raises(ipc.WorkerCrashed):  # killed in the middle of it
            faulty.call("close_control", {"linger": 60})
    record = daemon.wait_for("worker.control_closed", lambda r: r["worker_pid"] == pid)
    assert record["action"] == "killed"
    exited = daemon.wait_for("worker.exited", lambda r: r["worker_pid"] == pid)
    assert exited["signal"] == "SIGKILL"
    daemon.wait_for("worker.ready", lambda r: r["module"] == "faulty" and r["worker_pid"] != pid)
    assert not alive(pid)


@pytest.mark.parametrize(
    ("how", "logged"),
    [("crash", {"signal": "SIGSEGV"}), ("exit", {"exit_status": 3})],
)
def test_crash_modes_are_reported_and_restarted(
    start_daemon: Start, tmp_path: Path, how: str, logged: dict[str, object]
) -> None:
    """Death by signal or by exit code is logged with its cause; the worker is back at once."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    with BlockingClient(daemon.socket) as client:
        faulty = client.request_proxy("faulty")
        pid = faulty.call("pid")
        args = {"signum": int(signal.SIGSEGV)} if how == "crash" else {"code": 3}
        with pytest.raises(ipc.WorkerCrashed):
            faulty.call(how, args)
    record = daemon.wait_for("worker.exited", lambda r: r["worker_pid"] == pid)
    assert {k: record[k] for k in logged} == logged
    daemon.wait_for("worker.ready", lambda r: r["module"] == "faulty" and r["worker_pid"] != pid)


def test_restart_never_leaves_the_module_down_until_asked(
    start_daemon: Start, tmp_path: Path
) -> None:
    """With restart = "never" a crash is final until `ipadctl restart`."""
    config = write_config(
        tmp_path, FAULTY, modules='[modules.faulty]\n[modules.faulty.restart]\nrestart = "never"\n'
    )
    daemon = start_daemon(config)
    pid = daemon.worker_pids()["faulty"]
    os.kill(pid, signal.SIGKILL)
    record = daemon.wait_for(
        "module.state_changed", lambda r: r["module"] == "faulty" and r["state"] == "failed"
    )
    assert record["reason"] == (
        "worker exited with signal SIGKILL; not restarted (failed; restart = never)"
    )
    assert json.loads(daemon.ctl("--json", "restart", "faulty").stdout)["state"] == "running"


def test_no_process_of_a_killed_worker_is_left(start_daemon: Start, tmp_path: Path) -> None:
    """A grandchild that called setsid() and forked again dies with its worker (cgroup.kill)."""
    daemon = start_daemon(write_config(tmp_path, FAULTY, modules="[modules.faulty]\n"))
    cgroups = daemon.events("cgroup.ready")
    if not cgroups:
        pytest.skip("no writable cgroup2 here: a setsid grandchild can escape a process group")
    with BlockingClient(daemon.socket) as client:
        faulty = client.request_proxy("faulty")
        pid = faulty.call("pid")
        grandchild = faulty.call("leak")
        assert alive(grandchild)
        assert os.getsid(grandchild) != os.getsid(pid)  # it left the worker's session and group
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(grandchild), timeout=10)
    daemon.wait_for("worker.ready", lambda r: r["module"] == "faulty" and r["worker_pid"] != pid)
    assert not any(p.name.startswith(f"faulty.{pid}") for p in Path(cgroups[0]["cgroup"]).iterdir())


def test_no_zombie_after_many_restarts(start_daemon: Start, tmp_path: Path) -> None:
    """After 20 kills and 5 asked-for restarts, the daemon's children are its live workers."""
    config = write_config(
        tmp_path,
        modules="[modules.echo]\n[modules.echo.restart]\nmax_failures = 100\n"
        'max_delay = "20ms"\n[modules.awb]\n',
    )
    daemon = start_daemon(config)

    def ready_count() -> int:
        return len([r for r in daemon.events("worker.ready") if r["module"] == "echo"])

    for round_ in range(25):
        count = ready_count()
        if round_ < 20:
            os.kill(daemon.worker_pids()["echo"], signal.SIGKILL)
        else:
            daemon.ctl("restart", "echo")
        wait_until(functools.partial(lambda c: ready_count() == c + 1, count))
    daemon.wait_for("worker.standby_ready", lambda r: r["module"] == "echo")
    status = json.loads(daemon.ctl("--json", "status").stdout)
    modules = status["modules"].values()
    expected = (
        {m["worker_pid"] for m in modules}
        | {m["standby_pid"] for m in modules if m["standby_pid"]}
        | {status["daemon"]["forkserver_pid"]}
    )
    children = children_of(daemon.proc.pid)
    assert zombies_among(children) == []
    assert set(children) == expected
    assert status["modules"]["echo"]["restarts"] == 25


def test_daemon_killed_leaves_no_worker_nor_fork_server(start_daemon: Start) -> None:
    """SIGKILL of the daemon: every worker and the fork server are gone within a second."""
    daemon = start_daemon()
    for module in ("awb", "agc", "echo"):
        daemon.wait_for("worker.standby_ready", of_module(module))
    status = json.loads(daemon.ctl("--json", "status").stdout)
    pids = [m["worker_pid"] for m in status["modules"].values()]
    pids += [m["standby_pid"] for m in status["modules"].values()]
    pids.append(status["daemon"]["forkserver_pid"])
    assert all(alive(pid) for pid in pids)
    daemon.expect_unclean_exit("SIGKILLed on purpose: what it leaves is tested")
    daemon.proc.kill()
    daemon.proc.wait(timeout=10)
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=1)


def soft_open_files(pid: int) -> int:
    """A process's soft limit of open files, as ``ipadctl status`` reads it from /proc."""
    return int(_limits(pid)["RLIMIT_NOFILE"])


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_daemon_takes_the_hard_limit_of_open_files(start_daemon: Start, tmp_path: Path) -> None:
    """Started with systemd's default soft limit (1024), it raises it to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise to")
    ceiling = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    daemon = start_daemon(write_config(tmp_path, modules="[modules.echo]\n"),
                          prefix=["prlimit", f"--nofile=1024:{ceiling}"])  # fmt: skip
    record = daemon.wait_for("daemon.open_files")
    assert record["was"] == 1024
    assert soft_open_files(daemon.proc.pid) == record["soft_limit"] > 1024
    # Its forked workers inherit it, so a sandbox-less module is not held to 1024 either.
    assert soft_open_files(daemon.worker_pids()["echo"]) == record["soft_limit"]


def test_reload_starts_stops_restarts_and_keeps(start_daemon: Start, tmp_path: Path) -> None:
    """SIGHUP: an added module starts, a removed one stops, a changed one restarts, others keep their pid."""
    config = write_config(
        tmp_path, FAULTY, modules="[modules.echo]\n[modules.awb]\n[modules.agc]\n"
    )
    daemon = start_daemon(config)
    before = daemon.worker_pids()
    config.write_text(
        f"{FAULTY}[modules.echo]\n[modules.awb]\n[modules.awb.restart]\nmax_failures = 9\n"
        "[modules.faulty]\n"
    )
    daemon.proc.send_signal(signal.SIGHUP)
    done = daemon.wait_for("daemon.reloaded")
    assert (done["added"], done["removed"], done["changed"], done["unchanged"]) == (
        ["faulty"],
        ["agc"],
        ["awb"],
        ["echo"],
    )
    status = json.loads(daemon.ctl("--json", "status").stdout)["modules"]
    assert set(status) == {"echo", "awb", "faulty"}
    assert status["echo"]["worker_pid"] == before["echo"]
    assert status["awb"]["worker_pid"] != before["awb"]
    assert not alive(before["agc"])
    # The reasons their clients see say what the reload did to each.
    ends = {
        (r["module"], r["state"]): r["reason"]
        for r in daemon.events("module.state_changed")
        if r["state"] in ("exited", "stopped")
    }
    assert ends == {
        ("agc", "exited"): "module agc removed from the configuration (exit status 0)",
        ("agc", "stopped"): "removed from the configuration",
        ("awb", "exited"): "module awb changed in the configuration: restarting (exit status 0)",
        ("awb", "stopped"): "changed in the configuration: restarting",
    }


def test_reload_applies_the_log_level_and_names_what_waits_for_a_restart(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A reload takes the new log_level (unless the command line set one); the socket waits."""
    config = write_config(tmp_path, '[daemon]\nlog_level = "info"\n', modules="[modules.echo]\n")
    daemon = start_daemon(config, log_level=None)
    assert daemon.events("worker.forked") == []  # a debug record, below "info"
    config.write_text('[daemon]\nlog_level = "debug"\nforkserver = false\n[modules.echo]\n')
    daemon.ctl("reload")
    changed = daemon.wait_for("daemon.logging_changed")
    assert (changed["log_level"], changed["log_format"]) == ("debug", "json")
    waiting = daemon.wait_for("daemon.reload_needs_restart")
    assert waiting["keys"] == ["daemon.forkserver"]
    daemon.ctl("restart", "echo")
    daemon.wait_for("worker.forked")  # still forked: the fork server stays until a restart
    # With --log-level given, the command line keeps ruling.
    pinned = start_daemon(
        config, env={**daemon.env, "IPAD_SOCKET": str(tmp_path / "pinned.sock")}, log_level="info"
    )
    config.write_text('[daemon]\nlog_level = "warning"\n[modules.echo]\n')
    pinned.ctl("reload")
    pinned.wait_for("daemon.reloaded")
    assert pinned.events("daemon.logging_changed") == []


def test_reload_that_brings_the_first_module_starts_the_fork_server(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A daemon started with no module to fork forks those a reload adds, as a start would."""
    config = write_config(tmp_path, modules="")
    daemon = start_daemon(config)
    assert daemon.wait_for("daemon.started")["forkserver"] is False
    write_config(tmp_path, modules="[modules.echo]\n")
    daemon.ctl("reload")
    started = daemon.wait_for("forkserver.started")
    daemon.wait_for("worker.standby_ready", lambda r: r["module"] == "echo")
    status = json.loads(daemon.ctl("--json", "status").stdout)["daemon"]
    assert status["forkserver_pid"] == started["pid"]
    assert (status["workers_forked"], status["workers_spawned"]) == (2, 0)  # active, standby


def test_invalid_reload_keeps_the_old_configuration(start_daemon: Start, tmp_path: Path) -> None:
    """`ipadctl reload` of a broken file fails with every problem; the old config keeps running."""
    config = write_config(tmp_path)
    daemon = start_daemon(config)
    before = daemon.worker_pids()
    config.write_text("[modules.echo]\nenabled = 'yes'\n[modules.nope]\n")
    result = daemon.ctl("reload", check=False)
    assert result.returncode == 1
    assert "the new configuration is invalid; the old one keeps running" in result.stderr
    assert f"{config}: modules.echo.enabled: got a string 'yes' (true or false)" in result.stderr
    status = json.loads(daemon.ctl("--json", "status").stdout)["modules"]
    assert {name: m["worker_pid"] for name, m in status.items()} == before


def test_ipadctl_stop(start_daemon: Start) -> None:
    """`ipadctl stop` stops the daemon gracefully: exit status 0, workers stopped."""
    daemon = start_daemon()
    pids = list(daemon.worker_pids().values())
    daemon.stop_cleanly("ipadctl").check()  # it printed "stopping", and exited 0 in bound
    assert not any(alive(pid) for pid in pids)


async def test_fallback_serves_during_cooldown_and_hands_back(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """In cooldown, proxies move to the fallback (with replay); once stable, they come back."""
    flag = tmp_path / "crash"
    tuning = tmp_path / "faulty.toml"
    tuning.write_text(f'crash_if_exists = "{flag}"\n')
    env = {**daemon_env, "IPAD_FAULTY_TUNING_FILE": str(tuning)}
    config = write_config(
        tmp_path,
        FAULTY,
        modules='[modules.faulty]\nfallback = "steady"\n[modules.faulty.restart]\n'
        'max_failures = 2\ncooldown_interval = "1s"\nstable_after = "500ms"\nstandby = false\n'
        "[modules.steady]\n",
    )
    daemon = start_daemon(config, env=env)
    steady_pid = daemon.worker_pids()["steady"]
    async with ipc.open_client(daemon.socket) as client:
        proxy = await client.request_proxy("faulty")
        await proxy.call("init", {"settings": {"value": 7}})
        flag.write_text("")
        os.kill(await proxy.call("pid"), signal.SIGKILL)
        with trio.fail_after(20):
            async for event in client.events:
                if event.proxy_id == proxy.proxy_id and getattr(event, "kind", "") == "fallback":
                    break
        assert event.details["served_by"] == "steady"
        assert proxy.reason == "fallback"
        assert await proxy.call("pid") == steady_pid
        assert await proxy.call("get") == 7  # init(value=7) was replayed on the fallback
        newcomer = await client.request_proxy("faulty")
        assert newcomer.info.served_by == "steady"
        flag.unlink()
        with trio.fail_after(20):
            async for event in client.events:
                if event.proxy_id == proxy.proxy_id and getattr(event, "kind", "") == "recovered":
                    break
        faulty_pid = await proxy.call("pid")
        assert faulty_pid == daemon.worker_pids()["faulty"]
        assert faulty_pid != steady_pid
        assert await proxy.call("get") == 7
    daemon.wait_for("proxy.returning", lambda r: r["proxy_id"] == proxy.proxy_id)


def test_standby_is_promoted_and_replaced(start_daemon: Start, tmp_path: Path) -> None:
    """A crash promotes the loaded standby at once; a new standby is prepared behind it."""
    daemon = start_daemon(write_config(tmp_path, modules="[modules.echo]\n"))
    standby = daemon.wait_for("worker.standby_ready", lambda r: r["module"] == "echo")
    active = daemon.worker_pids()["echo"]
    os.kill(active, signal.SIGKILL)
    promoted = daemon.wait_for("worker.ready", lambda r: r.get("standby") is True)
    assert promoted["worker_pid"] == standby["worker_pid"]
    daemon.wait_for("module.state_changed", lambda r: r["state"] == "running"
                    and r["worker_pid"] == promoted["worker_pid"])  # fmt: skip
    # Each state names the worker it is about: starting names none, not the dead one.
    states = [(r["state"], r.get("worker_pid")) for r in daemon.events("module.state_changed")]
    assert states[-3:] == [
        ("exited", active),
        ("starting", None),
        ("running", promoted["worker_pid"]),
    ]
    again = daemon.wait_for(
        "worker.standby_ready", lambda r: r["worker_pid"] not in (standby["worker_pid"], active)
    )
    status = json.loads(daemon.ctl("--json", "status").stdout)["modules"]["echo"]
    assert (status["worker_pid"], status["standby_pid"]) == (
        standby["worker_pid"],
        again["worker_pid"],
    )
    os.kill(again["worker_pid"], signal.SIGKILL)  # a standby that dies is replaced too
    daemon.wait_for("worker.standby_exited", lambda r: r["worker_pid"] == again["worker_pid"])
    daemon.wait_for(
        "worker.standby_ready",
        lambda r: r["worker_pid"] not in (standby["worker_pid"], active, again["worker_pid"]),
    )


#: A trusted module whose code and manifest both say which version they are.
VERSIONED = """from ipad.ipa import IPAModule

__version__ = "{version}"


class Versioned(IPAModule):
    def which(self) -> str:
        return "{version}"
"""

VERSIONED_MANIFEST = """name = "versioned"
version = "{version}"
api_version = 1
worker = "ipad-worker"
entry_point = "versioned_pkg.versioned:Versioned"
[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""


def install_versioned(directory: Path, version: str) -> None:
    """Install (or upgrade) the versioned module's code and manifest in ``directory``."""
    package = directory / "versioned_pkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "versioned.py").write_text(VERSIONED.format(version=version))
    (directory / "versioned.toml").write_text(VERSIONED_MANIFEST.format(version=version))


def test_reload_of_a_changed_trusted_module_runs_its_new_code(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """The fork server holds trusted code as imported: a reload that changes it replaces it."""
    modules = tmp_path / "trusted"
    install_versioned(modules, "1.0.0")
    (tmp_path / "versioned.toml").write_text("")
    config = write_config(
        tmp_path,
        f'[daemon]\nmodule_dirs = ["{modules}"]\ntrusted_module_dirs = ["{modules}"]\n',
        modules="[modules.versioned]\n[modules.echo]\n",
    )
    env = {**daemon_env, "IPAD_VERSIONED_TUNING_FILE": str(tmp_path / "versioned.toml")}
    daemon = start_daemon(config, env=env)
    first = daemon.wait_for("forkserver.started")
    assert f"{modules}:versioned_pkg.versioned" in first["preloads"]

    def which() -> str:
        with BlockingClient(daemon.socket) as client:
            return str(client.request_proxy("versioned").call("which"))

    assert which() == "1.0.0"
    echo = daemon.worker_pids()["echo"]
    # An upgrade: new code, new version in the manifest. (Of another length: the same
    # second and size would let the interpreter take the old cached bytecode.)
    install_versioned(modules, "1.10.0")
    daemon.ctl("reload")
    assert which() == "1.10.0"
    replaced = daemon.wait_for("forkserver.replaced")
    assert (replaced["pid"], replaced["exit_status"]) == (first["pid"], 0)
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert status["modules"]["versioned"]["version"] == "1.10.0"
    assert status["daemon"]["forkserver_pid"] not in (None, first["pid"])
    assert status["daemon"]["workers_spawned"] == 0  # forks asked meanwhile waited for it
    assert daemon.worker_pids()["echo"] == echo  # unchanged: still the same worker
    assert not alive(first["pid"])
    assert daemon.events("forkserver.exited") == []  # a replacement, not a crash
    assert zombies_among(children_of(daemon.proc.pid)) == []  # every fork's reply was read


def test_a_fork_answered_too_late_is_killed_and_reaped(start_daemon: Start) -> None:
    """A fork whose request timed out (the worker was spawned instead) leaves no orphan."""
    daemon = start_daemon()
    standby = daemon.wait_for("worker.standby_ready", lambda r: r["module"] == "echo")
    server = daemon.wait_for("forkserver.started")["pid"]
    os.kill(server, signal.SIGSTOP)
    try:
        os.kill(daemon.worker_pids()["echo"], signal.SIGKILL)  # its replacement standby: a fork
        daemon.wait_for("forkserver.fork_failed", lambda r: r["module"] == "echo")
    finally:
        os.kill(server, signal.SIGCONT)
    late = daemon.wait_for("forkserver.late_fork")
    # Reaped, not left a zombie: a zombie is "not alive" a moment before it is reaped.
    wait_until(lambda: late["worker_pid"] not in children_of(daemon.proc.pid))
    assert not alive(late["worker_pid"])
    # The standby asked for meanwhile was spawned instead: the module has one again.
    spawned = daemon.wait_for("worker.standby_ready", lambda r: r["module"] == "echo"
                              and r["worker_pid"] != standby["worker_pid"])  # fmt: skip
    assert spawned["worker_pid"] != late["worker_pid"]


def test_fork_server_preloads_only_trusted_modules(start_daemon: Start, tmp_path: Path) -> None:
    """The fork server imports shipped and trusted modules, never those of other directories."""
    config = write_config(tmp_path, FAULTY, modules="[modules.echo]\n[modules.faulty]\n")
    daemon = start_daemon(config)
    started = daemon.wait_for("forkserver.started")
    assert started["preloads"] == [f"{REPO / 'workers' / 'modules'}:ipa_modules.echo"]
    trusted = write_config(
        tmp_path,
        f'{FAULTY}trusted_module_dirs = ["{TEST_MODULES}"]\n',
        modules="[modules.faulty]\n",
    )
    other = start_daemon(trusted, env={**daemon.env, "IPAD_SOCKET": str(tmp_path / "b.sock")})
    started = other.wait_for("forkserver.started")
    assert started["preloads"] == [f"{TEST_MODULES}:ipad_test_modules.faulty"]
