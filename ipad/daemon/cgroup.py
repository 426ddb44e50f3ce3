"""A cgroup per worker, where a writable cgroup2 hierarchy is ours to use.

A process group does not hold a grandchild that called setsid() and forked
again; a cgroup does, and ``cgroup.kill`` ends everything in it at once.
ipad creates ``ipad.<daemon pid>/<module>.<worker pid>`` below its own cgroup
(as root, or under systemd with Delegate=yes) and falls back to process groups,
saying so once, where it cannot.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import select
import signal
import time
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("ipad")

#: How long an emptied cgroup may take to report itself unpopulated before rmdir.
EMPTY_WAIT = 2.0
#: How often to look while waiting for that, only where inotify cannot tell us (no watches left).
EMPTY_POLL = 0.005

#: inotify(7): a watched file was modified; cgroup.events is, when "populated" changes.
IN_MODIFY = 0x2


def cgroup2_mount(mountinfo: str | None = None) -> Path | None:
    """Where the cgroup2 hierarchy is mounted (``/sys/fs/cgroup`` or, hybrid, ``.../unified``)."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    for line in text.splitlines():
        fields = line.split()
        if " - cgroup2 " in line and len(fields) > 4:
            return Path(fields[4])
    return None


def own_cgroup(proc_cgroup: str | None = None) -> str | None:
    """The cgroup2 path of the calling process (the ``0::`` line of /proc/self/cgroup)."""
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


class WorkerCgroups:
    """The daemon's cgroup subtree for its workers."""

    def __init__(self, base: Path) -> None:
        self.base = base
        #: Where other daemons' subtrees may be left (``clear_stale`` looks there).
        self.parent = base.parent
        #: Names cgroups made before their worker's pid is known (forked into them).
        self._serial = itertools.count(1)

    @classmethod
    def create(cls) -> WorkerCgroups | None:
        """Make ``ipad.<pid>`` below our cgroup, or return None (logged) if we cannot."""
        mount, own = cgroup2_mount(), own_cgroup()
        if mount is None or own is None:
            log.warning("cgroup.unavailable", reason="no cgroup2 hierarchy",
                        fallback="process groups")  # fmt: skip
            return None
        parent = mount / own.lstrip("/")
        base = parent / f"ipad.{os.getpid()}"
        try:
            base.mkdir()
        except OSError as exc:
            log.warning("cgroup.unavailable", reason=f"cannot create {base}: {exc.strerror}",
                        fallback="process groups")  # fmt: skip
            return None
        if not (base / "cgroup.kill").exists():
            log.warning("cgroup.kill_unavailable", cgroup=str(base),
                        fallback="SIGKILL to each process")  # fmt: skip
        log.info("cgroup.ready", cgroup=str(base))
        return cls(base)

    def _make(self, name: str) -> Path | None:
        """A new, empty cgroup below the daemon's; None (logged) if it cannot be made."""
        path = self.base / name
        try:
            path.mkdir()
        except OSError as exc:
            log.warning("cgroup.add_failed", cgroup=str(path), error=str(exc))
            return None
        return path

    def prepare(self, module: str) -> tuple[Path, int] | None:
        """A new, empty cgroup for a worker about to be forked into it, and its directory fd."""
        path = self._make(f"{module}.{next(self._serial)}")
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cgroup.add_failed", cgroup=str(path), error=str(exc))
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return path, fd

    @staticmethod
    def move(path: Path, pid: int) -> bool:
        """Move a process into a prepared cgroup (for when it could not be forked into it)."""
        try:
            (path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log.warning("cgroup.add_failed", cgroup=str(path), worker_pid=pid, error=str(exc))
            return False
        return True

    def add(self, module: str, pid: int) -> Path | None:
        """Move a just-started worker into a cgroup of its own; None if that failed."""
        path = self._make(f"{module}.{pid}")
        if path is None or self.move(path, pid):
            return path
        with contextlib.suppress(OSError):
            path.rmdir()
        return None

    @staticmethod
    def kill(path: Path) -> None:
        """SIGKILL everything in the cgroup, descendants that left the process group included."""
        try:
            (path / "cgroup.kill").write_text("1")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cgroup.kill_failed", cgroup=str(path), error=str(exc))
        else:
            return
        with contextlib.suppress(OSError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    async def aclose(self) -> None:
        """Remove the daemon's subtree (each worker's cgroup is removed as it ends)."""
        await clear_tree(self.base)


async def clear_cgroup(path: Path) -> None:
    """Kill everything in a worker's cgroup, wait until it is empty, and remove it.

    The kernel says when it is empty (cgroup.events, through inotify); rmdir of
    a cgroup can wait out an RCU grace period (~10 ms here), so it runs in a
    thread and never holds up the daemon or a restart.
    """
    WorkerCgroups.kill(path)
    await wait_empty(path, EMPTY_WAIT)
    try:
        await trio.to_thread.run_sync(path.rmdir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cgroup.remove_failed", cgroup=str(path), error=str(exc))


async def clear_tree(base: Path) -> None:
    """Kill everything in a daemon's subtree and remove it, off the event loop."""
    children = await trio.to_thread.run_sync(_subdirectories, base)
    async with trio.open_nursery() as nursery:
        for child in children:
            nursery.start_soon(clear_cgroup, child)
    try:
        await trio.to_thread.run_sync(base.rmdir)
    except OSError as exc:
        log.warning("cgroup.remove_failed", cgroup=str(base), error=str(exc))


async def wait_empty(path: Path, timeout: float) -> bool:
    """Until the cgroup has no process left; False if ``timeout`` passed first."""
    fd = _watch_events(path)
    try:
        with trio.move_on_after(timeout):
            while _populated(path):
                if fd is None:
                    await trio.sleep(EMPTY_POLL)
                else:
                    await trio.lowlevel.wait_readable(fd)
                    _drain(fd)
            return True
        return False
    finally:
        if fd is not None:
            os.close(fd)


def wait_empty_sync(path: Path, timeout: float) -> bool:
    """``wait_empty`` for code without trio (tests, the stale clean-up in its thread)."""
    fd = _watch_events(path)
    deadline = time.monotonic() + timeout
    try:
        while _populated(path):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if fd is None:
                time.sleep(min(EMPTY_POLL, left))
            elif select.select([fd], [], [], left)[0]:
                _drain(fd)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _watch_events(path: Path) -> int | None:
    """An inotify descriptor that wakes when ``path``'s cgroup.events changes; None if not."""
    libc = _libc()
    fd: int = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(path / "cgroup.events"), IN_MODIFY) < 0:
        os.close(fd)
        return None
    return fd


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC  # noqa: PLW0603 - loaded once, on first use
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _subdirectories(base: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [child for child in base.iterdir() if child.is_dir()]
    return []


def remove_tree(base: Path) -> None:
    """Kill everything in a daemon's subtree and remove it, blocking (stale trees, tests)."""
    children = _subdirectories(base)
    for child in children:
        WorkerCgroups.kill(child)
    deadline = time.monotonic() + EMPTY_WAIT
    for child in children:
        wait_empty_sync(child, max(deadline - time.monotonic(), 0))
        with contextlib.suppress(OSError):
            child.rmdir()
    try:
        base.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cgroup.remove_failed", cgroup=str(base), error=str(exc))


def clear_stale(parent: Path) -> None:
    """Remove the subtrees of ipad daemons that died without cleaning up (SIGKILL, crash).

    Whatever they left running there, a worker's setsid() grandchild say, is
    killed. Blocking: the daemon runs it in a thread.
    """
    with contextlib.suppress(OSError):
        for entry in parent.glob("ipad.*"):
            suffix = entry.name.removeprefix("ipad.")
            if not suffix.isdigit() or Path(f"/proc/{suffix}").exists():
                continue
            log.info("cgroup.stale_removed", cgroup=str(entry))
            remove_tree(entry)


def _populated(path: Path) -> bool:
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            if line.startswith("populated "):
                return line.split()[1] == "1"
    except OSError:
        return False
    return False
