"""Call round trip through a proxy, next to a raw SOCK_SEQPACKET ping-pong in the same client.

A proxy call goes from the client straight to the module's worker over a
SEQPACKET channel (not through the daemon): encode, send, the worker host
decodes and dispatches to the module, encodes the result, sends, the client
decodes. This times ``echo.echo`` with a small payload, with the blocking
client (``ipad.client.BlockingClient``) and with the trio client, each next
to the physical limit measured in the same run and in the same kind of
client: a 64-byte ping-pong over a SEQPACKET socketpair with a forked,
already warm process that sends every packet back (plain blocking
``send``/``recv`` against trio's ``await sock.send``/``await sock.recv``).

The ratio ipad / raw is the cost of ipad's protocol and dispatch on top of
the socket; the goal is at most 1.5. Below the table, where the time goes:
the same raw ping-pong with peers that add, one at a time, what ipad's
worker host and blocking client do around each packet (a receive buffer of
MAX_PACKET bytes, a selector wait, two settimeout calls), and one that
receives into a buffer allocated once.

Run: python bench/bench_call.py [--calls N]  (writes bench/results/call.json)
"""

from __future__ import annotations

import selectors
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from _common import (
    Row,
    echo_back,
    exit_on_sigterm,
    forked_peer,
    goal,
    parser,
    print_goals,
    print_rows,
    rounds_us,
    row,
    write_results,
)
from _ipad import running_daemon

from ipad.client import BlockingClient
from ipad.client._trio import open_client
from ipad.protocol import wire as p
from ipad.protocol.fdpass import ANCILLARY_SIZE

#: Repetitions of each measurement; the median is reported (the others show the noise).
ROUNDS = 5
#: The small payload: what echo's text argument carries.
TEXT = "x" * 16
#: The raw limit's packet size: about the size of the encoded call.
PACKET = b"x" * 64
#: The issue's goal: a call within this many raw round trips.
GOAL_RATIO = 1.5
CONFIG = "[modules.echo]\n"


async def per_call_us_async(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    """Microseconds per call of the coroutine function ``fn``, once per round."""
    out = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        out.append((time.perf_counter() - start) / n * 1e6)
    return out


def blocking_raw(n: int) -> list[float]:
    """The limit for the blocking client: send and recv on a plain socket."""
    with forked_peer(echo_back) as sock:

        def ping() -> None:
            sock.send(PACKET)
            sock.recv(4096)

        rounds_us(ping, n // 10, ROUNDS)  # warm-up
        return rounds_us(ping, n, ROUNDS)


def blocking_ipad(path: str, n: int) -> list[float]:
    """``echo`` through a blocking proxy."""
    with BlockingClient(path, name="bench_call") as client:
        proxy = client.request_proxy("echo")

        def call() -> None:
            proxy.call("echo", {"text": TEXT})

        rounds_us(call, n // 10, ROUNDS)
        return rounds_us(call, n, ROUNDS)


async def trio_raw(n: int) -> list[float]:
    """The limit for the trio client: trio's socket send and recv."""
    with forked_peer(echo_back) as plain:
        sock = trio.socket.from_stdlib_socket(plain)

        async def ping() -> None:
            await sock.send(PACKET)
            await sock.recv(4096)

        await per_call_us_async(ping, n // 10)
        return await per_call_us_async(ping, n)


async def trio_ipad(path: str, n: int) -> list[float]:
    """``echo`` through a trio proxy."""
    async with open_client(path, name="bench_call", subscribe=False) as client:
        proxy = await client.request_proxy("echo")

        async def call() -> None:
            await proxy.call("echo", {"text": TEXT})

        await per_call_us_async(call, n // 10)
        return await per_call_us_async(call, n)


# --- where the time goes: raw peers that do, step by step, what ipad's ends do -----------


def _worker_like(select_first: bool) -> Callable[[socket.socket], None]:
    """A raw peer that receives as the worker host does: recvmsg into a MAX_PACKET buffer."""

    def serve(sock: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        while True:
            if select_first:  # the worker host waits on a selector before each receive
                selector.select()
            data, _, _, _ = sock.recvmsg(p.MAX_PACKET, ANCILLARY_SIZE)
            if not data:
                return
            sock.sendmsg([data], [], socket.MSG_DONTWAIT)

    return serve


def _preallocated(sock: socket.socket) -> None:
    """A raw peer receiving into one buffer allocated once (recvmsg_into)."""
    view = memoryview(bytearray(p.MAX_PACKET))
    while True:
        size, _, _, _ = sock.recvmsg_into([view], ANCILLARY_SIZE)
        if not size:
            return
        sock.sendmsg([bytes(view[:size])], [], socket.MSG_DONTWAIT)


def breakdown(n: int) -> dict[str, float]:
    """The blocking round trip with raw peers that add one of ipad's habits at a time (us)."""
    steps: list[tuple[str, Callable[[socket.socket], None], bool]] = [
        ("raw: recv/send at both ends", echo_back, False),
        ("peer: recvmsg(MAX_PACKET) + sendmsg, as the worker", _worker_like(False), False),
        ("peer: + a selector wait before each receive", _worker_like(True), False),
        ("client too: recvmsg(MAX_PACKET), settimeout twice", _worker_like(True), True),
        ("peer: recvmsg_into a buffer allocated once", _preallocated, False),
    ]
    out = {}
    for name, serve, like_client in steps:
        with forked_peer(serve) as sock:

            def ping(sock: socket.socket = sock, like_client: bool = like_client) -> None:
                if like_client:
                    sock.sendmsg([PACKET])
                    sock.settimeout(None)
                    sock.recvmsg(p.MAX_PACKET, ANCILLARY_SIZE)
                    sock.settimeout(None)
                else:
                    sock.send(PACKET)
                    sock.recv(4096)

            rounds_us(ping, n // 10, 1)
            out[name] = statistics.median(rounds_us(ping, n, ROUNDS))
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure both clients and both limits, print, save."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--calls", type=int, default=5000, help="calls per round")
    args = args_parser.parse_args(argv)
    n = 50 if args.quick else args.calls

    # First, while this process's allocator is as fresh as a worker's: glibc serves the
    # MAX_PACKET receive buffers with mmap/munmap until a large free raises its threshold.
    steps = breakdown(n)
    with running_daemon(CONFIG) as daemon:
        path = str(daemon.socket)
        samples: dict[str, list[float]] = {
            "blocking: raw SEQPACKET ping-pong": blocking_raw(n),
            "blocking: ipad proxy call": blocking_ipad(path, n),
            "trio: raw SEQPACKET ping-pong": trio.run(trio_raw, n),
            "trio: ipad proxy call": trio.run(trio_ipad, path, n),
        }
    us = {name: statistics.median(values) for name, values in samples.items()}
    rows: list[Row] = []
    checked: list[dict[str, Any]] = []
    for kind in ("blocking", "trio"):
        raw = us[f"{kind}: raw SEQPACKET ping-pong"]
        ipad = us[f"{kind}: ipad proxy call"]
        rows.append(row(f"{kind}: ipad proxy call", ipad, "us", raw, f"raw {kind} RTT"))
        rows.append(row(f"limit: {kind} raw SEQPACKET ping-pong", raw, "us", raw, "the same"))
        checked.append(goal(f"{kind} call within {GOAL_RATIO:g}x the raw ping-pong",
                            f"{ipad / raw:.2f}x", ipad / raw <= GOAL_RATIO))  # fmt: skip
    print_rows(f"call round trip, median of {ROUNDS} rounds of {n} calls (us per call)", rows)
    print_goals(checked)
    print("where the time goes: the blocking raw round trip, adding ipad's habits one by one (us)")
    for name, value in steps.items():
        print(f"  {name:58s} {value:8.1f}")
    data = {"quick": args.quick, "calls_per_round": n, "rounds": ROUNDS, "payload_text": TEXT,
            "raw_packet_bytes": len(PACKET), "median_us": us, "samples_us": samples,
            "breakdown_us": steps, "goals": checked}  # fmt: skip
    write_results(args.results, "call", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
