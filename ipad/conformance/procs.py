"""Processes the kit starts, each with one owner here that kills and reaps it.

A peer under test is untrusted and may fork, ignore signals or never exit:
every process starts as the leader of its own process group, so killing the
group takes what it forked, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import resource
import select
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

from ipad.conformance.peer import wait_fd
from ipad.protocol.fdpass import CONTROL_FD

#: prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: Bytes a peer may write to its stdout and stderr (a file): past it, SIGXFSZ ends it.
MAX_OUTPUT = 64 * 1024 * 1024
#: Where the descriptors the child gets are first duplicated to, above every target number.
_ABOVE = 10


def prctl(option: int, value: int) -> int:
    """The prctl system call with one argument; -1 on failure."""
    return int(ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0))


def become_subreaper() -> None:
    """Orphans of our children come to us: a worker whose parent the kit killed is ours to reap."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def resolve(command: str) -> str:
    """The executable's path, as a shell finds it; ValueError if there is none."""
    if "/" in command:
        return command
    found = shutil.which(command)
    if found is None:
        raise ValueError(f"{command!r} not found in PATH")
    return found


class Child:
    """A process the kit started and owns: it leads its own group; ``kill`` reaps it."""

    def __init__(self, pid: int, what: str) -> None:
        self.pid = pid
        self.what = what
        self.pidfd = os.pidfd_open(pid)
        #: The wait status once reaped.
        self.status: int | None = None

    def wait(self, deadline: float) -> int | None:
        """The exit status if it ended before ``deadline`` (reaped), else None."""
        if self.status is not None:
            return self.status
        if not wait_fd(self.pidfd, select.POLLIN, deadline):
            return None
        return self._reap()

    def _reap(self) -> int | None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # not our child (never happens for what we started)
            status = 0
        self.status = status
        os.close(self.pidfd)
        return status

    def alive(self) -> bool:
        """Whether it has not ended yet."""
        return self.status is None and not wait_fd(self.pidfd, select.POLLIN, 0.0)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to its whole group (what it forked too)."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signum)

    def kill(self) -> int:
        """SIGKILL its group and reap it; its wait status."""
        if self.status is None:
            self.signal(signal.SIGKILL)
            self._reap()
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)  # what it forked may outlive it
        assert self.status is not None  # noqa: S101 - reaped just now
        return self.status


def limit_output(pid: int, size: int) -> None:
    """Let ``pid`` write at most ``size`` bytes to a file (its output goes to one): SIGXFSZ past it.

    A peer's output is kept in a temporary file to show its end on a failure;
    one that writes without end must not fill the disk.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, size))


def describe_status(status: int | None) -> str:
    """A wait status in words."""
    if status is None:
        return "still running"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def exited_cleanly(status: int | None) -> bool:
    """Whether it ended by exiting (any status) rather than by a signal."""
    return status is not None and os.WIFEXITED(status)


def spawn(
    argv: Sequence[str],
    env: dict[str, str],
    *,
    control: int | None = None,
    stdout: int | None = None,
    output: int,
    parent_pid: bool = False,
) -> int:
    """posix_spawn ``argv`` leading a new process group, as ipad's launcher does.

    ``control`` becomes fd 3; ``stdout`` fd 1 (else ``output``); ``output`` fd 2;
    fd 0 is /dev/null. With ``parent_pid``, ``--parent-pid <our pid>`` is appended.
    """
    sources: list[int] = []
    try:
        targets = {1: stdout if stdout is not None else output, 2: output}
        if control is not None:
            targets[CONTROL_FD] = control
        actions: list[tuple[object, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        for target, fd in targets.items():
            # Fresh numbers above every target: dup2 onto the same number would keep
            # close-on-exec, and a source numbered as a target would be overwritten.
            source = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _ABOVE)
            sources.append(source)
            actions.append((os.POSIX_SPAWN_DUP2, source, target))
        args = [*argv, "--parent-pid", str(os.getpid())] if parent_pid else list(argv)
        return os.posix_spawn(
            resolve(argv[0]),
            args,
            env,
            file_actions=actions,
            setpgroup=0,
            setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE),
        )
    finally:
        for fd in sources:
            os.close(fd)


def spawn_orphanable(
    argv: Sequence[str], env: dict[str, str], *, control: int, output: int, deadline: float
) -> tuple[Child, Child]:
    """Start ``argv`` as the child of a go-between process the kit can kill: (go-between, worker).

    The worker's ``--parent-pid`` names the go-between; once the kit kills it,
    the worker must exit (parent death). The kit is a subreaper, so the
    orphaned worker is re-parented to it and reaped here.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the go-between: start the worker, say its pid, wait to be killed
        code = 1
        try:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            os.setpgid(0, 0)
            worker = spawn(argv, env, control=control, output=output, parent_pid=True)
            os.write(write_end, f"{worker}\n".encode())
            while True:
                signal.pause()
        except BaseException:  # noqa: BLE001 - the go-between must never return into the kit
            code = 2
        finally:
            os._exit(code)
    go_between = Child(pid, "go-between")
    os.close(write_end)
    try:
        if not wait_fd(read_end, select.POLLIN, deadline):
            go_between.kill()
            raise TimeoutError("the go-between did not start the worker")
        text = os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
    if not text.strip().isdigit():
        go_between.kill()
        raise OSError(
            f"the go-between could not start the worker ({describe_status(go_between.status)})"
        )
    return go_between, Child(int(text), "worker")


def kill_orphans() -> list[int]:
    """Kill and reap every child left: orphans a peer made, which came to us, the subreaper.

    A peer may fork a process that leaves its group (setsid); once the peer is
    killed, that process is re-parented here and must not outlive the kit.
    Returns the pids of those that still ran.
    """
    me = str(os.getpid())
    left: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] != me:
            continue
        pid = int(entry.name)
        if fields[0] != "Z":  # a zombie was killed with its group already: only reaped
            left.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    return left
