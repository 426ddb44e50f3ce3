"""Isolation per proxy (``isolation = "proxy"``) with real daemons, workers and SIGKILLs.

Every proxy of such a module has a worker of its own: a crash one client
causes invalidates only that client's proxy, calls for different proxies run
at once in different processes, and releasing a proxy ends its worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.config.sandbox_plan import memory_support
from tests.client_drivers import Connect, Start, connect
from tests.daemon_process import (
    TEST_MODULES,
    DaemonProcess,
    Record,
    Via,
    alive,
    open_fds,
    wait_until,
    write_config,
)

__all__ = ["connect"]  # the fixture

pytestmark = pytest.mark.timeout(120)

DIRS = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n'


def config(tmp_path: Path, isolation: str = "proxy", restart: str = "") -> Path:
    """A daemon with the ``percam`` module only, isolated as asked."""
    module = f'[modules.percam]\nisolation = "{isolation}"\n'
    if restart:
        module += f"[modules.percam.restart]\n{restart}\n"
    return write_config(tmp_path, DIRS, modules=module)


def status(daemon: DaemonProcess) -> dict[str, Any]:
    """``percam``'s entry of ``ipadctl --json status``."""
    return dict(json.loads(daemon.ctl("--json", "status").stdout)["modules"]["percam"])


def invalidated(daemon: DaemonProcess, proxy_id: int) -> list[Record]:
    """The times the daemon published ``proxy_id`` invalid."""
    return [
        r
        for r in daemon.events("proxy.state_changed")
        if r.get("proxy_id") == proxy_id and r.get("state") == "invalid"
    ]


def wait_gone(pids: Iterable[int]) -> None:
    """Wait until every one of ``pids`` has ended."""
    wait_until(lambda: not any(alive(pid) for pid in pids))


def kill_and_wait(pid: int) -> None:
    """SIGKILL a worker and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid))


def test_a_crash_invalidates_only_the_proxy_whose_worker_it_was(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Two proxies get two workers; SIGKILL or a crashing method ends one, the other never notices.

    The crashed proxy comes back on a new worker of its own, its setup call
    replayed; the other's calls succeed throughout, on the same worker.
    """
    daemon = start_daemon(config(tmp_path))
    client = connect(daemon.socket)
    a = client.request_proxy("percam")
    b = client.request_proxy("percam")
    client.call(a, "set_camera", {"camera": "front"})
    client.call(b, "set_camera", {"camera": "back"})
    pid_a, pid_b = client.call(a, "pid"), client.call(b, "pid")
    assert pid_a != pid_b
    entry = status(daemon)
    assert entry["isolation"] == "proxy"
    assert entry["state"] == "running"
    assert sorted(w["worker_pid"] for w in entry["workers"]) == sorted([pid_a, pid_b])
    assert entry["standby_pid"] not in (None, pid_a, pid_b)  # the warm spare
    table = daemon.ctl("status").stdout
    for proxy, pid in ((a, pid_a), (b, pid_b)):
        line = f"  proxy {client.attr(proxy, 'proxy_id')}"
        [row] = [row for row in table.splitlines() if row.startswith(line)]
        assert row.split()[2:4] == ["running", str(pid)]

    b_id = client.attr(b, "proxy_id")
    for crash in ("sigkill", "method"):
        if crash == "sigkill":
            kill_and_wait(pid_a)
        else:
            with pytest.raises(ipc.WorkerCrashed):
                client.call(a, "crash")
        for _ in range(20):  # a's worker is dead or restarting meanwhile
            assert client.call(b, "camera") == "back"
        assert client.call(a, "camera") == "front"  # set_camera replayed on a new worker
        new_a = client.call(a, "pid")
        assert new_a not in (pid_a, pid_b)
        pid_a = new_a
        assert client.call(b, "pid") == pid_b
    a_id = client.attr(a, "proxy_id")
    # The log is read by a thread of its own: wait until it has reached both crashes.
    wait_until(lambda: len(invalidated(daemon, a_id)) >= 2)
    assert len(invalidated(daemon, a_id)) == 2
    assert invalidated(daemon, b_id) == []
    assert status(daemon)["state"] == "running"
    module_events = [r for r in daemon.events("module.state_changed") if r["module"] == "percam"]
    assert [r["state"] for r in module_events if r["state"] != "running"] == ["starting"]


def overlapping_calls(daemon: DaemonProcess) -> list[list[float]]:
    """Two clients' ``slow`` calls, started together: each one's [start, end] in its worker."""
    clients = [BlockingClient(daemon.socket) for _ in range(2)]
    try:
        proxies = [c.request_proxy("percam") for c in clients]
        barrier = threading.Barrier(2, timeout=10)
        spans: list[list[float]] = [[], []]

        def run(index: int) -> None:
            barrier.wait()
            spans[index] = proxies[index].call("slow", {"seconds": 0.5}, timeout=10)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert all(len(span) == 2 for span in spans), spans
        return spans
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("isolation", ["proxy", "module"])
def test_calls_on_two_proxies_run_in_parallel_only_with_a_worker_each(
    start_daemon: Start, tmp_path: Path, isolation: str
) -> None:
    """With a worker per proxy two slow calls overlap in time; sharing one worker they cannot."""
    daemon = start_daemon(config(tmp_path, isolation))
    (s1, e1), (s2, e2) = overlapping_calls(daemon)
    overlap = min(e1, e2) > max(s1, s2)
    assert overlap is (isolation == "proxy"), [[s1, e1], [s2, e2]]


def test_releasing_a_proxy_ends_its_worker_and_leaves_nothing_behind(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A released proxy's worker is reaped, crashed or not; the daemon's descriptors are as before."""
    daemon = start_daemon(config(tmp_path))
    with BlockingClient(daemon.socket) as client:
        first = client.request_proxy("percam")
        first.release()
        wait_until(lambda: status(daemon)["standby_pid"] is not None)
        baseline = open_fds(daemon.proc.pid)
        pids = []
        for round_ in range(6):
            proxy = client.request_proxy("percam")
            pids.append(proxy.call("pid"))
            if round_ % 2:  # every other one crashes first and recovers on a new worker
                kill_and_wait(pids[-1])
                pids.append(proxy.call("pid"))
            proxy.release()
        wait_gone(pids)
        wait_until(lambda: status(daemon)["workers_ending"] == 0)
        entry = status(daemon)
        assert entry["workers"] == []
        assert entry["proxies"] == 0
        wait_until(lambda: status(daemon)["standby_pid"] is not None)
        wait_until(lambda: open_fds(daemon.proc.pid) <= baseline)
    ended = {r["worker_pid"] for r in daemon.events("worker.exited")}
    assert set(pids) <= ended


def test_a_client_that_leaves_takes_its_workers_with_it(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A client that disconnects without releasing: its proxies' workers end, others stay."""
    daemon = start_daemon(config(tmp_path))
    with BlockingClient(daemon.socket) as stays:
        kept = stays.request_proxy("percam")
        kept_pid = kept.call("pid")
        leaving = BlockingClient(daemon.socket)
        pids = [leaving.request_proxy("percam").call("pid") for _ in range(3)]
        leaving.close()
        wait_gone(pids)
        assert kept.call("pid") == kept_pid
        assert [w["worker_pid"] for w in status(daemon)["workers"]] == [kept_pid]


@pytest.mark.parametrize("via", ["sigterm", "ipadctl"])
def test_stop_ends_every_per_proxy_worker_cleanly(
    start_daemon: Start, tmp_path: Path, via: Via
) -> None:
    """SIGTERM or ``ipadctl stop`` with per-proxy workers serving: clean exit, none left."""
    daemon = start_daemon(config(tmp_path))
    client = BlockingClient(daemon.socket, reconnect=False)
    try:
        proxies = [client.request_proxy("percam") for _ in range(3)]
        pids = [p.call("pid") for p in proxies]
        report = daemon.stop_cleanly(via)
        report.check()
        assert not any(alive(pid) for pid in pids)
    finally:
        client.close()


def test_restart_restarts_every_worker_and_each_proxy_recovers(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """``ipadctl restart`` replaces each proxy's worker; each recovers with its own setup."""
    daemon = start_daemon(config(tmp_path))
    client = connect(daemon.socket)
    proxies = [client.request_proxy("percam") for _ in range(2)]
    for index, proxy in enumerate(proxies):
        client.call(proxy, "set_camera", {"camera": f"cam{index}"})
    before = [client.call(proxy, "pid") for proxy in proxies]
    daemon.ctl("restart", "percam")
    wait_gone(before)
    after = [client.call(proxy, "pid") for proxy in proxies]
    assert set(after).isdisjoint(before)
    assert len(set(after)) == 2
    assert [client.call(p, "camera") for p in proxies] == ["cam0", "cam1"]


@pytest.mark.parametrize(("before", "after"), [("proxy", "module"), ("module", "proxy")])
def test_a_reload_that_changes_isolation_moves_the_proxies(
    start_daemon: Start, tmp_path: Path, before: str, after: str
) -> None:
    """A reload that changes ``isolation`` restarts the module; proxies recover in the new mode."""
    path = config(tmp_path, before)
    daemon = start_daemon(path)
    workers = {"proxy": 2, "module": 1}
    with BlockingClient(daemon.socket) as client:
        proxies = [client.request_proxy("percam") for _ in range(2)]
        for index, proxy in enumerate(proxies):
            proxy.call("set_camera", {"camera": f"cam{index}"})
        old = {proxy.call("pid") for proxy in proxies}
        assert len(old) == workers[before]
        path.write_text(config(tmp_path, after).read_text())
        daemon.ctl("reload")
        wait_gone(old)
        new = {proxy.call("pid") for proxy in proxies}
        assert len(new) == workers[after]
        assert new.isdisjoint(old)
        assert [p.call("camera") for p in proxies] == ["cam0", "cam1"]
        assert status(daemon)["isolation"] == after


def test_a_client_crash_looping_its_worker_is_contained_to_its_proxy(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A crash loop puts one proxy in backoff, then cooldown; the module and the others go on.

    The other client's calls succeed throughout, new proxies are granted at
    once, and the module never leaves "running".
    """
    restart = 'initial_delay = "20ms"\nmax_failures = 3\ncooldown_interval = "30s"'
    daemon = start_daemon(config(tmp_path, restart=restart))
    victim_client, bad = connect(daemon.socket), connect(daemon.socket)
    victim = victim_client.request_proxy("percam")
    victim_client.call(victim, "set_camera", {"camera": "steady"})
    victim_pid = victim_client.call(victim, "pid")
    hostile = bad.request_proxy("percam")
    hostile_id = bad.attr(hostile, "proxy_id")
    crashed = refused = 0
    for _ in range(8):
        try:
            bad.call(hostile, "crash", timeout=2)
        except (ipc.CallNotSent, ipc.TimedOut):
            refused += 1  # its own worker is in cooldown: the loop is contained
        except ipc.WorkerCrashed:
            crashed += 1
        assert victim_client.call(victim, "camera") == "steady"
    assert crashed >= 3
    assert refused > 0

    def hostile_in_cooldown() -> bool:
        cells = {w["proxy_id"]: w for w in status(daemon)["workers"]}
        return bool(cells.get(hostile_id, {}).get("state") == "cooldown")

    wait_until(hostile_in_cooldown)
    assert status(daemon)["state"] == "running"
    cooldowns = daemon.events("module.cooldown")  # logged by the proxy's worker, naming it
    assert cooldowns
    assert {r.get("proxy_id") for r in cooldowns} == {hostile_id}
    newcomer = connect(daemon.socket)
    assert newcomer.call(newcomer.request_proxy("percam"), "camera") == ""
    assert victim_client.call(victim, "pid") == victim_pid
    assert invalidated(daemon, victim_client.attr(victim, "proxy_id")) == []
    module_states = {r["state"] for r in daemon.events("module.state_changed")}
    assert module_states <= {"starting", "running"}


def test_a_hung_call_kills_only_that_proxys_worker(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A call past call_timeout is hang detection's: that worker dies, the other proxy's runs on."""
    restart = 'call_timeout = "300ms"'
    daemon = start_daemon(config(tmp_path, restart=restart))
    client = connect(daemon.socket)
    stuck, fine = client.request_proxy("percam"), client.request_proxy("percam")
    stuck_pid, fine_pid = client.call(stuck, "pid"), client.call(fine, "pid")
    with pytest.raises((ipc.WorkerCrashed, ipc.TimedOut)):
        client.call(stuck, "slow", {"seconds": 5.0}, timeout=3.0)
    wait_gone([stuck_pid])
    hung = [r for r in daemon.events("worker.hung") if r.get("worker_pid") == stuck_pid]
    assert hung, "the stuck worker was not found hung"
    assert client.call(fine, "pid") == fine_pid
    assert invalidated(daemon, client.attr(fine, "proxy_id")) == []
    assert client.call(stuck, "pid") not in (stuck_pid, fine_pid)  # recovered


#: A memory limit needs a memory controller (cgroup v2 or v1) this daemon may write.
MEMORY = memory_support().version is not None

SANDBOXED = """
[modules.probe]
proxy = "sandboxed"
isolation = "proxy"
[modules.probe.sandbox]
memory_max = "64M"
"""


@pytest.mark.skipif(not MEMORY, reason="needs a writable memory cgroup controller (v2 or v1)")
def test_each_proxys_worker_has_its_own_sandbox_and_memory_limit(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Sandboxed and per proxy: each worker is confined alone; one over its memory dies alone."""
    daemon = start_daemon(write_config(tmp_path, DIRS, modules=SANDBOXED))
    with BlockingClient(daemon.socket) as client:
        greedy, modest = client.request_proxy("probe"), client.request_proxy("probe")
        inside = [proxy.call("report") for proxy in (greedy, modest)]
        assert [r["pid"] for r in inside] == [1, 1]  # each in a PID namespace of its own
        entry = json.loads(daemon.ctl("--json", "status").stdout)["modules"]["probe"]
        outside = {w["proxy_id"]: w["worker_pid"] for w in entry["workers"]}
        greedy_pid, modest_pid = outside[greedy.proxy_id], outside[modest.proxy_id]
        assert greedy_pid != modest_pid
        assert entry["sandbox"]["in_force"]["memory_max"] == 64 << 20
        with pytest.raises(ipc.WorkerCrashed):
            greedy.call("allocate", {"mib": 256}, timeout=20)
        exited = daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == greedy_pid)
        assert (exited["cause"], exited["memory_max"]) == ("oom", 64 << 20)
        assert modest.call("report")["pid"] == 1
        assert alive(modest_pid)
        assert invalidated(daemon, modest.proxy_id) == []
        assert greedy.call("report")["pid"] == 1  # recovered, on a new worker


def test_workers_are_bounded_by_the_proxy_limits(start_daemon: Start, tmp_path: Path) -> None:
    """A client asking for proxy after proxy gets limit_exceeded, not a worker, past its limit."""
    module = '[modules.percam]\nisolation = "proxy"\n'
    daemon = start_daemon(
        write_config(tmp_path, f"{DIRS}[clients]\nmax_proxies_per_client = 3\n", modules=module)
    )
    with BlockingClient(daemon.socket) as greedy:
        held = [greedy.request_proxy("percam") for _ in range(3)]
        with pytest.raises(ipc.LimitExceeded):
            greedy.request_proxy("percam")
        wait_until(lambda: status(daemon)["standby_pid"] is not None)  # the next spare
        entry = status(daemon)
        assert entry["workers_total"] == len(held) == 3
        forked = [r for r in daemon.events("worker.forked") if r.get("module") == "percam"]
        assert len(forked) == 4  # three proxies' workers and one spare: none for the refusal


def test_stop_is_clean_with_one_worker_in_backoff_and_one_in_a_call(
    start_daemon: Start, tmp_path: Path
) -> None:
    """SIGTERM while one proxy's worker waits out a backoff and another runs a slow call."""
    daemon = start_daemon(config(tmp_path, restart='initial_delay = "5s"'))
    crashing = BlockingClient(daemon.socket, reconnect=False)
    busy = BlockingClient(daemon.socket, reconnect=False)
    try:
        loser = crashing.request_proxy("percam")
        worker = busy.request_proxy("percam")
        for _ in range(2):  # the first restart is immediate, the second waits 5 s
            with pytest.raises(ipc.WorkerCrashed):
                loser.call("crash", timeout=10)
        loser_id = loser.proxy_id
        wait_until(
            lambda: (
                {w["proxy_id"]: w["state"] for w in status(daemon)["workers"]}.get(loser_id)
                == "backoff"
            )
        )
        outcome: list[BaseException | object] = []

        def slow_call() -> None:
            try:
                outcome.append(worker.call("slow", {"seconds": 5.0}, timeout=10))
            except ipc.IpadError as exc:
                outcome.append(exc)

        pid = worker.call("pid")
        slow = threading.Thread(target=slow_call, daemon=True)
        slow.start()
        time.sleep(0.3)  # the CALL is in the worker by then (a round trip takes < 1 ms)
        report = daemon.stop_cleanly("sigterm")
        report.check()
        slow.join(10)
        assert not slow.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], ipc.IpadError), outcome  # ended by the stop, not finished
        assert not alive(pid)
    finally:
        crashing.close()
        busy.close()
