"""A cgroup per worker, where a writable cgroup2 hierarchy is ours to use.

A process group does not hold a grandchild that called setsid() and forked
again; a cgroup does, and ``cgroup.kill`` ends everything in it at once.
ipad creates ``ipad.<daemon pid>/<module>.<worker pid>`` below its own cgroup
(as root, or under systemd with Delegate=yes) and falls back to process groups,
saying so once, where it cannot.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import time
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("ipad")

#: How long an emptied cgroup may take to report itself unpopulated before rmdir.
EMPTY_WAIT = 2.0
#: How often to look while waiting for that (the kernel's notification needs inotify).
EMPTY_POLL = 0.005


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
        clear_stale(parent)
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

    @staticmethod
    async def remove(path: Path) -> None:
        """Wait until a killed cgroup is empty, then remove it, off the event loop.

        rmdir of a cgroup can wait out an RCU grace period (~10 ms here), so it
        runs in a thread and never holds up the daemon or a restart.
        """
        with trio.move_on_after(EMPTY_WAIT):
            while _populated(path):
                await trio.sleep(EMPTY_POLL)
        try:
            await trio.to_thread.run_sync(path.rmdir)
        except OSError as exc:
            log.warning("cgroup.remove_failed", cgroup=str(path), error=str(exc))

    def close(self) -> None:
        """Remove the daemon's subtree (each worker's cgroup is removed as it ends)."""
        remove_tree(self.base)


def remove_tree(base: Path) -> None:
    """Kill everything in a daemon's subtree and remove it (at exit: blocking is fine)."""
    children = []
    with contextlib.suppress(OSError):
        children = [child for child in base.iterdir() if child.is_dir()]
    for child in children:
        WorkerCgroups.kill(child)
    deadline = time.monotonic() + EMPTY_WAIT
    for child in children:
        while _populated(child) and time.monotonic() < deadline:
            time.sleep(EMPTY_POLL)
        with contextlib.suppress(OSError):
            child.rmdir()
    try:
        base.rmdir()
    except OSError as exc:
        log.warning("cgroup.remove_failed", cgroup=str(base), error=str(exc))


def clear_stale(parent: Path) -> None:
    """Remove the subtrees of ipad daemons that died without cleaning up (SIGKILL, crash).

    Whatever they left running there, a worker's setsid() grandchild say, is killed.
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
