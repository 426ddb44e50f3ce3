"""Thousands of hostile connections (hypothesis) against one live daemon, which loses nothing.

Each example is one connection that sends a few packets: valid client
messages with replayed and out-of-order request ids, messages of the wrong
direction, damaged headers and payloads, truncated, empty and oversized
packets, junk, and descriptors of every kind on any of them. The daemon
must answer or close that connection with a reason, never reply with an
id it was not sent, and never meet an internal error; afterwards a
well-behaved client still holds its proxies, and the daemon's descriptors
and memory are back where they were.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipad.client import BlockingClient
from ipad.protocol import wire as p
from tests.daemon_process import DaemonProcess, open_fds, rss_kib, wait_until, write_config
from tests.raw_client import receive

#: Examples (connections) after the warm-up; IPAD_FUZZ_EXAMPLES asks for more.
EXAMPLES = int(os.environ.get("IPAD_FUZZ_EXAMPLES", "2000"))
#: Examples run before the baseline is taken: allocator arenas, caches and standbys settle.
WARMUP = 300
#: How much the daemon's resident memory may grow over the examples, from /proc: the
#: allocator keeps freed arenas and a leak of even 100 bytes per packet would pass 2 MiB.
RSS_TOLERANCE_KIB = 4096

#: The [clients] limits the daemon runs with here (small, so the fuzzer reaches them).
LIMIT = 4096

pytestmark = pytest.mark.timeout(600)

Start = Callable[..., DaemonProcess]
Step = tuple[str, bytes, tuple[str, ...]]

# --- what one connection sends ---------------------------------------------------------

#: Request ids: mostly a handful, so ids repeat and arrive out of order; sometimes any u64.
request_ids = st.one_of(st.integers(0, 6), st.integers(0, p.MAX_REQUEST_ID))
proxy_ids = st.one_of(st.integers(0, 40), st.integers(-(2**63), 2**64 - 1))
names = st.one_of(st.sampled_from(["echo", "awb", "agc", "nope", ""]), st.text(max_size=12))
#: Admin commands that do nothing: restart, reload and stop would end the well-behaved
#: client's proxies or the daemon itself (root may run them).
harmless = st.one_of(st.sampled_from(["", "bogus", "Stop", "RELOAD"]), st.text(max_size=8)).filter(
    lambda command: command not in ("restart", "reload", "stop")
)

client_messages: st.SearchStrategy[p.Message] = st.one_of(
    st.builds(p.Hello, versions=st.lists(st.integers(0, 255), max_size=4).map(tuple),
              client=st.text(max_size=12)),
    st.builds(p.RequestProxy, module=names, pipeline=st.none() | names,
              pipeline_version=st.none() | st.integers(-3, 5)),
    st.builds(p.ReleaseProxy, proxy_id=proxy_ids),
    st.builds(p.ReopenProxy, proxy_id=proxy_ids),
    st.builds(p.ProxyReady, proxy_id=proxy_ids, replayed=st.integers(0, 4)),
    st.builds(p.Subscribe, since=st.none() | st.integers(0, 10**6)),
    st.just(p.Status()),
    st.just(p.ListModules()),
    st.builds(p.Admin, command=harmless, module=st.none() | names),
    st.builds(p.Goodbye, reason=st.text(max_size=12)),
    # The wrong direction: what only the daemon or a worker may send.
    st.sampled_from([p.Ping(), p.Pong(), p.Shutdown(), p.Result(1), p.Welcome(1, "x", 1),
                     p.Call("echo"), p.CloseInstance(1), p.Error("x", "y")]),
)  # fmt: skip


def packet_of(message: p.Message, request_id: int) -> bytes:
    """A well-formed packet of ``message`` (sent with fds, its header's count will be wrong)."""
    return p.encode(message, request_id)


#: Header fields to overwrite: (offset, struct format).
HEADER_FIELDS = [(0, "<2s"), (2, "<B"), (3, "<B"), (4, "<H"), (6, "<H"), (8, "<Q"), (16, "<I")]


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A valid packet with one thing wrong in its header or payload."""
    packet = bytearray(packet_of(draw(client_messages), draw(request_ids)))
    how = draw(st.sampled_from(["flip", "truncate", "extend", "field"]))
    if how == "flip":
        index = draw(st.integers(0, len(packet) - 1))
        packet[index] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        del packet[draw(st.integers(1, len(packet) - 1)) :]
    elif how == "extend":
        packet += draw(st.binary(min_size=1, max_size=32))
    else:
        offset, fmt = draw(st.sampled_from(HEADER_FIELDS))
        if fmt == "<2s":
            value: Any = draw(st.binary(min_size=2, max_size=2))
        else:
            value = draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
        struct.pack_into(fmt, packet, offset, value)
    return bytes(packet)


@st.composite
def oversized(draw: st.DrawFn) -> bytes:
    """A packet just past the configured limit, or past what the protocol allows at all."""
    size = draw(st.sampled_from([LIMIT + 1, p.MAX_PAYLOAD, p.MAX_PAYLOAD + 1]))
    kind = draw(st.sampled_from([p.MsgType.STATUS, p.MsgType.REQUEST_PROXY, p.MsgType.HELLO]))
    return p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, kind, 0, 0, 1, size) + b"\x90" * size


FD_KINDS = ("devnull", "pipe", "socket", "memfd", "directory", "listener")


@st.composite
def steps(draw: st.DrawFn) -> Step:
    """One packet to send, what kind it is, and the kinds of fds to send with it."""
    # Mostly valid messages, so that connections live long enough to reach deeper states.
    kind = draw(st.sampled_from(["valid"] * 6 + ["damaged", "junk", "oversized", "fds", "empty"]))
    fds: tuple[str, ...] = ()
    if kind == "valid":
        packet = packet_of(draw(client_messages), draw(request_ids))
    elif kind == "damaged":
        packet = draw(damaged())
    elif kind == "junk":
        packet = draw(st.binary(min_size=1, max_size=64))
    elif kind == "oversized":
        packet = draw(oversized())
    elif kind == "fds":
        packet = draw(st.one_of(st.builds(packet_of, client_messages, request_ids), damaged()))
        fds = tuple(draw(st.lists(st.sampled_from(FD_KINDS), min_size=1, max_size=20)))
    else:
        packet = b""
    return kind, packet, fds


#: One connection: whether it starts with a proper HELLO (mostly), then its steps.
connections = st.tuples(
    st.sampled_from([True, True, True, False]), st.lists(steps(), min_size=1, max_size=8)
)


# --- sending it --------------------------------------------------------------------------


@contextlib.contextmanager
def descriptors(kinds: tuple[str, ...], where: Path) -> Iterator[list[int]]:
    """Fresh descriptors of the given kinds to send, all closed on our side afterwards."""
    send: list[int] = []
    extra: list[int] = []  # the other ends, kept open until the packet is sent
    try:
        for kind in kinds:
            if kind == "devnull":
                send.append(os.open(os.devnull, os.O_RDONLY))
            elif kind == "pipe":
                read_end, write_end = os.pipe()
                send.append(write_end)
                extra.append(read_end)
            elif kind == "socket":
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                send.append(theirs.detach())
                extra.append(ours.detach())
            elif kind == "memfd":
                send.append(os.memfd_create("fuzz"))
            elif kind == "directory":
                send.append(os.open(where, os.O_RDONLY | os.O_DIRECTORY))
            else:
                send.append(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET).detach())
        yield send
    finally:
        p.close_fds([*send, *extra])


class Fuzzer:
    """Sends examples to one daemon and checks each connection's replies."""

    def __init__(self, daemon: DaemonProcess, where: Path) -> None:
        self.daemon = daemon
        self.where = where
        self.sent: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.connections = 0

    def run(self, hello_first: bool, plan: list[Step]) -> None:
        """One connection: maybe HELLO, the steps, then a STATUS whose reply ends it."""
        self.connections += 1
        sentinel = p.MAX_REQUEST_ID - self.connections
        ids: set[int] = {sentinel}
        quiet_end = False  # an empty packet or GOODBYE lets the daemon close without a word
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * p.MAX_PACKET)
            sock.settimeout(20)
            sock.connect(str(self.daemon.socket))
            if hello_first:
                plan = [("valid", p.encode(p.Hello((p.PROTOCOL_VERSION,), "fuzz"), 1), ()), *plan]
            try:
                for kind, packet, fd_kinds in plan:
                    if len(packet) >= p.HEADER_SIZE:
                        ids.add(struct.unpack_from("<Q", packet, 8)[0])
                    quiet_end |= not packet or packet[3:4] == bytes([p.MsgType.GOODBYE])
                    with descriptors(fd_kinds, self.where) as fds:
                        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", fds).tobytes())] if fds else []  # fmt: skip
                        sock.sendmsg([packet], rights)
                    self.sent[kind] += 1
                sock.send(p.encode(p.Status(), sentinel))
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):  # the daemon hung up
                    raise
            self.outcomes[self.read_to_the_end(sock, ids, sentinel, quiet_end)] += 1

    def read_to_the_end(self, sock: socket.socket, ids: set[int], sentinel: int,
                        quiet_end: bool) -> str:  # fmt: skip
        """Read replies until the sentinel's, or the end; every reply's id must be one we sent."""
        goodbye = None
        while True:
            try:
                frame = receive(sock)
            except ConnectionResetError:
                continue  # reported first: what the daemon sent before it is still there
            if frame is None:
                assert goodbye is not None or quiet_end, "closed without a reason"
                return "goodbye" if goodbye else "closed"
            frame.close_fds()
            message = frame.message
            if isinstance(message, p.Goodbye):
                assert message.reason
                goodbye = message.reason
            elif not isinstance(message, p.Event):
                assert frame.request_id in ids, (frame.request_id, message)
                assert frame.request_id != 0, ("a request with id 0 was answered", message)
                if frame.request_id == sentinel:
                    return "answered"


def fuzz(fuzzer: Fuzzer, examples: int) -> None:
    """Run ``examples`` hypothesis examples through ``fuzzer``."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(connections)
    def one(connection: tuple[bool, list[Step]]) -> None:
        fuzzer.run(*connection)

    one()


def test_fuzzed_connections_leave_the_daemon_as_it_was(
    start_daemon: Start, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After thousands of hostile connections: proxies kept, fds and memory back, no internal error."""
    config = write_config(tmp_path, f"[clients]\nmax_message_size = {LIMIT}\n"
                          "max_proxies_per_client = 3\nmax_pending_requests = 8\n")  # fmt: skip
    daemon = start_daemon(config)
    fuzzer = Fuzzer(daemon, tmp_path)
    with BlockingClient(daemon.socket) as good:
        proxies = {module: good.request_proxy(module) for module in ("echo", "awb", "agc")}
        assert proxies["echo"].call("count") == 1
        fuzz(fuzzer, WARMUP)
        wait_until(lambda: good.status().daemon["proxies"] == 3)
        daemon.wait_standbys()
        fds_before, rss_before = open_fds(daemon.proc.pid), rss_kib(daemon.proc.pid)
        fuzz(fuzzer, EXAMPLES)
        # Every fuzzed connection is gone; what they held is released in the background.
        wait_until(lambda: good.status().daemon["clients"] == 1)
        wait_until(lambda: good.status().daemon["proxies"] == 3)
        daemon.wait_standbys()
        wait_until(lambda: open_fds(daemon.proc.pid) == fds_before, timeout=10)
        rss_after = rss_kib(daemon.proc.pid)
        assert proxies["echo"].call("count") == 2
        assert proxies["echo"].call("echo", {"text": "still here"}) == {"text": "still here"}
        assert proxies["awb"].valid
        assert proxies["agc"].valid
        assert good.status().modules["echo"]["restarts"] == 0
    assert rss_after - rss_before <= RSS_TOLERANCE_KIB, (rss_before, rss_after)
    assert daemon.events("request.internal_error") == []
    assert daemon.events("client.session_failed") == []
    assert set(fuzzer.sent) == {"valid", "damaged", "junk", "oversized", "fds", "empty"}
    assert {"answered", "goodbye"} <= set(fuzzer.outcomes)
    with capsys.disabled():
        print(f"\nfuzz: {fuzzer.connections} connections, {sum(fuzzer.sent.values())} packets "
              f"{dict(fuzzer.sent)}, outcomes {dict(fuzzer.outcomes)}; daemon fds {fds_before}, "
              f"RSS {rss_before} -> {rss_after} KiB")  # fmt: skip
