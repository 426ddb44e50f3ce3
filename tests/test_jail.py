"""The jail (ipad/worker/jail.py) and the launcher's side of it, with real processes and no daemon.

The launcher spawns the jail, reads the worker's pid from it and adopts the
worker only if it is a child of ours that nobody holds; a jail that exits
without a word, lies, says something else or takes too long is a failed
start (OSError) that leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from ipad.daemon.children import Children
from ipad.daemon.launcher import Launcher
from ipad.daemon.reactor import Reactor, Timers
from ipad.daemon.worker_process import WorkerProcess
from ipad.protocol import wire as p
from tests.daemon_process import alive, children_of, zombie_children

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace without a user one needs root"),
]

#: A jail that does what the test says instead of starting a worker.
FAKE_JAIL = """
import socket, sys, time
from ipad.protocol import wire as p
from ipad.protocol.fdpass import send_packet
control = socket.socket(fileno=3)
mode = sys.argv[1]
if mode == "lie":
    send_packet(control, p.encode(p.Spawned(int(sys.argv[2]))))
elif mode == "garbage":
    control.send(b"\\xff" * 24)
elif mode == "hang":
    time.sleep(60)
elif mode == "orphan":  # a clone it dies before naming
    from ipad.worker.forkserver import fork_sibling
    if fork_sibling() == 0:
        time.sleep(60)
"""


@pytest.fixture
async def launcher() -> AsyncIterator[Launcher]:
    """A launcher on a running reactor and timers; every child it left is reaped after."""
    reactor, timers = Reactor(), Timers()
    children = Children(reactor)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await nursery.start(timers.run)
        yield Launcher(None, children, timers)
        await children.close()
        nursery.cancel_scope.cancel()
    reactor.close()


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a condition while the reactor runs (it reaps what the condition waits for)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


#: A worker that waits (the arguments the daemon adds are the shell's $0 and $1).
SLEEPER = ["/bin/sh", "-c", "sleep 30; :"]


def spec() -> p.SandboxSpec:
    """A PID namespace and the seccomp filter: what needs the jail's clone."""
    return p.SandboxSpec(module="t", pid_namespace=True, no_new_privs=True, seccomp=True)


def ns_pid(pid: int) -> list[str]:
    """The process's pid in each PID namespace it is in, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    raise AssertionError("no NSpid")


async def test_the_jail_starts_the_worker_as_pid_1_and_a_child_of_ours(launcher: Launcher) -> None:
    """The worker is our child, pid 1 of its namespace, its own group; the jail is reaped."""
    worker = await launcher.launch("t", SLEEPER, {}, lambda _: None, spec())
    try:
        assert ns_pid(worker.pid) == [str(worker.pid), "1"]
        assert worker.pid in children_of(os.getpid())
        await until(lambda: os.getpgid(worker.pid) == worker.pid)  # before the jail exits
        assert launcher.children.holds(worker.pid)
        cmdline = Path(f"/proc/{worker.pid}/cmdline")
        await until(lambda: cmdline.read_bytes().startswith(b"/bin/sh\0"))
        assert cmdline.read_bytes().split(b"\0")[3:5] == [b"--parent-pid", b"0"]
        await until(lambda: len(launcher.children) == 1)  # the jail exited and was reaped
        assert zombie_children(os.getpid()) == []
    finally:
        worker.kill()
        with trio.fail_after(10):
            status = await worker.wait_exit()
        worker.close()
    assert status.signal == signal.SIGKILL


async def test_sigterm_ends_a_python_worker_that_is_pid_1(launcher: Launcher) -> None:
    """The first process of a namespace ignores a signal it has no handler for: the worker host installs one for SIGTERM."""
    argv = [sys.executable, "-I", "-m", "ipad.worker.host"]
    worker = await launcher.launch("t", argv, {}, lambda _: None, spec())
    await trio.sleep(0.5)  # past its start-up, where the handler is installed
    worker.signal(signal.SIGTERM)
    with trio.fail_after(10):
        status = await worker.wait_exit()
    worker.close()
    assert status.code == 128 + signal.SIGTERM


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("exit", "exited before it started the worker"),
        ("garbage", "the jail said something else"),
        ("hang", "did not start the worker within 1s"),
        ("lie-init", "not a child of the daemon"),
        ("orphan", "exited before it started the worker"),  # its group was killed with it
    ],
)
async def test_a_jail_that_fails_or_lies_is_a_failed_start(
    launcher: Launcher, mode: str, error: str
) -> None:
    """Silence, garbage, no answer in time, a pid not ours: OSError, and nothing is left running."""
    argv = [sys.executable, "-c", FAKE_JAIL, *(["lie", "1"] if mode == "lie-init" else [mode])]
    with pytest.raises(OSError, match=error):
        await launcher._spawn_jailed("t", argv, {}, lambda _: None, None, 1.0)
    await until(lambda: len(launcher.children) == 0)
    assert children_of(os.getpid()) == []  # nothing alive, no zombie: all reaped
    assert alive(1)


async def test_a_jail_naming_a_worker_already_held_touches_it_not(launcher: Launcher) -> None:
    """A pid the daemon holds already is refused, and that worker is not harmed."""
    other = await launcher.launch("t", SLEEPER, {}, lambda _: None, spec())
    argv = [sys.executable, "-c", FAKE_JAIL, "lie", str(other.pid)]
    with pytest.raises(OSError, match="a worker already"):
        await launcher._spawn_jailed("t", argv, {}, lambda _: None, None, 5.0)
    assert alive(other.pid)
    other.kill()
    with trio.fail_after(10):
        await other.wait_exit()
    other.close()


@pytest.mark.parametrize("after", [0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15])
async def test_cancelled_while_the_jail_answers_leaves_nothing(
    launcher: Launcher, after: float
) -> None:
    """A launch cancelled at any point of the jail's work leaves no process and no zombie."""
    started: list[WorkerProcess] = []
    with trio.move_on_after(after):
        started.append(await launcher.launch("t", SLEEPER, {}, lambda _: None, spec()))
    for worker in started:  # it won the race: ours to end
        worker.kill()
        with trio.fail_after(10):
            await worker.wait_exit()
        worker.close()
    await until(lambda: children_of(os.getpid()) == [])  # no zombie either: all reaped
    assert len(launcher.children) == 0
