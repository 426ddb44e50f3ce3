"""Hostile modules against the sandbox, forked and spawned, Python and native, root and unprivileged.

A hostile Python module (tests/modules/ipad_test_modules/hostile.py) and a
hand-written native worker (tests/native/hostile_worker.c, built here with
gcc) try every way to signal what is outside their sandbox: kill, tgkill,
sigqueue, pidfd_open, a pidfd of a /proc directory, F_SETOWN/F_SETSIG with
O_ASYNC, FIOSETOWN with FIOASYNC, kill(-1), children of the daemon through
clone(CLONE_PARENT) and clone3, and a double-forked, setsid'd escapee that
asks for no parent-death signal. Each test proves from the outside that the
targets (the daemon, another module's workers, a process of the workers'
own user) live on unharmed, that the daemon has no zombie child and nothing
the module started outlives its worker, that another module answers and
``ipadctl status`` answers; the fixture stops every daemon with SIGTERM and
fails the test unless it exits cleanly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipad.client import BlockingClient
from ipad.protocol import wire as p
from ipad.protocol.fdpass import send_packet
from tests.daemon_process import (
    TEST_MODULES,
    DaemonProcess,
    alive,
    open_fds,
    wait_until,
    write_config,
    zombie_children,
)
from tests.privileges import NOBODY, as_user, setpriv, user_install
from tests.raw_client import hello, receive
from tests.test_e2e_unprivileged import nobody_dir, nobody_env

__all__ = ["nobody_dir", "nobody_env"]  # fixtures, used by name

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="root starts both daemons (CI runs as root)"),
]

Start = Callable[..., DaemonProcess]

NATIVE_SOURCE = Path(__file__).parent / "native" / "hostile_worker.c"
GCC = shutil.which("gcc")

CONFIG = """
[daemon]
module_dirs = [{module_dirs}]
worker_dirs = ["{bin}"]
{forkserver}

[sandbox]
processes = 64
optional = ["memory_max"]

[modules.hostile]
proxy = "sandboxed"
[modules.probe2]
proxy = "sandboxed"
[modules.echo]
"""

NATIVE_MANIFEST = """
name = "native"
version = "1.0.0"
api_version = 1
worker = "hostile-native"
description = "a hostile native worker (tests)"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""

#: Every way the Python module tries to kill a target (tests/modules/.../hostile.py).
ATTACKS = ("kill", "killpg", "tgkill", "sigqueue", "pidfd_open", "proc_pidfd", "setown",
           "setown_group", "ioctl_owner")  # fmt: skip


@pytest.fixture
def sentinel() -> Iterator[subprocess.Popen[bytes]]:
    """A process outside every sandbox, of the workers' own user: fair game for none of them."""
    proc = subprocess.Popen([*setpriv(NOBODY, NOBODY, ()), "sleep", "600"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


class Setup:
    """Where a test's daemon finds its modules and the native worker, and how it runs."""

    def __init__(self, directory: Path, modules: Path, *, unprivileged: bool) -> None:
        self.directory = directory
        self.modules = modules
        self.unprivileged = unprivileged
        self.native_dir = directory / "native-modules"
        self.bin = directory / "bin"
        self.targets = self.native_dir / "targets"  # in its view: its module directory
        #: The name its escapee takes: this test's own, so none of another run is counted.
        self.marker = f"ipad-esc-n{os.getpid() % 100000}"

    def build_native(self) -> None:
        """Compile the hostile native worker and give it a manifest of its own."""
        for path in (self.native_dir, self.bin):
            path.mkdir(mode=0o755)
        self.targets.write_text("")
        self.targets.chmod(0o644)
        binary = self.bin / "hostile-native"
        subprocess.run([str(GCC), "-O1", "-Wall", f'-DTARGETS="{self.targets}"',
                        f'-DMARKER="{self.marker}"', "-o", str(binary),
                        str(NATIVE_SOURCE)], check=True, capture_output=True)  # fmt: skip
        binary.chmod(0o755)
        (self.native_dir / "native.toml").write_text(NATIVE_MANIFEST)  # tuning: tests/modules

    def config(self, *, forkserver: bool, native: bool = False) -> Path:
        module_dirs = ", ".join(f'"{d}"' for d in (self.modules, self.native_dir))
        text = CONFIG.format(module_dirs=module_dirs, bin=self.bin,
                             forkserver="" if forkserver else "forkserver = false")  # fmt: skip
        if native:
            text += '[modules.native]\nproxy = "sandboxed"\n'
        path = write_config(self.directory, modules=text)
        path.chmod(0o644)
        return path


@pytest.fixture(params=["root", "unprivileged"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    """A root daemon's setup, or one an unprivileged user (nobody) can read."""
    if request.param == "root":
        made = Setup(tmp_path, TEST_MODULES, unprivileged=False)
    else:
        directory: Path = request.getfixturevalue("nobody_dir")
        made = Setup(directory, user_install().test_modules, unprivileged=True)
    made.build_native()
    return made


def start(start_daemon: Start, setup: Setup, request: pytest.FixtureRequest,
          config: Path) -> DaemonProcess:  # fmt: skip
    """Start the daemon as root, or as nobody."""
    if not setup.unprivileged:
        return start_daemon(config)
    env: dict[str, str] = request.getfixturevalue("nobody_env")
    daemon = start_daemon(config, env=env, prefix=as_user())
    daemon.socket = Path(daemon.wait_for("daemon.started")["socket"])
    return daemon


def targets(daemon: DaemonProcess, sentinel: subprocess.Popen[bytes]) -> dict[str, int]:
    """The host pids no module may touch."""
    workers = daemon.worker_pids()
    return {"daemon": daemon.proc.pid, "probe2": workers["probe2"], "echo": workers["echo"],
            "sentinel": sentinel.pid}  # fmt: skip


def assert_unharmed(daemon: DaemonProcess, before: dict[str, int]) -> None:
    """Every target alive, the same process; no zombie child; the others answer; status too."""
    time.sleep(0.2)  # what a queued signal or SIGIO would do, it has done by now
    for name, pid in before.items():
        assert alive(pid), f"{name} ({pid}) was killed"
    workers = daemon.worker_pids()
    assert (workers["probe2"], workers["echo"]) == (before["probe2"], before["echo"])
    # A worker that just died is a zombie until the daemon's reaper gets to it (the hostile
    # one keeps restarting): only one that stays unreaped is a fault.
    wait_until(lambda: zombie_children(daemon.proc.pid) == [], timeout=5)
    with BlockingClient(daemon.socket) as client:
        assert client.request_proxy("echo").call("echo", {"text": "x"}) == {"text": "x"}
        assert client.request_proxy("probe2").call("read", {"path": "/nowhere"}) == "ENOENT"
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert status["modules"]["probe2"]["state"] == "running"
    assert daemon.proc.poll() is None


def call_with_fd(daemon: DaemonProcess, method: str, name: str, fd: int) -> object:
    """Call ``method`` of the hostile module passing ``fd`` as its argument ``name``, by hand.

    By hand: a client library may rightly refuse to pass what is not a buffer.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        hello(sock)
        sock.send(p.encode(p.RequestProxy("hostile"), 2))
        while (frame := receive(sock)) is not None and frame.request_id != 2:
            frame.close_fds()
        assert frame is not None
        assert isinstance(frame.message, p.ProxyGranted), frame.message
        with socket.socket(fileno=frame.fds[0]) as channel:
            channel.settimeout(10)
            send_packet(channel, p.encode(p.Call(method, {}, (name,)), 1, nfds=1), [fd])
            while (reply := receive(channel)) is not None and reply.request_id != 1:
                reply.close_fds()
            assert reply is not None
            assert isinstance(reply.message, p.Result), reply.message
            return reply.message.value


def processes_named(name: str) -> list[int]:
    """Host pids whose name (comm) is ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == name:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("forkserver", [True, False], ids=["forked", "spawned"])
def test_hostile_python_module_harms_nothing_outside(
    start_daemon: Start, setup: Setup, request: pytest.FixtureRequest,
    sentinel: subprocess.Popen[bytes], forkserver: bool,
) -> None:  # fmt: skip
    """Signals by every route, kill(-1), CLONE_PARENT, /proc and an escapee: all fail, all else lives."""
    daemon = start(start_daemon, setup, request, setup.config(forkserver=forkserver))
    before = targets(daemon, sentinel)
    hostile_pid = daemon.worker_pids()["hostile"]
    daemon.wait_standbys()
    fds = open_fds(daemon.proc.pid)
    with BlockingClient(daemon.socket) as client:
        hostile = client.request_proxy("hostile")
        results: dict[str, dict[str, str]] = hostile.call("signal_others",
                                                          {"pids": list(before.values())})  # fmt: skip
        for pid, outcome in results.items():
            assert set(outcome) == set(ATTACKS)
            succeeded = [name for name, got in outcome.items() if got == "ok"]
            assert succeeded == [], (pid, outcome)
            # The pidfd routes are refused outright; pids resolve only in its namespace.
            assert outcome["pidfd_open"] == outcome["setown"] == outcome["ioctl_owner"] == "EPERM"
        assert_unharmed(daemon, before)

        hostile.call("kill_everyone")  # in its namespace: only its own processes
        assert_unharmed(daemon, before)

        cloned: dict[str, str] = hostile.call("clone_parent", {"count": 20})
        assert cloned == {"clone": "SIGSYS", "vfork": "SIGSYS", "clone3": "ENOSYS",
                          "self_clone3": "ENOSYS"}  # fmt: skip
        assert_unharmed(daemon, before)

        view: dict[str, Any] = hostile.call("proc_view")
        assert view["self"] == 1
        assert len(view["pids"]) < 5, view  # itself and the odd helper: nothing of the host
        assert hostile.call("passed_pidfd", {"path": f"/proc/{before['daemon']}"}) != "ok"
        for target in before.values():  # a pidfd a client hands it: refused all the same
            pidfd = os.pidfd_open(target)
            try:
                assert call_with_fd(daemon, "signal_fd", "target", pidfd) == "EPERM"
            finally:
                os.close(pidfd)
        assert_unharmed(daemon, before)

        marker = f"ipad-esc-{os.getpid() % 100000}"
        hostile.call("escape", {"marker": marker})
        assert processes_named(marker), "the escapee never ran"
        daemon.ctl("restart", "hostile")
        daemon.wait_for("worker.ready", lambda r: r["module"] == "hostile"
                        and r["worker_pid"] != hostile_pid)  # fmt: skip
        wait_until(lambda: not processes_named(marker), timeout=10)  # died with its worker
        assert hostile.call("proc_view", wait=10)["self"] == 1  # back, still in its namespace
    assert_unharmed(daemon, before)
    daemon.wait_standbys()  # the client's proxies gone, the standbys' spares with them
    count = open_fds(daemon.proc.pid)
    assert count <= fds, (count, fds)  # nothing of the attacks is held open


@pytest.mark.skipif(GCC is None, reason="needs gcc to build the native worker")
def test_hostile_native_worker_harms_nothing_outside(
    start_daemon: Start, setup: Setup, request: pytest.FixtureRequest,
    sentinel: subprocess.Popen[bytes],
) -> None:  # fmt: skip
    """A native worker, attacking before it answers LOAD, is pid 1 of its namespace and harms nothing."""
    daemon = start(start_daemon, setup, request, setup.config(forkserver=False))
    before = targets(daemon, sentinel)
    daemon.wait_standbys()
    fds = open_fds(daemon.proc.pid)
    setup.targets.write_text(" ".join(str(pid) for pid in before.values()))
    setup.config(forkserver=False, native=True)
    assert "added: native" in daemon.ctl("reload").stdout
    done = daemon.wait_for("worker.stderr", lambda r: r.get("module") == "native"
                           and r["text"] == "hostile.native done")  # fmt: skip
    pid = done["worker_pid"]  # its first worker; each restart attacks again
    lines = [r["text"] for r in daemon.events("worker.stderr") if r.get("worker_pid") == pid]
    per_target = [line for line in lines if " target=" in line]
    assert len(per_target) == len(before), lines
    for line in per_target:
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        attempts = {k: v for k, v in fields.items() if k != "target"}
        assert "ok" not in attempts.values(), line
        assert attempts["pidfd_open"] == attempts["setown"] == attempts["ioctl_owner"] == "EPERM"
        assert attempts["proc_pidfd"] in ("ENOENT", "EPERM"), line  # its own /proc
    summary = dict(item.split("=", 1) for line in lines if " self=" in line
                   for item in line.split()[1:])  # fmt: skip
    assert summary["self"] == "1", lines  # pid 1 of a namespace of its own
    assert int(summary["proc_pids"]) < 5, lines
    others = dict(item.split("=", 1) for line in lines if "clone_parent=" in line
                  for item in line.split()[1:])  # fmt: skip
    assert (others["clone_parent"], others["clone3_parent"]) == ("SYS", "ENOSYS"), lines
    # Its exit (a load failure) ended its namespace: the escapee went with it.
    daemon.wait_for("worker.start_failed", lambda r: r.get("worker_pid") == pid)
    wait_until(lambda: not processes_named(setup.marker), timeout=10)
    assert_unharmed(daemon, before)
    # In cooldown, nothing of its jails and workers held open (its module adds a pipe or two).
    wait_until(lambda: open_fds(daemon.proc.pid) <= fds + 2)
