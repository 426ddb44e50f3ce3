"""``python -m ipad.worker.jail SPEC -- WORKER...``: a worker into its sandbox and PID namespace.

Workers that are not forked from the fork server (``forkserver = false``, or
a native worker executable) are spawned through this. A PID namespace can
only be entered by a new process, so the jail does what the fork server does
(ipad/worker/forkserver.py): it clones the worker with CLONE_PARENT into a new PID
namespace (and, unprivileged, a user namespace), so the worker is a child of
the *daemon* and pid 1 of a namespace holding only its own processes. The
child applies the same SandboxSpec a forked worker applies to itself
(ipad/worker/sandbox.py; its /proc is its namespace's) and execs the worker.

The daemon learns the worker's pid from the jail: SPAWNED, the first packet
on the control socket (fd 3), sent before the worker may run, so nothing the
worker sends can come first. The daemon adopts that pid only if it is its
own child (ipad/daemon/children.py), then reaps the jail, which exits at once.

The order makes every step safe to cut short: the child waits for the jail's
go before anything, so a jail killed before it said SPAWNED takes the child
with it (the child is still in the jail's process group); after go the child
leads a group of its own, and only then does the jail exit (its group is
killed when it is reaped). Should the daemon die meanwhile, the child gets
SIGKILL (PR_SET_PDEATHSIG), checked after the sandbox is in place.

With a spec without a PID namespace the jail confines itself and execs the
worker in place, as before: the seccomp filter then restricts signals to the
worker and its process group.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

import msgspec

from ipad.protocol import wire as p
from ipad.protocol.fdpass import CONTROL_FD, EXTRA_FD, send_packet
from ipad.protocol.wire import SandboxSpec
from ipad.worker.sandbox import CLONE_NEWUSER, SandboxError, apply, clone_flags, close_other_fds

if TYPE_CHECKING:
    from ipad.worker.forkserver import DaemonWatch

#: Exit status when the sandbox cannot be built (the reason goes to stderr, relayed).
EXIT_SANDBOX_FAILED = 4

#: The argument naming the daemon's pid to the worker (ipad/daemon/spawn.py adds it).
PARENT_PID = "--parent-pid"


#: The first argument when fd 4 is the worker's cgroup directory, to clone it into.
CGROUP_ARG = "--cgroup-fd=4"


def command(spec: SandboxSpec, argv: list[str], *, cgroup: bool = False) -> list[str]:
    """The command line that starts ``argv`` confined by ``spec`` (in the cgroup on fd 4)."""
    encoded = msgspec.json.encode(spec).decode()
    head = [CGROUP_ARG] if cgroup else []
    return [sys.executable, "-I", "-m", "ipad.worker.jail", *head, encoded, "--", *argv]


def main(argv: list[str]) -> int:
    """Apply the spec in argv[0] to the worker that follows ``--``, then start it."""
    cgroup_fd = EXTRA_FD if argv[0] == CGROUP_ARG else None
    argv = argv[1:] if cgroup_fd is not None else argv
    spec = msgspec.json.decode(argv[0].encode(), type=SandboxSpec)
    worker = argv[argv.index("--") + 1 :]
    close_other_fds(EXTRA_FD + 1 if cgroup_fd is not None else EXTRA_FD)
    if not spec.pid_namespace:
        return _exec_in_place(spec, worker)
    from ipad.worker.forkserver import DaemonWatch  # noqa: PLC0415 - the jail's alone, not the daemon's

    daemon_pid = _parent_pid(worker) or os.getppid()
    # The worker's parent is the daemon, outside its namespace: there getppid() says 0.
    if PARENT_PID in worker:
        worker[worker.index(PARENT_PID) + 1] = "0"
    return _clone_worker(spec, worker, DaemonWatch(daemon_pid), cgroup_fd)


def _parent_pid(worker: list[str]) -> int | None:
    if PARENT_PID not in worker[:-1]:
        return None
    try:
        return int(worker[worker.index(PARENT_PID) + 1])
    except ValueError:
        return None


def _exec_in_place(spec: SandboxSpec, worker: list[str]) -> int:  # noqa: RET503 - execv
    try:
        apply(spec, (os.getuid(), os.getgid()), in_user_namespace=False)
    except SandboxError as exc:
        _failed(spec, exc.step, exc.reason)
        return EXIT_SANDBOX_FAILED
    os.execv(worker[0], worker)  # noqa: S606 - the resolved worker, as the daemon would spawn it


def _clone_worker(
    spec: SandboxSpec, worker: list[str], daemon: DaemonWatch, cgroup_fd: int | None
) -> int:
    """Clone the worker into its namespaces (and cgroup), tell the daemon its pid, let it go."""
    from ipad.worker.forkserver import fork_sibling_into  # noqa: PLC0415 - the jail's alone, not the daemon's

    control = socket.socket(fileno=CONTROL_FD)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    outer_ids = (os.getuid(), os.getgid())  # what a user namespace maps: ours, from outside
    namespaces = clone_flags(spec)
    try:
        pid, in_cgroup = fork_sibling_into(cgroup_fd, namespaces)
    except OSError as exc:
        _failed(spec, "pid_namespace", f"clone: {exc.strerror or exc}")
        return EXIT_SANDBOX_FAILED
    if pid == 0:
        if cgroup_fd is not None:
            os.close(cgroup_fd)
        ours.close()
        control.detach()  # fd 3 stays: it is the worker's control socket
        _become_worker(spec, worker, theirs, daemon, outer_ids, namespaces)
    theirs.close()
    try:
        send_packet(control, p.encode(p.Spawned(pid, in_cgroup)))
        ours.send(b"go")
        ours.recv(16)  # it leads a group of its own now (or it died): ours may end
    except OSError:
        return 1  # the daemon gave up on us: the child gets EOF (or was killed with our group)
    return 0


def _become_worker(
    spec: SandboxSpec,
    worker: list[str],
    jail: socket.socket,
    daemon: DaemonWatch,
    outer_ids: tuple[int, int],
    namespaces: int,
) -> None:
    """In the clone: wait for go, lead a process group, confine, exec. Never returns."""
    status = EXIT_SANDBOX_FAILED
    try:
        if jail.recv(16) != b"go":
            os._exit(1)  # the jail is gone: the daemon never heard of us
        os.setpgid(0, 0)  # before the jail exits: its group is killed when it is reaped
        jail.send(b"ok")
        jail.close()
        daemon.stay_with()
        try:
            apply(spec, outer_ids, in_user_namespace=bool(namespaces & CLONE_NEWUSER))
        except SandboxError as exc:
            _failed(spec, exc.step, exc.reason)
            os._exit(EXIT_SANDBOX_FAILED)
        daemon.stay_with()  # a change of user cleared the parent-death signal: again
        if daemon.pidfd is not None:
            os.close(daemon.pidfd)
        os.execv(worker[0], worker)  # noqa: S606 - the resolved worker, as the daemon would spawn it
    except OSError as exc:
        _failed(spec, "exec", f"{worker[0]}: {exc.strerror or exc}")
    finally:
        os._exit(status)


def _failed(spec: SandboxSpec, step: str, reason: str) -> None:
    print(f"worker.sandbox_failed module={spec.module} step={step} reason={reason}",
          file=sys.stderr, flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
