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

Ratios are frames/s of the limit over frames/s of the row (1.0: as fast as
the limit); "saved per frame" is what registration saves over passing.

Run: python bench/bench_registered.py [--frames N]  (writes bench/results/registered.json)
"""

from __future__ import annotations

import functools
import mmap
import os
import socket
import sys
import zlib
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


def _serve_kept(sock: socket.socket, pool: list[int]) -> None:
    maps = [mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in pool]
    while data := sock.recv(16):
        zlib.crc32(maps[data[0]])
        sock.send(b"r")


def raw_kept_fps(pool: list[int], frames: int) -> float:
    """The limit of a registered call: name the buffer, CRC-32 its kept mapping, answer."""
    with forked_peer(functools.partial(_serve_kept, pool=pool)) as sock:
        index = {fd: bytes([i]) for i, fd in enumerate(pool)}

        def frame(fd: int) -> None:
            sock.send(index[fd])
            sock.recv(16)

        return frames_per_s(frame, pool, frames)


def bare_fps(pool: list[int], frames: int) -> float:
    """A bare SEQPACKET round trip, one byte each way."""
    with forked_peer(echo_back) as sock:

        def frame(_fd: int) -> None:
            sock.send(b"x")
            sock.recv(16)

        return frames_per_s(frame, pool, frames)


def in_process_fps(pool: list[int], frames: int) -> float:
    """CRC-32 of a kept mapping, in this process."""
    maps = {fd: mmap.mmap(fd, 0, prot=mmap.PROT_READ) for fd in pool}
    return frames_per_s(lambda fd: zlib.crc32(maps[fd]), pool, frames)


def ipad_fps(path: str, pool: list[int], frames: int, *, registered: bool) -> float:
    """``echo.checksum`` through a blocking proxy, the buffer registered or passed per call."""
    with BlockingClient(path, name="bench_registered") as client:
        proxy = client.request_proxy("echo")
        if registered:
            proxy.map_buffers(dict(enumerate(pool)))
            ids = {fd: Registered(i) for i, fd in enumerate(pool)}

            def frame(fd: int) -> None:
                proxy.call("checksum", fds={"data": ids[fd]})

        else:

            def frame(fd: int) -> None:
                proxy.call("checksum", fds={"data": fd})

        return frames_per_s(frame, pool, frames)


def main(argv: list[str] | None = None) -> int:
    """Measure both ways and the limits, print, save."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--frames", type=int, default=2000, help="frames per measurement")
    args = args_parser.parse_args(argv)
    frames = 20 if args.quick else args.frames

    pool = buffer_pool(BUFFER_BYTES)
    try:
        fps: dict[str, float] = {
            "limit: bare SEQPACKET round trip": bare_fps(pool, frames),
            "limit: raw round trip + CRC-32 of a kept mapping": raw_kept_fps(pool, frames),
            "limit: CRC-32 in-process (no process boundary)": in_process_fps(pool, frames),
        }
        with running_daemon(CONFIG) as daemon:
            path = str(daemon.socket)
            fps["ipad: registered, echo.checksum"] = ipad_fps(path, pool, frames, registered=True)
            fps["ipad: passed per call, echo.checksum"] = ipad_fps(
                path, pool, frames, registered=False
            )
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
               f"{frames} frames, pool of {POOL}", rows)  # fmt: skip
    data: dict[str, Any] = {"quick": args.quick, "buffer_bytes": BUFFER_BYTES, "pool": POOL,
                            "frames": frames, "fps": fps}  # fmt: skip
    write_results(args.results, "registered", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
