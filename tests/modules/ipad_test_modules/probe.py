"""A module that reports the sandbox it runs in, from inside, and tries to get out of it.

Every method answers with what happened (``"ok"`` or the errno's name) rather
than raising, so a test compares the worker's view with its configured sandbox.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import socket
from pathlib import Path
from typing import Any

from ipad.ipa import IPAModule

__version__ = "1.0.0"

#: ptrace(2) request: attach to a process.
PTRACE_ATTACH = 16
PTRACE_DETACH = 17

RLIMITS = ("RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CPU", "RLIMIT_CORE")
STATUS_FIELDS = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "NSpid")


def _outcome(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


class Probe(IPAModule):
    """Reports and escape attempts, one method each."""

    def report(self) -> dict[str, Any]:
        """Ids, limits, /proc/self/status, interfaces, descriptors, environment, mounts."""
        status = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                status[key] = value.strip()
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            mounts.append({"point": fields[4], "options": fields[5].split(","),
                           "fstype": fields[fields.index("-") + 1]})  # fmt: skip
        fds = {}
        for name in os.listdir("/proc/self/fd"):  # noqa: PTH208 - names, then readlink each
            try:
                target = os.readlink(f"/proc/self/fd/{name}")  # noqa: PTH115
            except OSError:
                continue  # the listing's own descriptor, closed already
            if not target.endswith("/fd"):
                fds[name] = target
        return {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "groups": os.getgroups(),
            "status": status,
            "rlimits": {
                name: list(resource.getrlimit(getattr(resource, name))) for name in RLIMITS
            },
            # /proc/net/dev, not if_nameindex(): that needs a netlink socket, which seccomp denies.
            "interfaces": [
                line.split(":")[0].strip()
                for line in Path("/proc/net/dev").read_text().splitlines()[2:]
            ],
            "fds": fds,
            "environ": dict(os.environ),
            "mounts": mounts,
            "oom_score_adj": int(Path("/proc/self/oom_score_adj").read_text()),
            "root": sorted(p.name for p in Path("/").iterdir()),
        }

    def write(self, path: str) -> str:
        """Try to create or overwrite ``path``."""
        try:
            with open(path, "w") as file:  # noqa: PTH123 - what a module would write
                file.write("probe")
        except OSError as exc:
            return _outcome(exc)
        return "ok"

    def read(self, path: str) -> str:
        """Try to read ``path``."""
        try:
            Path(path).read_bytes()
        except OSError as exc:
            return _outcome(exc)
        return "ok"

    def connect(self, family: str) -> str:
        """Try to make a socket of ``family`` (AF_INET...) and reach the outside with it."""
        try:
            sock = socket.socket(getattr(socket, family), socket.SOCK_STREAM)
        except OSError as exc:
            return _outcome(exc)
        try:
            sock.settimeout(1)
            sock.connect(("127.0.0.1", 9) if family == "AF_INET" else "/run/ipad/ipad.sock")
        except OSError as exc:
            return "socket made; connect: " + _outcome(exc)
        finally:
            sock.close()
        return "ok"

    def signal(self, pid: int) -> str:
        """Try to send SIGTERM to ``pid`` (the daemon's, as the host sees it)."""
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError as exc:
            return _outcome(exc)
        return "ok"

    def trace(self, pid: int) -> str:
        """Try to ptrace-attach to ``pid``."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
            return errno.errorcode.get(ctypes.get_errno(), "?")
        libc.ptrace(PTRACE_DETACH, pid, None, None)
        return "ok"

    def fork_bomb(self, most: int) -> dict[str, Any]:
        """Fork children (that wait) until the kernel refuses, at most ``most``; end them."""
        children: list[int] = []
        error = None
        try:
            for _ in range(most):
                pid = os.fork()
                if pid == 0:
                    signal.pause()
                    os._exit(0)
                children.append(pid)
        except OSError as exc:
            error = _outcome(exc)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return {"forked": len(children), "error": error}

    def allocate(self, mib: int) -> str:
        """Allocate and touch ``mib`` MiB, a MiB at a time (the kernel may kill us for it)."""
        chunks = []
        try:
            for _ in range(mib):
                chunks.append(bytearray(1 << 20))
        except MemoryError:
            return f"MemoryError after {len(chunks)} MiB"
        return "ok"
