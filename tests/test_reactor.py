"""One task for every worker's descriptors and timers, and the reaper built on it, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from ipad.daemon import cgroup as _cgroup
from ipad.daemon.children import Children, child_pidfd
from ipad.daemon.reactor import Reactor, Timers
from ipad.daemon.worker_process import WorkerProcess
from tests.daemon_process import alive

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def reactor() -> AsyncIterator[Reactor]:
    """A running reactor, closed after the test."""
    watched = Reactor()
    async with trio.open_nursery() as nursery:
        await nursery.start(watched.run)
        yield watched
        nursery.cancel_scope.cancel()
    watched.close()


async def test_a_readable_descriptor_gets_its_callback(reactor: Reactor) -> None:
    """A pipe with data calls back; removed, it calls back no more."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    seen: list[bytes] = []
    done = trio.Event()

    def readable() -> None:
        seen.append(os.read(read_end, 100))
        done.set()

    try:
        reactor.add(read_end, readable)
        os.write(write_end, b"one")
        with trio.fail_after(5):
            await done.wait()
        reactor.remove(read_end)
        os.write(write_end, b"two")
        await trio.sleep(0.05)
        assert seen == [b"one"]
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_a_callback_that_raises_is_dropped_and_the_rest_carry_on(reactor: Reactor) -> None:
    """A bug met by one descriptor's callback costs only that descriptor."""
    bad_r, bad_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    good_r, good_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    good = trio.Event()

    def broken() -> None:
        raise RuntimeError("a bug")

    def fine() -> None:
        os.read(good_r, 100)
        good.set()

    try:
        reactor.add(bad_r, broken)
        reactor.add(good_r, fine)
        os.write(bad_w, b"x")
        await trio.sleep(0.05)
        assert len(reactor) == 1  # the broken one is gone
        os.write(good_w, b"x")
        with trio.fail_after(5):
            await good.wait()
    finally:
        for fd in (bad_r, bad_w, good_r, good_w):
            os.close(fd)


async def test_timers_fire_in_order_and_cancelled_ones_never(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Deadlines are served in order by one task; a cancelled timer is skipped."""
    timers = Timers()
    fired: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        start = trio.current_time()
        timers.call_at(start + 3, lambda: fired.append("c"))
        timers.call_at(start + 1, lambda: fired.append("a"))
        timers.call_later(2, lambda: fired.append("b")).cancel()
        timers.call_later(2.5, lambda: fired.append("b2"))
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert fired == ["a", "b2", "c"]


def _sleeper() -> WorkerProcess:
    """A real child process that sleeps, leading its own process group."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            process_group=0)  # fmt: skip
    pidfd = os.pidfd_open(proc.pid)
    proc.returncode = 0  # the reaper reaps it, not Popen
    return WorkerProcess("m", proc.pid, pidfd, None)


async def test_the_reaper_reaps_a_killed_child_and_says_how_it_ended(reactor: Reactor) -> None:
    """A SIGKILLed child is reaped through its pidfd, with its signal, and no zombie stays."""
    children = Children(reactor)
    child = _sleeper()
    ended: list[WorkerProcess] = []
    children.adopt(child, ended.append)
    assert child in children
    os.kill(child.pid, signal.SIGKILL)
    with trio.fail_after(5):
        status = await child.wait_exit()
    assert status.signal == signal.SIGKILL
    assert ended == [child]
    assert child not in children
    assert not Path(f"/proc/{child.pid}").exists()  # reaped: no zombie left
    child.close()


async def test_the_reaper_kills_what_the_child_left_in_its_group(reactor: Reactor) -> None:
    """When a worker exits, a grandchild still in its process group is killed before the reap."""
    children = Children(reactor)
    script = ("import os, sys, time\n"
              "if os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
              "time.sleep(60)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], process_group=0)
    proc.returncode = 0
    worker = WorkerProcess("m", proc.pid, os.pidfd_open(proc.pid), None)
    children.adopt(worker)
    deadline = time.monotonic() + 10
    while len(_group(proc.pid)) < 2 and time.monotonic() < deadline:
        await trio.sleep(0.01)
    grandchild = next(pid for pid in _group(proc.pid) if pid != proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    with trio.fail_after(5):
        await worker.wait_exit()
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        await trio.sleep(0.01)
    assert not alive(grandchild)
    worker.close()


async def test_signals_after_the_reap_reach_nobody(reactor: Reactor) -> None:
    """Once reaped, a worker is never signalled again: not by pidfd, not by its old group id."""
    children = Children(reactor)
    child = _sleeper()
    children.adopt(child)
    child.kill()
    with trio.fail_after(5):
        await child.wait_exit()
    pidfd = child.pidfd
    child.signal(signal.SIGTERM)  # a no-op: it was reaped
    assert child.pidfd == pidfd
    child.close()


async def test_close_kills_and_reaps_every_child_left() -> None:
    """The reaper's last word: every child still there is killed and reaped, within its bound."""
    reactor = Reactor()
    children = Children(reactor)
    kids = [_sleeper() for _ in range(3)]
    for kid in kids:
        children.adopt(kid)
    with trio.fail_after(10):
        await children.close()
    for kid in kids:
        assert kid.exit_status is not None
        assert kid.exit_status.signal == signal.SIGKILL
    assert len(children) == 0
    reactor.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="making cgroups needs root (or delegation)")
async def test_a_cgroup_is_waited_empty_by_inotify_then_removed() -> None:
    """clear_cgroup kills what is in a cgroup, is woken by cgroup.events, and removes it."""
    cgroups = _cgroup.WorkerCgroups.create()
    if cgroups is None:
        pytest.skip("no writable cgroup2 hierarchy here")
    try:
        path = cgroups.base / "probe.1"
        path.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        assert _cgroup.WorkerCgroups.move(path, proc.pid)
        with trio.fail_after(10):
            await _cgroup.clear_cgroup(path)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not path.exists()
    finally:
        with trio.fail_after(10):
            await cgroups.aclose()
    assert not cgroups.base.exists()


def _group(pgid: int) -> list[int]:
    """The live processes whose process group is ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_only_a_child_of_ours_is_taken_for_a_fork() -> None:
    """A SPAWNED naming a process that is not the daemon's child is refused, and nothing is sent.

    The daemon signals and reaps only its own children: a fork server gone wrong
    cannot make it kill init or its own parent.
    """
    with pytest.raises(ChildProcessError):
        child_pidfd(os.getppid())
    with pytest.raises(ChildProcessError):
        child_pidfd(1)
    with pytest.raises(ProcessLookupError):
        child_pidfd(0)
    child = _sleeper()
    try:
        pidfd = child_pidfd(child.pid)
        os.close(pidfd)
    finally:
        child.kill()
        os.waitpid(child.pid, 0)
        os.close(child.pidfd)
        child.pidfd = -1  # waited for above
        child.close()
    assert Children(Reactor()).adopt_pid(1, "unknown") is None
