"""Which sandbox measures are in force for a running worker, read from outside it.

``ipadctl --json status`` shows them per module. They are read from the
worker's /proc entries by the daemon, not reported by the worker: a worker
runs untrusted module code, and whatever it said about itself could be a lie.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ipad.protocol.wire import SandboxSpec

#: The namespaces compared with the daemon's own: a different inode is a namespace of its own.
NAMESPACES = {"user_namespace": "user", "pid_namespace": "pid", "network": "net", "ipc": "ipc",
              "mounts": "mnt"}  # fmt: skip

#: /proc/<pid>/limits rows for each resource limit.
LIMIT_ROWS = {"RLIMIT_AS": "Max address space", "RLIMIT_NOFILE": "Max open files",
              "RLIMIT_NPROC": "Max processes", "RLIMIT_CPU": "Max cpu time",
              "RLIMIT_CORE": "Max core file size"}  # fmt: skip


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _namespace(pid: int | str, kind: str) -> str | None:
    try:
        return str(Path(f"/proc/{pid}/ns/{kind}").readlink())
    except OSError:
        return None


def _limits(pid: int) -> dict[str, str]:
    rows = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        for name, label in LIMIT_ROWS.items():
            if line.startswith(label):
                rows[name] = line[len(label) :].split()[0]
    return rows


def measures(pid: int, spec: SandboxSpec, memory_cgroup: Path | None) -> dict[str, Any]:
    """The measures in force for worker ``pid``: each true, false, or the value in force."""
    try:
        status = _status_fields(pid)
        limits = _limits(pid)
        fds = sorted(int(fd.name) for fd in Path(f"/proc/{pid}/fd").iterdir())
        oom_score_adj = int(Path(f"/proc/{pid}/oom_score_adj").read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read /proc/{pid}: {exc}"}
    uid, gid = (int(status[key].split()[0]) for key in ("Uid", "Gid"))
    found: dict[str, Any] = {
        "uid": uid,
        "gid": gid,
        "groups": [int(g) for g in status.get("Groups", "").split()],
        "user": spec.uid is not None and uid == spec.uid,
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "seccomp": status.get("Seccomp") == "2",
        "capabilities": status.get("CapEff", "") == "0" * 16,
        "fds": fds,
        "oom_score_adj": oom_score_adj,
        "rlimits": limits,
    }
    for measure, kind in NAMESPACES.items():
        theirs = _namespace(pid, kind)
        found[measure] = theirs is not None and theirs != _namespace("self", kind)
    limit = None
    if memory_cgroup is not None:
        for name in ("memory.max", "memory.limit_in_bytes"):
            with contextlib.suppress(OSError, ValueError):
                limit = int((memory_cgroup / name).read_text())
                break
    found["memory_max"] = limit
    return found
