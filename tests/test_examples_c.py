"""examples/c: a C worker and a C client, written from docs/protocol.md, against real daemons.

Both are built here with the system gcc (-Wall -Wextra -Werror, as examples/c/README.md
says). The C client runs against the shipped Python echo module and against the C
worker (a C-only camera stack) while the worker is SIGKILLed several times; the C worker
serves ipad's own clients, both of them, as a native module. Every daemon is stopped with
SIGTERM by the fixture, which fails the test unless it exits cleanly; every process a test
starts is waited for with a deadline and killed if it outlives it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from ipad.client import BadArguments, UnknownMethod
from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, send_packet
from tests.buffers import MakeFd
from tests.client_drivers import Connect, connect, proxies_held
from tests.daemon_process import (
    REPO,
    TEST_MODULES,
    WAIT,
    DaemonProcess,
    alive,
    open_fds,
    wait_until,
)
from tests.raw_client import hello, receive

__all__ = ["connect"]  # the fixture: one test runs against both clients

GCC = shutil.which("gcc")
EXAMPLES = REPO / "examples" / "c"
CFLAGS = ("-std=c11", "-O2", "-Wall", "-Wextra", "-Werror")
PROGRAMS = {"ipad-echo-worker": "echo_worker.c", "ipad-echo-client": "echo_client.c"}

#: Calls the C client makes in the kill tests: enough that three kills land mid-run.
CALLS = 12000
#: Lines printed when each kill is made.
KILL_AT = (300, 2000, 4000)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(GCC is None, reason="gcc is not installed: the C examples cannot be built"),
]

Start = Callable[..., DaemonProcess]


@pytest.fixture(scope="module")
def c_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both examples, built from examples/c with the system gcc into a directory of their own."""
    directory = tmp_path_factory.mktemp("c-examples")
    directory.chmod(0o755)  # a worker directory: not writable by group or others
    for name, main in PROGRAMS.items():
        built = subprocess.run(
            [str(GCC), *CFLAGS, "-o", str(directory / name), main, "ipad_wire.c", "msgpack.c"],
            cwd=EXAMPLES, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert built.returncode == 0, f"{name} does not build:\n{built.stderr}"
    return directory


def write_config(directory: Path, c_bin: Path, modules: str) -> Path:
    """A daemon that finds examples/c's manifest and the built worker; no cooldown from kills."""
    path = directory / "config.toml"
    path.write_text(
        f'[daemon]\nmodule_dirs = ["{EXAMPLES}"]\nworker_dirs = ["{c_bin}"]\n\n'
        f"[restart]\nmax_failures = 100\n\n{modules}"
    )
    return path


@pytest.fixture
def c_env(daemon_env: dict[str, str]) -> dict[str, str]:
    """The daemon's environment, with examples/c's tuning directory for echo_c."""
    daemon_env["IPAD_CONFIG_PATH"] = f"{TEST_MODULES / 'tuning'}:{EXAMPLES / 'tuning'}"
    return daemon_env


def expected_line(i: int) -> str:
    """What the C client must print for call ``i``: the text echoed and the buffer's CRC-32."""
    text = f"frame-{i}"
    data = (text.encode() * (4096 // len(text) + 1))[:4096]
    return f"{i} {text} {zlib.crc32(data)}"


@contextlib.contextmanager
def c_client(
    c_bin: Path, socket_path: Path, calls: int
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Run the C client; its stdout lines collect in the list as they come; killed if left."""
    env = {"PATH": os.environ.get("PATH", ""), "IPAD_SOCKET": str(socket_path),
           "IPAD_CONFORMANCE_CALLS": str(calls)}  # fmt: skip
    proc = subprocess.Popen([str(c_bin / "ipad-echo-client")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:  # one append per line: the test watches the count grow
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)
        reader.join(WAIT)
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()


def kill_worker(daemon: DaemonProcess, module: str) -> None:
    """SIGKILL the module's worker and wait until another one serves it."""
    pid = daemon.worker_pids()[module]
    os.kill(pid, signal.SIGKILL)
    daemon.wait_for("worker.ready", lambda r: r.get("module") == module and r["worker_pid"] != pid)


@pytest.mark.parametrize("worker", ["python", "c"])
def test_c_client_recovers_from_worker_kills(
    start_daemon: Start, c_env: dict[str, str], c_bin: Path, tmp_path: Path, worker: str
) -> None:
    """The C client prints all its lines right though its worker (Python or C) is killed 3 times."""
    native = (
        '[modules.echo]\nworker = "ipad-echo-worker"\n' if worker == "c" else "[modules.echo]\n"
    )
    daemon = start_daemon(write_config(tmp_path, c_bin, native), env=c_env)
    with c_client(c_bin, daemon.socket, CALLS) as (proc, lines):
        for mark in KILL_AT:
            deadline = time.monotonic() + WAIT
            while len(lines) < mark and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            assert proc.poll() is None, (
                f"the client ended after {len(lines)} lines, before the kills"
            )
            kill_worker(daemon, "echo")
        status = proc.wait(timeout=120)
        assert proc.stderr is not None
        stderr = proc.stderr.read()
    assert status == 0, stderr
    assert lines == [expected_line(i) for i in range(CALLS)]
    assert stderr.count("recovered proxy") >= len(KILL_AT), stderr
    recovered = [r for r in daemon.events("proxy.state_changed") if r.get("reason") == "recovered"]
    assert len(recovered) >= len(KILL_AT)
    assert all(r["replayed"] == 1 for r in recovered)  # init, replayed on each new channel
    assert proxies_held(daemon) == 0  # released at the end


def test_c_worker_serves_ipad_clients(
    start_daemon: Start, c_env: dict[str, str], c_bin: Path, tmp_path: Path, connect: Connect,
    memfd: MakeFd,
) -> None:  # fmt: skip
    """The C worker serves both clients: echo, a buffer, refusals, and a SIGKILL recovered."""
    daemon = start_daemon(write_config(tmp_path, c_bin, "[modules.echo_c]\n"), env=c_env)
    client = connect(daemon.socket)
    proxy = client.request_proxy("echo_c")
    assert client.call(proxy, "init") is None
    assert client.call(proxy, "echo", {"text": "héllo"}) == {"text": "héllo"}
    data = os.urandom(100_000)
    result = client.call(proxy, "checksum", {}, {"data": memfd(data)})
    assert result == {"size": len(data), "crc32": zlib.crc32(data)}
    assert client.call(proxy, "checksum", {}, {"data": memfd(b"")}) == {"size": 0, "crc32": 0}
    with pytest.raises(UnknownMethod, match="no method 'nope'"):
        client.call(proxy, "nope")
    with pytest.raises(BadArguments, match="echo"):
        client.call(proxy, "echo", {"txt": "x"})
    with pytest.raises(BadArguments, match="echo"):
        client.call(proxy, "echo", {"text": 5})
    kill_worker(daemon, "echo_c")
    assert client.call(proxy, "echo", {"text": "after"}) == {"text": "after"}
    recovered = daemon.wait_for("proxy.state_changed", lambda r: r.get("reason") == "recovered")
    assert recovered["replayed"] == 1  # the client replayed init, a setup call by READY
    client.release(proxy)


def raw_channel(sock: socket.socket, module: str) -> socket.socket:
    """A proxy's channel, asked for by hand: a client library would seal what this test must not."""
    hello(sock)
    sock.send(p.encode(p.RequestProxy(module), 2))
    while (frame := receive(sock)) is not None and frame.request_id != 2:
        frame.close_fds()
    assert frame is not None
    assert isinstance(frame.message, p.ProxyGranted), frame.message
    channel = socket.socket(fileno=frame.fds[0])
    channel.settimeout(10)
    return channel


def reply(channel: socket.socket) -> p.Frame | None:
    """The worker's next message on a channel (None at end of stream)."""
    received = recv_packet(channel)
    return None if received is None else p.decode(*received, allowed=p.FROM_WORKER_CHANNEL)


def send_with_fds(channel: socket.socket, packet: bytes, count: int) -> None:
    """Send ``packet`` with ``count`` fresh memfds (closed on this side at once)."""
    fds = [os.memfd_create("garbage", os.MFD_CLOEXEC) for _ in range(count)]
    try:
        send_packet(channel, packet, fds)
    finally:
        for fd in fds:
            os.close(fd)


def call_packet(nfds: int, length_delta: int = 0, kind: int = p.MsgType.CALL) -> bytes:
    """A CALL of echo by hand, its header saying ``nfds`` and its length off by ``length_delta``."""
    payload = b"\x82\xa6method\xa4echo\xa4args\x81\xa4text\xa1z"
    return p.HEADER.pack(p.MAGIC, 1, kind, 0, nfds, 9, len(payload) + length_delta) + payload


def utf8_packet(text: bytes) -> bytes:
    """A CALL of echo whose text is these bytes, whatever they are."""
    payload = b"\x82\xa6method\xa4echo\xa4args\x81\xa4text" + bytes([0xA0 | len(text)]) + text
    return p.HEADER.pack(p.MAGIC, 1, p.MsgType.CALL, 0, 0, 4, len(payload)) + payload


#: Packets a hostile client may send on its channel, each a protocol error for the worker.
GARBAGE: dict[str, Callable[[socket.socket], object]] = {
    "bad magic": lambda s: s.send(b"XX" + bytes(18)),
    "short header": lambda s: s.send(b"IP\x01"),
    "wrong version": lambda s: s.send(
        p.HEADER.pack(p.MAGIC, 9, p.MsgType.CALL, 0, 0, 1, 1) + b"\x80"
    ),
    "wrong length": lambda s: s.send(call_packet(0, length_delta=1)),
    "not a CALL": lambda s: s.send(call_packet(0, kind=p.MsgType.HELLO)),
    "payload not a map": lambda s: s.send(
        p.HEADER.pack(p.MAGIC, 1, p.MsgType.CALL, 0, 0, 1, 1) + b"\x01"
    ),
    "truncated payload": lambda s: s.send(
        p.HEADER.pack(p.MAGIC, 1, p.MsgType.CALL, 0, 0, 1, 13) + b"\x82\xa6method\xa4echo"
    ),
    "fd count disagrees": lambda s: send_with_fds(s, call_packet(0), 1),
    "17 fds": lambda s: send_with_fds(s, call_packet(17), 17),
    "larger than MAX_PACKET": lambda s: s.send(call_packet(0) + bytes(p.MAX_PACKET)),
    "text not UTF-8": lambda s: s.send(utf8_packet(b"\xc3\x28")),
    "surrogate in UTF-8": lambda s: s.send(utf8_packet(b"\xed\xa0\x80")),
}


def test_c_worker_refuses_what_it_must(
    start_daemon: Start, c_env: dict[str, str], c_bin: Path, tmp_path: Path,
    raw_connect: Callable[[Path], socket.socket],
) -> None:  # fmt: skip
    """The C worker refuses an unsealed buffer and skips an unknown field of a CALL."""
    daemon = start_daemon(write_config(tmp_path, c_bin, "[modules.echo_c]\n"), env=c_env)
    pid = daemon.worker_pids()["echo_c"]
    fds_before = open_fds(pid)
    with raw_channel(raw_connect(daemon.socket), "echo_c") as channel:
        unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(unsealed, b"x" * 4096)
        send_packet(channel, p.encode(p.Call("checksum", {}, ("data",)), 1, nfds=1), [unsealed])
        os.close(unsealed)
        frame = reply(channel)
        assert frame is not None
        assert isinstance(frame.message, p.Error)
        assert (frame.message.code, frame.message.details) == ("bad_arguments", {"fd_arg": "data"})
        assert "F_SEAL_SHRINK" in frame.message.message
        # An unknown field in a CALL is skipped: newer peers add optional ones.
        payload = b"\x83" + b"\xa6method\xa4echo" + b"\xa4args\x81\xa4text\xa1y" + b"\xa5extra\xc3"
        channel.send(p.HEADER.pack(p.MAGIC, 1, p.MsgType.CALL, 0, 0, 2, len(payload)) + payload)
        frame = reply(channel)
        assert frame is not None
        assert frame.message == p.Result({"text": "y"})
    with raw_channel(raw_connect(daemon.socket), "echo_c") as channel:
        channel.send(p.encode(p.Call("echo", {"text": "still"}), 1))
        frame = reply(channel)
        assert frame is not None
        assert frame.message == p.Result({"text": "still"})
    assert daemon.worker_pids()["echo_c"] == pid
    wait_until(lambda: open_fds(pid) <= fds_before)  # the buffer, and each channel once it ended
    assert alive(pid)


def test_c_client_leaves_on_a_malformed_packet(c_bin: Path, tmp_path: Path) -> None:
    """A bad magic from the daemon makes the C client exit non-zero at once: no hang, no signal."""
    path = tmp_path / "fake.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(WAIT)
        with c_client(c_bin, path, 3) as (proc, lines):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(WAIT)
                assert conn.recv(p.MAX_PACKET)[:2] == p.MAGIC  # its HELLO
                conn.send(b"XX" + bytes(18))
                status = proc.wait(timeout=5)
        assert status > 0, status  # an exit status, not a signal
        assert lines == []


@pytest.mark.skipif(os.geteuid() != 0, reason="root builds the sandbox here (CI runs as root)")
def test_sandboxed_c_worker_is_pid_1_and_exits_on_sigterm(
    start_daemon: Start, c_env: dict[str, str], c_bin: Path, tmp_path: Path, connect: Connect
) -> None:
    """Sandboxed, the C worker runs as pid 1 of its namespace, serves, and SIGTERM ends it."""
    sandboxed = (
        '[sandbox]\nprocesses = 64\noptional = ["memory_max"]\n\n'
        '[modules.echo_c]\nproxy = "sandboxed"\n'
    )
    daemon = start_daemon(write_config(tmp_path, c_bin, sandboxed), env=c_env)
    pid = daemon.worker_pids()["echo_c"]
    nspid = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
    assert nspid[-1] == "1", nspid  # pid 1 in its own namespace: no default SIGTERM action
    client = connect(daemon.socket)
    proxy = client.request_proxy("echo_c")
    assert client.call(proxy, "echo", {"text": "boxed"}) == {"text": "boxed"}
    os.kill(pid, signal.SIGTERM)
    exited = daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == pid)
    assert exited.get("exit_status") == 128 + signal.SIGTERM, exited
    assert client.call(proxy, "echo", {"text": "again"}) == {"text": "again"}


@pytest.mark.parametrize("worker", ["python", "c"])
def test_worker_drops_a_channel_that_sends_garbage(
    start_daemon: Start, c_env: dict[str, str], c_bin: Path, tmp_path: Path, worker: str,
    raw_connect: Callable[[Path], socket.socket],
) -> None:  # fmt: skip
    """Each malformed packet on a channel gets ERROR bad_message and its end; the worker serves on.

    The same expectations hold for ipad's worker host and the C worker: they are the page's.
    """
    native = (
        '[modules.echo]\nworker = "ipad-echo-worker"\n' if worker == "c" else "[modules.echo]\n"
    )
    daemon = start_daemon(write_config(tmp_path, c_bin, native), env=c_env)
    pid = daemon.worker_pids()["echo"]
    fds_before = open_fds(pid)
    for name, send in GARBAGE.items():
        with raw_channel(raw_connect(daemon.socket), "echo") as channel:
            send(channel)
            frame = reply(channel)
            assert frame is not None, name
            assert isinstance(frame.message, p.Error), (name, frame.message)
            assert frame.message.code == "bad_message", (name, frame.message)
            assert reply(channel) is None, name  # then it closes the channel
    with raw_channel(raw_connect(daemon.socket), "echo") as channel:
        channel.send(p.encode(p.Call("echo", {"text": "still"}), 1))
        frame = reply(channel)
        assert frame is not None
        assert frame.message == p.Result({"text": "still"})
    assert daemon.worker_pids()["echo"] == pid
    wait_until(lambda: open_fds(pid) <= fds_before)  # what came with garbage is closed


@contextlib.contextmanager
def bare_worker(c_bin: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """The C worker run as the daemon runs it (control socket on fd 3, --parent-pid), no daemon."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.settimeout(10)
    child = theirs.fileno()
    argv = [str(c_bin / "ipad-echo-worker"), "--parent-pid", str(os.getpid())]
    # The socket goes to fd 3 between fork and exec; close_fds=False, or it would be closed
    # again (Python's own descriptors are not inheritable: nothing else leaks).
    to_fd_3 = lambda: os.dup2(child, 3)  # noqa: E731
    proc = subprocess.Popen(argv, preexec_fn=to_fd_3, close_fds=False,  # noqa: PLW1509
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    theirs.close()
    try:
        yield proc, ours
    finally:
        ours.close()  # the control socket's end: the worker exits
        try:
            proc.wait(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)
            assert proc.stderr is not None
            proc.stderr.close()


def control(
    sock: socket.socket, message: p.Message, request_id: int, fds: tuple[int, ...] = (),
    closed: list[p.InstanceClosed] | None = None,
) -> p.Frame:  # fmt: skip
    """Send a control request and return the worker's reply; INSTANCE_CLOSEDs go to ``closed``."""
    send_packet(sock, p.encode(message, request_id, nfds=len(fds)), fds)
    while True:
        received = recv_packet(sock)
        assert received is not None, "the worker closed its control socket"
        frame = p.decode(*received, allowed=p.FROM_WORKER_CONTROL)
        if isinstance(frame.message, p.InstanceClosed) and closed is not None:
            closed.append(frame.message)
            continue
        assert frame.request_id == request_id, frame
        return frame


def test_c_worker_survives_mutated_calls(c_bin: Path) -> None:
    """CALLs with random bytes flipped never crash the C worker or leak a descriptor."""
    rng = random.Random(19)  # noqa: S311 - reproducible mutations, not secrets
    # A CALL with an unknown field the worker must skip (msgspec itself would forbid it).
    payload = msgspec.msgpack.encode(
        {
            "method": "echo",
            "args": {"text": "fuzz"},
            "fd_args": [],
            "x": [1, 2.5, None, {"k": b"v"}],
        }
    )
    good = p.HEADER.pack(p.MAGIC, 1, p.MsgType.CALL, 0, 0, 1, len(payload)) + payload
    with bare_worker(c_bin) as (proc, ctl):
        load = p.Load("echo_c", "", "/nowhere", "/nowhere/uncalibrated.toml")
        ready = control(ctl, load, 1).message
        assert isinstance(ready, p.Ready), ready
        assert [m.name for m in ready.methods] == ["checksum", "echo", "init"]
        fds_before = open_fds(proc.pid)
        closed: list[p.InstanceClosed] = []
        seen: collections.Counter[str] = collections.Counter()
        for instance_id in range(1, 41):
            mine, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with mine, worker_end:
                fds = (worker_end.fileno(),)
                opened = control(ctl, p.OpenInstance(instance_id), 1 + instance_id, fds, closed)
                assert isinstance(opened.message, p.InstanceOpened), opened.message
                worker_end.close()
                mine.settimeout(10)
                for _ in range(100):
                    packet = bytearray(good)
                    for _ in range(rng.randint(1, 4)):
                        packet[rng.randrange(p.HEADER_SIZE, len(packet))] = rng.randrange(256)
                    mine.send(bytes(packet))
                    received = recv_packet(mine)
                    assert received is not None, "the channel ended without a word"
                    message = p.decode(*received, allowed=p.FROM_WORKER_CHANNEL).message
                    assert isinstance(message, (p.Result, p.Error)), (instance_id, message)
                    seen[message.code if isinstance(message, p.Error) else "result"] += 1
                    if isinstance(message, p.Error) and message.code == "bad_message":
                        assert recv_packet(mine) is None  # a malformed CALL ends its channel
                        break
        # Every channel's end is reported, and nothing of them stays open in the worker.
        wait_until(lambda: open_fds(proc.pid) <= fds_before)
        assert proc.poll() is None, "the worker died"
        assert control(ctl, p.Ping(), 999, closed=closed).message == p.Pong()
        assert sorted(c.instance_id for c in closed) == list(range(1, 41))
        # The mutations reached every outcome: results, refusals, broken packets.
        assert {"result", "bad_arguments", "unknown_method", "bad_message"} <= set(seen), seen
    assert proc.returncode == 0  # its control socket ended: a clean exit


def test_c_worker_exits_with_a_failure_on_a_broken_control_message(c_bin: Path) -> None:
    """A control packet the C worker cannot decode ends it with status 2, as the Python host."""
    with bare_worker(c_bin) as (proc, ctl):
        ctl.send(b"XX" + bytes(18))  # bad magic
        assert proc.wait(timeout=WAIT) == 2


def test_c_client_survives_mutated_replies(c_bin: Path, tmp_path: Path) -> None:
    """Mutated WELCOMEs and grants from a fake daemon end the C client by status, not signal."""
    rng = random.Random(19)  # noqa: S311 - reproducible mutations, not secrets
    welcome = p.encode(p.Welcome(1, "9.9", 1), 1)
    granted = p.encode(
        p.ProxyGranted(7, "echo", "1.0.0", 2, (p.MethodSpec("init", True),), "valid", 3), 3, nfds=1
    )
    path = tmp_path / "fake.sock"
    statuses: collections.Counter[int] = collections.Counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(WAIT)
        for round_ in range(150):
            target = welcome if round_ % 2 else granted
            packet = bytearray(target)
            for _ in range(rng.randint(1, 4)):
                packet[rng.randrange(p.HEADER_SIZE, len(packet))] = rng.randrange(256)
            with c_client(c_bin, path, 1) as (proc, _), server.accept()[0] as conn:
                conn.settimeout(WAIT)
                with contextlib.suppress(OSError):  # the client may leave at any point
                    conn.recv(p.MAX_PACKET)  # HELLO
                    if target is granted:
                        conn.send(welcome)
                        conn.recv(p.MAX_PACKET)  # SUBSCRIBE
                        conn.send(p.encode(p.Subscribed(0), 2))
                        conn.recv(p.MAX_PACKET)  # REQUEST_PROXY
                        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                        with a, b:
                            send_packet(conn, bytes(packet), [a.fileno()])
                    else:
                        conn.send(bytes(packet))
                    conn.shutdown(socket.SHUT_RDWR)
                statuses[proc.wait(timeout=10)] += 1
    assert set(statuses) <= {1, 2}, statuses  # refused or broken: never a signal, never "done"


def test_c_worker_beats_on_its_board(
    start_daemon: Start, c_env: dict[str, str], c_bin: Path, tmp_path: Path, connect: Connect
) -> None:
    """Idle, then between calls, the C worker beats on its board faster than a short timeout."""
    fast = (
        '[modules.echo_c]\n[modules.echo_c.restart]\nheartbeat_interval = "50ms"\n'
        'heartbeat_timeout = "300ms"\n'
    )
    daemon = start_daemon(write_config(tmp_path, c_bin, fast), env=c_env)
    pid = daemon.worker_pids()["echo_c"]
    client = connect(daemon.socket)
    proxy = client.request_proxy("echo_c")
    deadline = time.monotonic() + 1.5  # five timeouts, idle and calling in turn
    while time.monotonic() < deadline:
        assert client.call(proxy, "echo", {"text": "beat"}) == {"text": "beat"}
        time.sleep(0.35)  # longer than the timeout: only beats keep it alive
    assert daemon.events("worker.hung") == []
    assert daemon.worker_pids()["echo_c"] == pid
    assert alive(pid)


def by_hand(kind: p.MsgType, fields: dict[str, object], request_id: int, nfds: int = 0) -> bytes:
    """A message with any fields, unknown ones included, as a newer peer may send it."""
    payload = msgspec.msgpack.encode(fields)
    return p.HEADER.pack(p.MAGIC, 1, kind, 0, nfds, request_id, len(payload)) + payload


def assert_refused(message: p.Message, code: str) -> None:
    """``message`` is an ERROR with ``code``."""
    assert isinstance(message, p.Error), message
    assert message.code == code, message


def test_bare_c_worker_follows_worker_control(c_bin: Path) -> None:
    """LOAD with a board, unknown fields, refusals, CLOSE_INSTANCE, PING, SHUTDOWN, per the page."""
    with bare_worker(c_bin) as (proc, ctl):
        board = os.memfd_create("board", os.MFD_CLOEXEC)
        os.ftruncate(board, 16)
        load = {"module": "echo_c", "entry_point": "", "module_dir": "/x", "tuning": "/x/t.toml",
                "heartbeat_interval": 0.05, "future_field": {"a": [1]}}  # fmt: skip
        send_packet(ctl, by_hand(p.MsgType.LOAD, load, 1, nfds=1), [board])
        received = recv_packet(ctl)
        assert received is not None
        ready = p.decode(*received, allowed=p.FROM_WORKER_CONTROL).message
        assert isinstance(ready, p.Ready)
        assert (ready.module, ready.version, ready.beats) == ("echo_c", "1.0.0", True)
        methods = [(m.name, m.setup) for m in ready.methods]
        assert methods == [("checksum", False), ("echo", False), ("init", True)]
        beats = int.from_bytes(os.pread(board, 8, 0), "little")
        time.sleep(0.2)  # idle: four intervals
        assert int.from_bytes(os.pread(board, 8, 0), "little") >= beats + 3
        assert int.from_bytes(os.pread(board, 8, 8), "little") % 2 == 0  # no call runs
        os.close(board)
        assert_refused(
            control(ctl, p.Load("echo_c", "", "/x", "/x/t.toml"), 2).message, "bad_message"
        )
        assert_refused(control(ctl, p.OpenInstance(1), 3).message, "bad_message")  # no fd
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine, theirs:
            opened = by_hand(p.MsgType.OPEN_INSTANCE, {"instance_id": 1, "later": "x"}, 4, nfds=1)
            send_packet(ctl, opened, [theirs.fileno()])
            received = recv_packet(ctl)
            assert received is not None
            assert p.decode(*received, allowed=p.FROM_WORKER_CONTROL).message == p.InstanceOpened(1)
            theirs.close()
            twice = control(ctl, p.OpenInstance(1), 5, (mine.fileno(),)).message
            assert_refused(twice, "bad_message")  # an id already open
            mine.settimeout(10)
            mine.send(p.encode(p.Call("echo", {"text": "one"}), 1))
            assert reply(mine) is not None
            ctl.send(by_hand(p.MsgType.CLOSE_INSTANCE, {"instance_id": 1, "why": "new"}, 0))
            assert reply(mine) is None
        ctl.send(by_hand(p.MsgType.PING, {"newer": True}, 6))
        received = recv_packet(ctl)
        assert received is not None
        # PONG comes next: an instance the daemon closed is not reported back (no INSTANCE_CLOSED).
        assert p.decode(*received, allowed=p.FROM_WORKER_CONTROL) == p.Frame(p.Pong(), 6)
        ctl.send(p.encode(p.Shutdown()))
        assert proc.wait(timeout=5) == 0


def test_bare_c_worker_refuses_a_65th_instance(c_bin: Path) -> None:
    """The C worker holds 64 instances, refuses a 65th (module_error); SHUTDOWN ends them all."""
    with bare_worker(c_bin) as (proc, ctl):
        assert isinstance(control(ctl, p.Load("echo_c", "", "/x", "/x/t.toml"), 1).message, p.Ready)
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(65)]
        try:
            for n, (_, theirs) in enumerate(pairs[:64], start=10):
                opened = control(ctl, p.OpenInstance(n), n, (theirs.fileno(),))
                assert opened.message == p.InstanceOpened(n)
                theirs.close()  # the worker's copy is the only one left
            full = control(ctl, p.OpenInstance(99), 99, (pairs[64][1].fileno(),)).message
            assert_refused(full, "module_error")
            ctl.send(p.encode(p.Shutdown()))
            assert proc.wait(timeout=5) == 0
            for mine, _ in pairs[:64]:
                mine.settimeout(10)
                assert reply(mine) is None  # its instances went with it
        finally:
            for pair in pairs:
                for end in pair:
                    end.close()


def test_a_native_worker_crash_is_reported_by_its_signal_alone(
    start_daemon: Start, c_env: dict[str, str], c_bin: Path, tmp_path: Path
) -> None:
    """A C worker writes no claim nor stack on its board: its crash report has the signal only."""
    config = write_config(tmp_path, c_bin, '[modules.echo]\nworker = "ipad-echo-worker"\n')
    daemon = start_daemon(config, env=c_env)
    pid = daemon.worker_pids()["echo"]
    os.kill(pid, signal.SIGSEGV)
    report = daemon.wait_for("worker.crash_report", lambda r: r["worker_pid"] == pid)
    assert (report["kind"], report["signal"], report["method"], report["stack"]) == (
        "signal SIGSEGV",
        "SIGSEGV",
        None,
        "",
    )
    daemon.wait_for("worker.ready", lambda r: r.get("module") == "echo" and r["worker_pid"] != pid)
