"""What a worker sends is capped on receipt; replies listing every module always fit a packet."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from ipad.daemon.bounds import (
    MAX_METHODS,
    MAX_TEXT,
    MAX_VERSION,
    bound_worker_message,
    cap,
    fit_entries,
)
from ipad.protocol import wire as p
from ipad.protocol.fdpass import MIN_WMEM_MAX, size_send_buffer, sized_socketpair
from tests.privileges import as_user, needs_setpriv


def _size(message: p.Message) -> int:
    return len(p.encode(message)) - p.HEADER_SIZE


def test_cap_marks_what_it_cut() -> None:
    """A long text keeps its start and says how many bytes went; a short one is unchanged."""
    assert cap("short", 10) == "short"
    assert cap("é" * 12, 10) == "é" * 10 + "…[truncated 4 bytes]"


def test_every_string_a_worker_controls_is_capped() -> None:
    """READY's version and method names, ERROR's message and details, a close's reason."""
    ready = bound_worker_message(
        p.Ready("m", "9" * 300_000, (p.MethodSpec("x" * 1000, undoes="y" * 1000),), 1)
    )
    assert isinstance(ready, p.Ready)
    assert len(ready.version) < MAX_VERSION + 40
    assert len(ready.methods[0].name) < 200
    error = bound_worker_message(p.Error("c" * 999, "m" * 300_000, {"tb": "t" * 100_000}))
    assert isinstance(error, p.Error)
    assert len(error.message) < MAX_TEXT + 40
    assert "truncated" in error.details
    closed = bound_worker_message(p.InstanceClosed(3, "r" * 262_000))
    assert isinstance(closed, p.InstanceClosed)
    assert len(closed.reason) < MAX_TEXT + 40
    assert closed.instance_id == 3


def test_too_many_methods_fail_the_load() -> None:
    """A READY announcing more methods than PROXY_GRANTED can carry becomes a load ERROR."""
    methods = tuple(p.MethodSpec(f"m{n}") for n in range(MAX_METHODS + 1))
    assert isinstance(bound_worker_message(p.Ready("m", "1", methods, 1)), p.Error)


def test_a_status_of_many_modules_always_fits_a_packet() -> None:
    """Entries are degraded, then cut down, then left out (counted) until STATUS_REPLY fits."""
    entry = {"state": "running", "reason": "r" * MAX_TEXT, "version": "1.0.0",
             "sandbox": {"in_force": {str(n): "x" * 50 for n in range(40)}}}  # fmt: skip
    for count in (10, 200, 5000, 100_000):
        modules = {f"module-{n:06d}": dict(entry) for n in range(count)}
        reply = fit_entries(lambda e: p.StatusReply({"pid": 1}, e), modules)
        assert _size(reply) <= p.MAX_PAYLOAD
        decoded = msgspec.msgpack.decode(p.encode(reply)[p.HEADER_SIZE :])
        if count == 10:
            assert decoded["modules"] == modules  # small enough: not touched
        else:
            assert any(m.get("degraded") for m in decoded["modules"].values())


SEND_LARGEST = """
import socket
from ipad.protocol import wire as p
from ipad.protocol.fdpass import SEND_BUFFER, sized_socketpair
a, b = sized_socketpair()
a.send(b"x" * p.MAX_PACKET)
assert len(b.recv(p.MAX_PACKET)) == p.MAX_PACKET
print(a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= SEND_BUFFER)
"""


def test_a_largest_packet_fits_the_send_buffer() -> None:
    """Sized sockets send a MAX_PACKET message, which the default buffer refuses (EMSGSIZE)."""
    plain, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with plain, peer, pytest.raises(OSError, match="Message too long"):
        plain.send(b"x" * p.MAX_PACKET)
    ours, theirs = sized_socketpair()
    with ours, theirs:
        assert size_send_buffer(ours)
        ours.send(b"x" * p.MAX_PACKET)
        assert len(theirs.recv(p.MAX_PACKET)) == p.MAX_PACKET


@needs_setpriv
def test_an_unprivileged_process_sizes_its_send_buffer_too() -> None:
    """Without SO_SNDBUFFORCE, SO_SNDBUF within net.core.wmem_max is enough for MAX_PACKET."""
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    if wmem_max < MIN_WMEM_MAX:
        pytest.skip(f"net.core.wmem_max is {wmem_max}, below {MIN_WMEM_MAX}")
    result = subprocess.run([*as_user(), sys.executable, "-c", SEND_LARGEST],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
