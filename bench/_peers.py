"""The peers ipad is measured against: supervisord, circus and systemd, each on one child.

Every peer runs the same child program (``_child.py``), whose first act is a
datagram to a :class:`Beacon`. That datagram is the peer's "running again":
the new process exists and has run its first line of Python. Each peer is a
context manager that starts it in a temporary directory and, on the way out
(an exception or SIGTERM included), stops it and kills whatever of its
children is left, so a benchmark never leaves a supervisor behind.

systemd runs as PID 1 of a throwaway PID and mount namespace, booted with
the masking recipe of ``shared/notes/systemd-in-a-namespace.md`` so that its
boot units never touch the host (its /tmp, kernel settings, journal).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
from _common import BENCH, dies_with_us

#: The interpreter the children run on (not a venv shim: -I -S needs nothing of it).
PYTHON = os.path.realpath(sys.executable)
CHILD = BENCH / "_child.py"
#: How long a peer may take to start or stop.
PEER_TIMEOUT = 30.0
#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("3i")


def child_argv(beacon: Path) -> list[str]:
    """The command line every peer runs: the child program announcing itself to ``beacon``."""
    return [PYTHON, "-I", "-S", str(CHILD), str(beacon)]


class Beacon:
    """The datagram socket children announce themselves on; the kernel says who sent each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        path.chmod(0o666)
        #: Every pid that announced itself, so teardown can make sure none is left.
        self.seen: set[int] = set()

    def receive(self, timeout: float) -> tuple[int, float] | None:
        """The next child's pid (in our pid namespace) and when it arrived; None on timeout."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        _, ancillary, _, _ = self.sock.recvmsg(64, socket.CMSG_SPACE(_UCRED.size))
        now = time.perf_counter()
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(data[: _UCRED.size])[0]
                self.seen.add(pid)
                return pid, now
        raise RuntimeError("a beacon datagram came without SCM_CREDENTIALS")

    def wait_for(self, count: int, timeout: float) -> list[tuple[int, float]]:
        """``count`` announcements from distinct pids; raise after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        got: dict[int, float] = {}
        while len(got) < count:
            left = deadline - time.monotonic()
            heard = self.receive(max(left, 0)) if left > 0 else None
            if heard is None:
                raise TimeoutError(f"{len(got)} of {count} children announced themselves")
            got.setdefault(*heard)
        return list(got.items())

    def kill_children(self) -> None:
        """SIGKILL every child that announced itself and is still this child program."""
        for pid in self.seen:
            with contextlib.suppress(OSError):
                if str(CHILD).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Kill what is left of the children; close and remove the socket."""
        self.kill_children()
        self.sock.close()
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def beacon_in(directory: Path) -> Iterator[Beacon]:
    """A beacon at ``directory/beacon``, closed (children killed) on the way out."""
    beacon = Beacon(directory / "beacon")
    try:
        yield beacon
    finally:
        beacon.close()


@attrs.define
class Peer:
    """A running peer supervisor: its name, its main process and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The supervisor's own process (whose memory and CPU are measured)."""
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise with the log's tail if the peer exited."""
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log:\n{tail}")


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL the whole session after ``grace`` seconds; reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _started(name: str, argv: list[str], directory: Path, grace: float) -> Iterator[Peer]:
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            dies_with_us(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=directory, start_new_session=True,
        )  # fmt: skip
    try:
        yield Peer(name, proc, log)
    finally:
        _stop(proc, grace)
        _kill_mentioning(directory)


def _kill_mentioning(directory: Path) -> None:
    """SIGKILL any process left whose command line names ``directory`` (a peer's helper)."""
    mark = str(directory).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)


# --- supervisord --------------------------------------------------------------------------


def supervisord_config(directory: Path, argv: list[str], count: int) -> str:
    """Supervisord with ``count`` copies of the child and ``autorestart``.

    ``startsecs = 0``: with the default 1 s, a child killed sooner counts as a
    failed start, backs off and is given up after ``startretries``; a child
    killed 20 ms after it started is a healthy run here, as for ipad.
    """
    return f"""\
[supervisord]
nodaemon = true
user = root
logfile = {directory}/supervisord-main.log
pidfile = {directory}/supervisord.pid
childlogdir = {directory}

[program:child]
command = {" ".join(argv)}
numprocs = {count}
process_name = %(program_name)s_%(process_num)03d
autorestart = true
startsecs = 0
startretries = 1000000
stdout_logfile = NONE
stderr_logfile = NONE
"""


@contextlib.contextmanager
def supervisord(directory: Path, argv: list[str], count: int = 1) -> Iterator[Peer]:
    """Supervisord (from the ``supervisor`` package) running ``count`` children."""
    config = directory / "supervisord.conf"
    config.write_text(supervisord_config(directory, argv, count))
    command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(config)]
    with _started("supervisord", command, directory, grace=PEER_TIMEOUT) as peer:
        yield peer


# --- circus ---------------------------------------------------------------------------------


def circus_config(directory: Path, argv: list[str], count: int) -> str:
    """Circusd with one watcher of ``count`` children, every restart setting at its default.

    The endpoints are IPC sockets in ``directory`` instead of the default TCP
    ports 5555 and 5556, so two runs on one machine never collide; nothing else
    is set. (Setting ``stats_endpoint`` would also start a circusd-stats process.)
    """
    return f"""\
[circus]
endpoint = ipc://{directory}/circus-control
pubsub_endpoint = ipc://{directory}/circus-pubsub

[watcher:child]
cmd = {argv[0]}
args = {" ".join(argv[1:])}
numprocesses = {count}
"""


@contextlib.contextmanager
def circusd(directory: Path, argv: list[str], count: int = 1) -> Iterator[Peer]:
    """Circusd (from the ``circus`` package) running ``count`` children."""
    config = directory / "circus.ini"
    config.write_text(circus_config(directory, argv, count))
    command = [sys.executable, "-m", "circus.circusd", str(config)]
    with _started("circusd", command, directory, grace=PEER_TIMEOUT) as peer:
        yield peer


# --- systemd in a namespace ----------------------------------------------------------------

#: The recipe of shared/notes/systemd-in-a-namespace.md: mask every boot unit that acts on
#: the host, keep journald (it writes only to this namespace's /run), boot test.target.
_INNER = """\
set -e
mount -t tmpfs tmpfs /run
U=/run/systemd/system; mkdir -p $U
for d in /lib/systemd/system/sysinit.target.wants /etc/systemd/system/sysinit.target.wants \
         /lib/systemd/system/local-fs.target.wants; do
  for u in $(ls $d 2>/dev/null); do ln -sf /dev/null $U/$u; done
done
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.service \
         systemd-tmpfiles-setup-dev.service systemd-remount-fs.service \
         systemd-journal-flush.service systemd-sysusers.service systemd-sysctl.service \
         systemd-binfmt.service tmp.mount local-fs.target swap.target; do
  ln -sf /dev/null $U/$u
done
rm -f $U/systemd-journald.service
printf '[Unit]\\nDescription=test root\\n' > $U/test.target
for f in "$1"/*.service; do
  n=$(basename "$f")
  cp "$f" $U/
  mkdir -p $U/$n.d
  printf '[Unit]\\nDefaultDependencies=no\\n' > $U/$n.d/test.conf
done
exec /lib/systemd/systemd --system --unit=test.target
"""

SYSTEMD = Path("/lib/systemd/systemd")
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


def systemd_available() -> str | None:
    """Why systemd cannot be booted here, or None if it can."""
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    if os.geteuid() != 0:
        return "booting systemd in a namespace needs root"
    missing = [tool for tool in (UNSHARE, NSENTER) if not Path(tool).exists()]
    return f"{', '.join(missing)} not found" if missing else None


def systemd_unit(argv: list[str], restart_sec: str | None) -> str:
    """A service running the child with ``Restart=always``.

    Start rate limiting is off (``StartLimitIntervalSec=0``): with systemd's
    default of 5 starts in 10 s it would stop restarting after the fifth kill.
    """
    extra = f"RestartSec={restart_sec}\n" if restart_sec is not None else ""
    return (
        "[Unit]\nStartLimitIntervalSec=0\n\n[Service]\n"
        f"ExecStart={' '.join(argv)}\nRestart=always\n{extra}"
    )


@attrs.define
class Systemd:
    """A systemd booted as PID 1 of its own namespace."""

    peer: Peer
    pid1: int

    def systemctl(self, *args: str) -> str:
        """Run systemctl inside the namespace; its output (raise if it fails)."""
        result = subprocess.run(
            [NSENTER, "-t", str(self.pid1), "-a", "systemctl", *args],
            capture_output=True, text=True, timeout=PEER_TIMEOUT, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"systemctl {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout


@contextlib.contextmanager
def systemd(directory: Path, units: dict[str, str]) -> Iterator[Systemd]:
    """Boot systemd in a new PID and mount namespace with ``units`` (name -> text).

    Torn down by SIGKILL to its PID 1, which ends everything in the namespace.
    """
    unit_dir = directory / "units"
    unit_dir.mkdir()
    for name, text in units.items():
        (unit_dir / name).write_text(text)
    inner = directory / "inner.sh"
    inner.write_text(_INNER)
    # --kill-child: if unshare goes (the benchmark was killed), so does the namespace's PID 1.
    command = [UNSHARE, "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc",
               "--net", "--mount-proc", "--propagation", "private",
               "/bin/sh", str(inner), str(unit_dir)]  # fmt: skip
    with _started("systemd", command, directory, grace=1.0) as peer:
        pid1 = 0
        try:
            pid1 = _namespace_init(peer)
            booted = Systemd(peer, pid1)
            _wait_booted(booted)
            yield booted
        finally:
            if pid1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid1, signal.SIGKILL)


def _namespace_init(peer: Peer) -> int:
    """The pid (on the host) of the namespace's PID 1, once it is systemd."""
    children = Path(f"/proc/{peer.pid}/task/{peer.pid}/children")
    deadline = time.monotonic() + PEER_TIMEOUT
    while time.monotonic() < deadline:
        peer.check_alive()
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(children.read_text().split()[0])
            if Path(f"/proc/{pid}/exe").resolve() == SYSTEMD.resolve():
                return pid
        time.sleep(0.01)
    raise TimeoutError("systemd did not start in its namespace")


def _wait_booted(booted: Systemd) -> None:
    """Wait until the namespace's systemd has finished booting test.target."""
    deadline = time.monotonic() + PEER_TIMEOUT
    while time.monotonic() < deadline:
        booted.peer.check_alive()
        result = subprocess.run(
            [NSENTER, "-t", str(booted.pid1), "-a", "systemctl", "is-system-running"],
            capture_output=True, text=True, timeout=PEER_TIMEOUT, check=False,
        )  # fmt: skip
        if result.stdout.strip() in ("running", "degraded"):
            return
        time.sleep(0.05)
    raise TimeoutError("systemd in the namespace did not finish booting")


# --- measuring a peer -----------------------------------------------------------------------


def process_rss_kib(pid: int) -> int:
    """A process's resident memory (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def process_fds(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def process_cpu_s(pid: int) -> float:
    """CPU time process ``pid`` has used, all its threads, in seconds.

    From the scheduler's own accounting (``/proc/PID/task/*/schedstat``, in
    nanoseconds), not ``/proc/PID/stat``'s clock ticks: an idle supervisor
    uses a few ticks (10 ms each) in 30 s, too coarse to tell 0.10 % from 0.13 %.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9
