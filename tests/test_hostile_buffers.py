"""Hostile modules against the buffers clients pass, and against the clients themselves.

A real daemon and real workers serve the hostile_buffers module
(tests/modules/ipad_test_modules/hostile_buffers.py); each client runs in its
own process (tests/hostile_buffers_client.py), so a SIGBUS shows as its exit
status, and every scenario runs with both clients. Each test also proves that
another module's calls, ``ipadctl status`` and a clean SIGTERM stop still work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ipad.client import BlockingClient, make_buffer
from ipad.client._backlog import EVENT_OVERHEAD, RAW_EVENTS, Backlog, RawModuleEvent
from ipad.protocol import wire as p
from tests.daemon_process import REPO, TEST_MODULES, DaemonProcess, write_config

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., DaemonProcess]
CLIENTS = ("blocking", "trio")
SCRIPT = Path(__file__).with_name("hostile_buffers_client.py")

#: Every attack on an input buffer and the errno the kernel must answer (never "ok").
REFUSED = {
    "truncate": "EPERM", "shrink_by_one": "EPERM", "grow": "EPERM", "write": "EPERM",
    "append": "EPERM", "punch_hole": "EPERM", "fallocate_grow": "EPERM",
    "map_shared_writable": "EPERM", "reopen_write": "EPERM", "reopen_truncate": "EPERM",
    "reopen_map_writable": "EPERM", "splice": "EPERM", "mprotect_writable": "EACCES",
    "madvise_remove": "EACCES", "proc_mem_shared": "EIO",
}  # fmt: skip


def serving(start_daemon: Start, directory: Path, kind: str = "isolated") -> DaemonProcess:
    """A daemon serving hostile_buffers (as proxy ``kind``) and echo, the neighbour."""
    modules = f'[modules.hostile_buffers]\nproxy = "{kind}"\n[modules.echo]\n'
    config = write_config(directory, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
                          modules=modules)  # fmt: skip
    return start_daemon(config)


@pytest.fixture
def daemon(start_daemon: Start, tmp_path: Path) -> DaemonProcess:
    """A daemon serving hostile_buffers and echo (the neighbour that must keep working)."""
    return serving(start_daemon, tmp_path)


def run_client(daemon: DaemonProcess, kind: str, scenario: str) -> tuple[dict[str, Any], str]:
    """Run one scenario in a client process; its JSON report and its log output.

    Fails with the exit status if the client died (a SIGBUS is -7).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), kind, scenario, str(daemon.socket)],
        capture_output=True, text=True, timeout=90, env=env, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        name = signal.Signals(-result.returncode).name if result.returncode < 0 else ""
        pytest.fail(f"{kind} client exited {result.returncode} {name}:\n{result.stderr[-3000:]}")
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1]) + result.stderr


def still_serving(daemon: DaemonProcess) -> None:
    """``ipadctl status`` answers, and another client's call on echo does."""
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert status["daemon"]["pid"] == daemon.proc.pid
    with BlockingClient(daemon.socket) as client:
        assert client.request_proxy("echo").call("count", timeout=10) == 1


@pytest.mark.parametrize("proxy", ["isolated", "sandboxed"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_attacks_on_an_input_buffer_fail(
    start_daemon: Start, tmp_path: Path, kind: str, proxy: str
) -> None:
    """Truncating, growing, writing, reopening, remapping a passed buffer all fail; the client lives."""
    daemon = serving(start_daemon, tmp_path, proxy)
    report, _ = run_client(daemon, kind, "attack")
    assert report["truncate"] == "EPERM"
    attacks = report["attacks"]
    if attacks["proc_mem_shared"] == "EACCES":  # a sandbox that does not let it open /proc/self/mem
        attacks = {**attacks, "proc_mem_shared": "EIO", "proc_mem_private": "ok"}
    assert {k: attacks[k] for k in REFUSED} == REFUSED
    assert attacks["proc_mem_private"] == "ok"  # copy-on-write: the worker's own pages only
    assert report["unchanged"]
    assert report["worker_sees_client_write"]
    assert report["size"] == 64 * 1024
    assert report["other"] == "still here"
    still_serving(daemon)
    daemon.stop_cleanly().check()


@pytest.mark.parametrize("kind", CLIENTS)
def test_replay_copies_survive_attacks_and_crashes(daemon: DaemonProcess, kind: str) -> None:
    """The copy kept for replay cannot be changed; a worker's SIGBUS is its own; replay is intact."""
    report, _ = run_client(daemon, kind, "replay")
    assert report["kept"]
    assert report["copy_unchanged"]
    assert report["mapping_unchanged"]
    assert all(v != "ok" for k, v in report["attacks"].items() if "proc_mem_private" not in k)
    assert report["crash"] == "WorkerCrashed"  # the mremap past the end killed the worker only
    assert report["recoveries"] == 1
    assert report["after_crash"]["truncate"] == "EPERM"
    assert report["other"] == "still here"
    still_serving(daemon)
    daemon.stop_cleanly().check()


@pytest.mark.parametrize("kind", CLIENTS)
def test_buffers_that_cannot_be_protected_are_refused(daemon: DaemonProcess, kind: str) -> None:
    """Not a memfd, unsealable, read-only, or an Output sealed against writes: refused, named."""
    report, _ = run_client(daemon, kind, "refused")
    for key, why in {"no_sealing": "cannot take seals", "read_only": "open read-only",
                     "plain_file": "not a memfd", "pipe": "not a memfd",
                     "output_sealed": "sealed against writes"}.items():  # fmt: skip
        assert f"buffer {key!r}" in report[key], report[key]
        assert why in report[key], report[key]
    assert report["other"] == "still here"
    still_serving(daemon)
    daemon.stop_cleanly().check()


@pytest.mark.parametrize("kind", CLIENTS)
def test_output_buffers_are_writable_but_not_resizable(daemon: DaemonProcess, kind: str) -> None:
    """An Output buffer is filled by the module, never resized; an input is never mapped writable."""
    report, _ = run_client(daemon, kind, "output")
    assert report["resize"] == "EPERM"
    assert report["filled"]
    assert "sealed against writes" in report["input_writable"]
    assert report["other"] == "still here"
    daemon.stop_cleanly().check()


def raw_call(proxy: Any, method: str, fd: int) -> p.Message:
    """A CALL sent past the client library's sealing, as a C client that skipped it would."""
    conn = proxy._conn
    request_id = conn.send(p.Call(method, {}, ("data",)), [fd])
    message: p.Message = conn.reply(request_id, None).message
    return message


def test_a_worker_refuses_to_map_an_unsealed_memfd(daemon: DaemonProcess) -> None:
    """A client that passes an unsealed memfd gets bad_arguments; the shared worker keeps serving."""
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("hostile_buffers")
        neighbour = BlockingClient(daemon.socket)
        shared = neighbour.request_proxy("hostile_buffers")
        unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(unsealed, b"x" * 8192)
        for method in ("digest", "swallow_refusal"):
            reply = raw_call(proxy, method, unsealed)
            assert isinstance(reply, p.Error)
            assert reply.code == "bad_arguments"
            assert "'data' cannot be mapped" in reply.message
            assert "F_SEAL_SHRINK" in reply.message
        os.ftruncate(unsealed, 0)  # had the worker mapped it, its next read would be a SIGBUS
        pipe_r, pipe_w = os.pipe()
        reply = raw_call(proxy, "digest", pipe_r)
        assert isinstance(reply, p.Error)
        assert "not a memfd" in reply.message
        for fd in (unsealed, pipe_r, pipe_w):
            os.close(fd)
        good = make_buffer(b"ok")  # sealed by the library as it is passed
        assert shared.call("digest", fds={"data": good}, timeout=10)
        assert proxy.call("digest", fds={"data": good}, timeout=10)
        os.close(good)
        neighbour.close()
    still_serving(daemon)
    daemon.stop_cleanly().check()


@pytest.mark.parametrize("kind", CLIENTS)
def test_an_event_flood_keeps_client_memory_bounded(daemon: DaemonProcess, kind: str) -> None:
    """40 events that decode to ~13 MB each: the client stores them raw, bounded, and counts losses."""
    report, _ = run_client(daemon, kind, "events")
    stored_mib = (report["stored"] - report["before"]) / 1024
    peak_mib = (report["peak"] - report["before"]) / 1024
    assert stored_mib < 24, report  # was 550 MB: every event kept decoded
    assert peak_mib < 64, report  # reading decodes one event at a time
    received = report["received"]
    assert received == list(range(40 - len(received), 40))  # the newest are kept
    assert 0 < len(received) < 40
    assert report["lost"] == 40 - len(received)
    assert report["other"] == "still here"
    still_serving(daemon)
    daemon.stop_cleanly().check()


@pytest.mark.parametrize("kind", CLIENTS)
def test_unsolicited_replies_give_a_bounded_number_of_log_lines(
    daemon: DaemonProcess, kind: str
) -> None:
    """20,000 replies to ids never sent: dropped, at most a burst of warnings plus their count."""
    report, output = run_client(daemon, kind, "replies")
    assert report["sent"] > 1000
    assert report["same_proxy"]
    assert report["other"] == "still here"
    dropped = [line for line in output.splitlines() if "reply.dropped" in line]
    assert len(dropped) <= 12, dropped[:20]  # was one line per reply
    if kind == "trio":  # the blocking client drops them silently
        assert any("reply.dropped_suppressed" in line for line in dropped), dropped
    still_serving(daemon)
    daemon.stop_cleanly().check()


@pytest.mark.parametrize("kind", CLIENTS)
def test_memory_exhaustion_is_an_error_on_the_proxy(daemon: DaemonProcess, kind: str) -> None:
    """A reply that cannot be decoded in the memory left fails that call; the client carries on."""
    report, _ = run_client(daemon, kind, "oom")
    assert report["small"] == 10
    assert "ran out of memory" in report["big"], report
    assert report["again"] == 10  # the proxy recovered
    assert report["other"] == "still here"
    still_serving(daemon)
    daemon.stop_cleanly().check()


@pytest.mark.parametrize("isolation", ["module", "proxy"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_a_reopen_after_a_refused_reply_does_not_wait_for_another_worker(
    start_daemon: Start, tmp_path: Path, kind: str, isolation: str
) -> None:
    """A proxy whose reply the client could not decode reopens on its live worker at once.

    Its worker never ended, so no other one is coming: with a start_timeout far
    longer than the client's 20 s wait for the recovery, the call after it
    succeeds only if the daemon answers the reopen without waiting for one.
    """
    modules = (f'[modules.hostile_buffers]\nisolation = "{isolation}"\n'
               '[modules.hostile_buffers.restart]\nstart_timeout = "300s"\n[modules.echo]\n')  # fmt: skip
    config = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
                          modules=modules)  # fmt: skip
    daemon = start_daemon(config)
    report, _ = run_client(daemon, kind, "oom")
    assert "ran out of memory" in report["big"], report
    assert report["again"] == 10, report  # recovered within the client's 20 s wait
    assert report["other"] == "still here"
    records = [r for r in daemon.events("proxy.state_changed") + daemon.events("worker.exited")
               if r["module"] == "hostile_buffers"]  # fmt: skip
    records.sort(key=lambda r: r["timestamp"])
    # The proxy stayed valid on its one worker until the client left; with isolation =
    # "proxy" that worker ends then, as a released proxy's does.
    assert [(r["event"], r.get("state")) for r in records][:2] == [
        ("proxy.state_changed", "valid"),
        ("proxy.state_changed", "closed"),
    ], records
    assert len({r["worker_pid"] for r in records}) == 1, records
    still_serving(daemon)
    daemon.stop_cleanly().check()


def raw_event(name: str, data: object) -> RawModuleEvent:
    """A module event as a client's channel receives it."""
    frame = p.decode(p.encode(p.ModuleEvent(name, data)), decoders=RAW_EVENTS)
    assert isinstance(frame.message, RawModuleEvent)
    return frame.message


def test_a_backlog_is_bounded_in_bytes_and_count() -> None:
    """Past either bound the oldest events go, counted; what is kept costs what arrived."""
    backlog = Backlog(size=3, max_bytes=3 * EVENT_OVERHEAD + 3000)
    for i in range(5):
        backlog.put(raw_event("e", {"i": i, "pad": "x" * 900}))
    assert (len(backlog), backlog.dropped) == (3, 2)
    assert backlog.bytes <= backlog.max_bytes
    backlog.put(raw_event("big", "y" * 2500))  # needs the room of three of the others
    assert len(backlog) == 1
    assert backlog.dropped == 5
    assert backlog.pop() == p.ModuleEvent("big", "y" * 2500)
    assert backlog.bytes == 0


def test_an_event_that_cannot_be_decoded_when_read_is_counted_lost() -> None:
    """Nesting too deep to decode is found when the event is read: skipped, counted, no error."""
    backlog = Backlog()
    deep = RawModuleEvent("deep", msgspec.Raw(b"\x91" * 100_000 + b"\xc0"))
    backlog.put(deep)
    backlog.put(raw_event("fine", 1))
    assert backlog.pop() is None
    assert backlog.pop() == p.ModuleEvent("fine", 1)
    assert backlog.dropped == 1
