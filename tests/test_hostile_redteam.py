"""Red team of deadlines and signatures: what a hostile module tries next, against a real daemon.

The ``rogue`` module (tests/modules/ipad_test_modules/rogue.py) attacks its
own worker, its standby and the daemon through them. Each test proves from
the outside that the attack failed and that the daemon, another module and
``ipadctl status`` carry on; the daemon fixture stops every daemon with
SIGTERM and fails the test unless it exits cleanly.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.client._blocking import LATE_PACKETS, _Connection
from ipad.client._core_requests import Match
from ipad.daemon.lifecycle import Stop, Timer
from ipad.protocol import wire as p
from tests.client_drivers import BlockingDriver, TrioDriver
from tests.daemon_process import (
    TEST_MODULES,
    WAIT,
    DaemonProcess,
    Record,
    of_module,
    others_still_work,
    write_config,
)
from tests.test_hostile_signing import Signed, still_serving
from tests.test_lifecycle import CLEAN, world

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., DaemonProcess]

#: How long the tests of repeated attacks watch the daemon answer them, in seconds.
WINDOW = 4.0

CONFIG = """
[daemon]
module_dirs = ["{modules}"]

[modules.echo]

[modules.rogue]
[modules.rogue.restart]
standby = true
{restart}
"""


def rogue_daemon(
    start_daemon: Start, directory: Path, daemon_env: dict[str, str], tuning: str,
    restart: str = "",
) -> DaemonProcess:  # fmt: skip
    """A daemon running ``rogue`` with ``tuning`` next to the shipped ``echo``."""
    path = directory / "rogue.toml"
    path.write_text(tuning)
    env = {**daemon_env, "IPAD_ROGUE_TUNING_FILE": str(path)}
    text = CONFIG.format(modules=TEST_MODULES, restart=restart)
    return start_daemon(write_config(directory, modules=text), env=env)


def rogue_standby_exits(daemon: DaemonProcess) -> list[Record]:
    """The daemon's records of ``rogue`` standbys that ended on their own, so far."""
    return [r for r in daemon.events("worker.standby_exited") if r.get("module") == "rogue"]


def test_a_standby_that_dies_in_every_load_is_relaunched_with_backoff(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A standby that exits in every LOAD is relaunched after a growing delay, not flat out."""
    daemon = rogue_daemon(start_daemon, tmp_path, daemon_env, "standby_exit = true\n",
                          restart='max_delay = "1s"')  # fmt: skip
    with BlockingClient(daemon.socket) as client:
        rogue = client.request_proxy("rogue")
        assert rogue.call("ping", timeout=WAIT) == "pong"
        daemon.wait_for("worker.standby_exited", of_module("rogue"))
        time.sleep(WINDOW)
        exits = rogue_standby_exits(daemon)
        # Unbounded, the daemon forked some 50 standbys a second here (155 in 3 s). With the
        # backoff: 0.01 s doubling to 1 s, about 7 in the first 1.3 s, then one a second.
        assert len(exits) <= 7 + WINDOW + 3, f"{len(exits)} standbys in {WINDOW} s"
        delays = [r["retry_in"] for r in exits]
        assert delays[:3] == [0.01, 0.02, 0.04]
        assert max(delays) == 1.0
        # Its active worker serves on, and the module counts as running.
        assert rogue.call("ping", timeout=WAIT) == "pong"
        status = json.loads(daemon.ctl("--json", "status").stdout)["modules"]["rogue"]
        assert status["state"] == "running"
        assert status["standby_pid"] is None
    others_still_work(daemon)


def test_standby_backoff_grows_and_resets_in_the_machine() -> None:
    """The lifecycle waits longer after each standby in a row that ends on its own, and resets."""
    w = world(initial_delay=0.1, multiplier=2.0, max_delay=0.5, stable_after=10.0)
    active = w.running(standby=True)
    delays = []
    for _ in range(5):
        standby = w.m.standby
        assert standby is not None
        w.exit(standby)  # dies on its own
        assert not w.launching.get(True)  # no launch until its backoff ran out
        delays.append(w.logged("worker.standby_exited")[-1].fields["retry_in"])
        w.fire(Timer.STANDBY)
        w.ready(w.launched(standby=True))
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
    # One that stayed loaded stable_after ended by a new fault: it counts as the first.
    w.now += 10.0
    standby = w.m.standby
    assert standby is not None
    w.exit(standby)
    assert w.logged("worker.standby_exited")[-1].fields["retry_in"] == 0.1
    # A stop while a standby waits for its backoff forgets the timer and finishes.
    w.feed(Stop())
    assert Timer.STANDBY not in w.timers
    w.exit(active, CLEAN)
    assert w.finished == 1


# --- deadlines -------------------------------------------------------------------------

#: Slack for a loaded two-core machine on top of what a deadline promises.
SLACK = 3.0


@pytest.mark.parametrize("flood", ["reply", "event"])
@pytest.mark.parametrize("kind", ["trio", "blocking"])
def test_a_flooded_channel_does_not_stretch_a_call_past_its_deadline(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], kind: str, flood: str
) -> None:
    """A call ends at its deadline even while the worker sends something every moment."""
    daemon = rogue_daemon(start_daemon, tmp_path, daemon_env, "", restart='call_timeout = "1s"')
    client = TrioDriver(daemon.socket) if kind == "trio" else BlockingDriver(daemon.socket)
    outcome: list[object] = []
    try:
        proxy = client.request_proxy("rogue")

        def call() -> None:
            try:
                client.call(proxy, "flood_hidden", {"kind": flood, "seconds": 20.0})
            except Exception as exc:  # noqa: BLE001 - what it raised is checked below
                outcome.append(exc)
            else:
                outcome.append("answered")

        started = time.monotonic()
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(1.0 + SLACK)  # the module's call_timeout is the call's deadline
        # Before the fix the blocking client read the flood until the module stopped (20 s).
        assert not caller.is_alive(), f"the call ran {time.monotonic() - started:.1f} s"
        assert len(outcome) == 1
        assert isinstance(outcome[0], ipc.TimedOut)
        others_still_work(daemon)
    finally:
        client.close()


def flooded_connection(packet: bytes, limit: int) -> tuple[_Connection, socket.socket, list[float]]:
    """A blocking connection whose peer sends ``packet`` again for each packet it reads.

    Its socket is never empty, by construction (a worker that floods faster
    than its client reads); the peer stops after ``limit``. Returned: the
    connection, the peer's end, and when each packet was read.
    """
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read: list[float] = []

    def refill() -> None:
        read.append(time.monotonic())
        if len(read) < limit:
            peer.send(packet)

    conn = _Connection(ours, p.FROM_WORKER_CHANNEL, "worker", on_event=lambda _: refill())
    take = conn.book.take  # a stray reply is read: the peer sends another

    def stray_read(frame: p.Frame) -> Match:
        match = take(frame)
        if match is not Match.EVENT:
            refill()
        return match

    conn.book.take = stray_read  # type: ignore[method-assign]
    peer.send(packet)
    return conn, peer, read


EVENT = p.encode(p.ModuleEvent("tick", None), 0)
STRAY = p.encode(p.Result("stray"), 12345)


@pytest.mark.parametrize(
    ("wait", "packet"),
    [("reply", EVENT), ("reply", STRAY), ("next_event", STRAY)],
    ids=["reply-events", "reply-stray-replies", "next_event-stray-replies"],
)
def test_a_blocking_wait_past_its_deadline_stops_reading_a_flood(wait: str, packet: bytes) -> None:
    """A blocking client's wait ends at its deadline on a socket that is never empty."""
    conn, peer, read = flooded_connection(packet, limit=200_000)
    try:
        deadline = time.monotonic() + 0.2
        if wait == "reply":
            with pytest.raises(ipc.TimedOut):
                conn.reply(conn.book.open().request_id, deadline)
        else:
            assert conn.next_event(0.2) is None
        # Before the fix it read all 200,000 (seconds), and a real flood for ever.
        assert len([t for t in read if t >= deadline]) <= LATE_PACKETS + 1
        assert 1000 < len(read) < 200_000  # it did read a flood until the deadline
    finally:
        conn.close()
        peer.close()


def test_stray_replies_on_the_control_socket_cost_the_log_little(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """Replies to requests the daemon never made end the worker at once, in a few log lines."""
    daemon = rogue_daemon(start_daemon, tmp_path, daemon_env, "")
    with BlockingClient(daemon.socket) as client:
        rogue = client.request_proxy("rogue")
        before = len(daemon.raw)
        old_pid = daemon.wait_for("worker.ready", lambda r: r.get("module") == "rogue")
        # The first stray reply is a lie only module code can tell: the worker is killed
        # for it (before the fix: 19,078 reply.dropped lines for 19,078 stray replies).
        with pytest.raises(ipc.IpadError):
            rogue.call("stray_control", {"count": 20_000}, timeout=WAIT)
        exited = daemon.wait_for("worker.exited", lambda r: r.get("module") == "rogue")
        assert exited["worker_pid"] == old_pid["worker_pid"]
        assert exited.get("cause") == "protocol"
        assert rogue.call("ping", wait=WAIT, timeout=WAIT) == "pong"  # its replacement
        others_still_work(daemon)
        lines = [line for line in daemon.raw[before:] if "reply.dropped" in line
                 or "protocol_violation" in line]  # fmt: skip
        assert len(lines) < 10


# --- signatures ------------------------------------------------------------------------

#: Planted next to a signed module: it must never run.
PLANTED = "import os\nos.environ['IPAD_PLANTED_RAN'] = '1'\n"


def test_a_file_planted_in_a_race_with_an_import_never_runs(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A file that appears and vanishes in a loop beside a signed module is never imported."""
    signed = Signed(tmp_path, standby=False)
    daemon = start_daemon(signed.config, env=signed.env(daemon_env))
    source = tmp_path / "planted.txt"
    source.write_text(PLANTED)
    target = signed.modules / "optional_accel.py"
    # The attacker, who may write the module directory but has no key: the file is there
    # for a moment, again and again, so that some import looks between its two checks.
    toggler = subprocess.Popen([sys.executable, "-c", TOGGLE, str(source), str(target)])
    try:
        with BlockingClient(daemon.socket) as client:
            proxy = client.request_proxy("signed")
            # Before the fix the planted code ran within 100 tries (20 ms). 2 s: under the
            # heartbeat_timeout of 3 s, which a call that blocks its loop counts against.
            outcome = proxy.call("try_import", {"name": "optional_accel", "seconds": 2.0},
                                 timeout=WAIT)  # fmt: skip
            assert outcome["tries"] > 1000  # the race was run, often
            assert outcome == {"tries": outcome["tries"], "ran": False}
            assert proxy.call("mark") == "signed"
            still_serving(client, daemon)
    finally:
        toggler.kill()
        toggler.wait(WAIT)
        target.unlink(missing_ok=True)
    others_still_work(daemon)


#: The attacker's loop: ``argv[1]`` linked to ``argv[2]`` and removed again, for ever.
TOGGLE = """
import os, sys
while True:
    os.link(sys.argv[1], sys.argv[2])
    os.unlink(sys.argv[2])
"""


def test_the_path_finder_never_looks_in_a_signed_module_directory(tmp_path: Path) -> None:
    """A file that appears just after the verified finder looked is not imported by the next one."""
    script = tmp_path / "race.py"
    script.write_text(RACE_WON.format(root=str(tmp_path / "modules")))
    (tmp_path / "modules" / "pkg").mkdir(parents=True)
    (tmp_path / "modules" / "pkg" / "__init__.py").write_text("MARK = 'signed'\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=WAIT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["signed", "ModuleNotFoundError", "not run"]


#: The race won on purpose: a meta path finder right after the verified one plants the file.
RACE_WON = """
import hashlib, os, sys
from ipad.worker import verified_import
root = {root!r}
data = open(os.path.join(root, "pkg", "__init__.py"), "rb").read()
verified_import.install(root, {{"pkg/__init__.py": hashlib.sha256(data).hexdigest()}})
sys.path.insert(0, root)

class Planter:
    def find_spec(self, name, path, target=None):
        if name == "optional_accel":
            with open(os.path.join(root, "optional_accel.py"), "w") as file:
                file.write("import os\\nos.environ['IPAD_PLANTED_RAN'] = '1'\\n")
        return None

sys.meta_path.insert(1, Planter())
import pkg
print(pkg.MARK)
try:
    import optional_accel
    print("imported")
except ImportError as exc:
    print(type(exc).__name__)
print("ran" if "IPAD_PLANTED_RAN" in os.environ else "not run")
"""
