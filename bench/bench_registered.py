"""Registered buffers: a 1 MiB buffer registered once and named by id, against passing it per call.

A camera hands its IPA the same few buffers frame after frame. Registered
(``proxy.map_buffers`` once, then ``fds={"data": Registered(id)}``), the
worker maps each buffer once and the call carries an integer; passed per call
(``fds={"data": fd}``, bench_buffers.py), each call passes the descriptor
(SCM_RIGHTS) and the worker maps, faults in and unmaps 1 MiB every time. Both
run ``echo.checksum`` (CRC-32 of the whole buffer) through a blocking proxy,
over a pool of four buffers.

Next to them, the limits, measured in the same run:

- raw round trip + CRC-32 of a kept mapping: a forked, warm peer that mapped
  the four buffers once gets one byte naming the buffer on a SEQPACKET
  socketpair, computes the CRC-32 and answers (what a registered call must do
  at the least);
- CRC-32 in-process: the same work with no process boundary at all;
- bare SEQPACKET round trip: one byte there and back, no work.

The variants take turns, ROUNDS rounds of frames/ROUNDS frames each, and
each figure is the median of its rounds. Ratios are frames/s of the limit
over frames/s of the row (1.0: as fast as
the limit); "saved per frame" is what registration saves over passing.

Run: python bench/bench_registered.py [--frames N]  (writes bench/results/registered.json)
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import socket
import statistics
import sys
import zlib
from collections.abc import Callable
from typing import Any

from _common import (
    Row,
    echo_back,
    exit_on_sigterm,
    forked_peer,
    parser,
    print_rows,
    row,
    write_results,
)
from _ipad import running_daemon
from bench_buffers import BUFFER_BYTES, POOL, buffer_pool, frames_per_s

from ipad.client import BlockingClient, Registered

CONFIG = "[modules.echo]\n"
#: Rounds in which the variants take turns; each variant's figure is its median.
ROUNDS = 5


def _serve_kept(sock: socket.socket, pool: list[int]) -> None:
    maps = [mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in pool]
    while data := sock.recv(16):
        zlib.crc32(maps[data[0]])
        sock.send(b"r")


Frame = Callable[[int], object]


def raw_kept(stack: contextlib.ExitStack, pool: list[int]) -> Frame:
    """The limit of a registered call: name the buffer, CRC-32 its kept mapping, answer."""
    sock = stack.enter_context(forked_peer(functools.partial(_serve_kept, pool=pool)))
    index = {fd: bytes([i]) for i, fd in enumerate(pool)}

    def frame(fd: int) -> None:
        sock.send(index[fd])
        sock.recv(16)

    return frame


def bare_round_trip(stack: contextlib.ExitStack) -> Frame:
    """A bare SEQPACKET round trip, one byte each way."""
    sock = stack.enter_context(forked_peer(echo_back))

    def frame(_fd: int) -> None:
        sock.send(b"x")
        sock.recv(16)

    return frame


def in_process(pool: list[int]) -> Frame:
    """CRC-32 of a kept mapping, in this process."""
    maps = {fd: mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in pool}
    return lambda fd: zlib.crc32(maps[fd])


def through_ipad(client: BlockingClient, pool: list[int], *, registered: bool) -> Frame:
    """``echo.checksum`` through a blocking proxy, the buffer registered or passed per call."""
    proxy = client.request_proxy("echo")
    if registered:
        proxy.map_buffers(dict(enumerate(pool)))
        ids = {fd: Registered(i) for i, fd in enumerate(pool)}
        return lambda fd: proxy.call("checksum", fds={"data": ids[fd]})
    return lambda fd: proxy.call("checksum", fds={"data": fd})


def interleaved(variants: dict[str, Frame], pool: list[int], frames: int) -> dict[str, float]:
    """Frames/s of each variant: the median of ROUNDS rounds, the variants taking turns.

    Taking turns puts every variant in the same minutes of a machine whose
    speed moves from one minute to the next, so their ratios mean something.
    """
    per_round = max(len(pool), frames // ROUNDS)
    seen: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, frame in variants.items():
            seen[name].append(frames_per_s(frame, pool, per_round))
    return {name: statistics.median(values) for name, values in seen.items()}


def main(argv: list[str] | None = None) -> int:
    """Measure both ways and the limits, print, save."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--frames", type=int, default=2000, help="frames per measurement")
    args = args_parser.parse_args(argv)
    frames = 20 if args.quick else args.frames

    pool = buffer_pool(BUFFER_BYTES)
    try:
        with contextlib.ExitStack() as stack:
            daemon = stack.enter_context(running_daemon(CONFIG))
            client = stack.enter_context(BlockingClient(daemon.socket, name="bench_registered"))
            variants = {
                "ipad: registered, echo.checksum": through_ipad(client, pool, registered=True),
                "ipad: passed per call, echo.checksum": through_ipad(
                    client, pool, registered=False
                ),
                "limit: raw round trip + CRC-32 of a kept mapping": raw_kept(stack, pool),
                "limit: CRC-32 in-process (no process boundary)": in_process(pool),
                "limit: bare SEQPACKET round trip": bare_round_trip(stack),
            }
            fps = interleaved(variants, pool, frames)
    finally:
        for fd in pool:
            os.close(fd)
    kept = fps["limit: raw round trip + CRC-32 of a kept mapping"]
    alone = fps["limit: CRC-32 in-process (no process boundary)"]
    bare = fps["limit: bare SEQPACKET round trip"]
    reg = fps["ipad: registered, echo.checksum"]
    per_call = fps["ipad: passed per call, echo.checksum"]
    rows: list[Row] = []
    for name, value, limit, to in (
        ("ipad: registered, echo.checksum", reg, kept, "raw + CRC of kept mapping"),
        ("ipad: passed per call, echo.checksum", per_call, kept, "raw + CRC of kept mapping"),
        ("limit: raw round trip + CRC-32 of a kept mapping", kept, alone, "CRC in-process"),
        ("limit: CRC-32 in-process (no process boundary)", alone, alone, "CRC in-process"),
        ("limit: bare SEQPACKET round trip", bare, bare, "bare round trip"),
    ):
        rows.append(row(name, value, "fps", None) | {"ratio": limit / value, "ratio_to": to})
    rows.append(row("ipad: registered, per frame", 1e6 / reg, "us"))
    rows.append(row("ipad: passed per call, per frame", 1e6 / per_call, "us"))
    rows.append(row("ipad: registration saves per frame", 1e6 / per_call - 1e6 / reg, "us"))
    rows.append(row("ipad: registered, added per frame over the limit", 1e6 / reg - 1e6 / kept,
                    "us"))  # fmt: skip
    print_rows(f"1 MiB buffer, registered vs per call (frames/s; ratio = limit fps / this fps), "
               f"median of {ROUNDS} rounds, {frames} frames, pool of {POOL}", rows)  # fmt: skip
    data: dict[str, Any] = {"quick": args.quick, "buffer_bytes": BUFFER_BYTES, "pool": POOL,
                            "frames": frames, "rounds": ROUNDS, "fps": fps}  # fmt: skip
    write_results(args.results, "registered", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
