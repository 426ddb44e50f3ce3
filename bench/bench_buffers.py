"""Buffer passing: 1 MiB statistics buffers sent as memfds, one per call, in frames per second.

A camera hands an IPA module one statistics buffer per frame. ipad passes it
as a file descriptor with the call (SCM_RIGHTS), never as bytes in the
message; the worker maps it read-only. This measures, with the blocking
client, frames per second for:

- ``echo.checksum``: the worker maps the buffer and computes its CRC-32, a
  fixed, small amount of work per byte;
- ``awb.process_stats``: the shipped grey-world AWB reads every one of the
  65536 zone records of the 1 MiB buffer in Python.

Next to each, in the same run, its limit:

- raw fd passing: a forked, warm process receives the memfd with ``recvmsg``
  on a SEQPACKET socketpair, closes it and answers one byte (the cost of
  passing a descriptor at all);
- raw fd passing + map + CRC-32: the same peer maps the buffer and computes
  the CRC-32 before answering, the same work ``echo.checksum`` does;
- AWB in-process: ``GrayWorldAwb.process_stats`` called directly in this
  process on the same buffer (no process boundary at all).

Buffers come from a pool of four memfds filled once, as a camera reuses its
buffers. Ratios are frames/s of the limit over frames/s of ipad: 1.0 means
ipad adds nothing.

Run: python bench/bench_buffers.py [--frames N]  (writes bench/results/buffers.json)
"""

from __future__ import annotations

import array
import functools
import os
import socket
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

from _common import REPO, Row, exit_on_sigterm, forked_peer, parser, print_rows, row, write_results
from _ipad import running_daemon

from ipad.client import BlockingClient
from ipad.client._buffers import protect
from ipad.ipa import Buffer, ModuleContext

sys.path.insert(0, str(REPO / "workers" / "modules"))
from ipa_modules.awb import ZONE, GrayWorldAwb

BUFFER_BYTES = 1 << 20
POOL = 4
CONFIG = "[modules.echo]\n[modules.awb]\n"


def buffer_pool(size: int) -> list[int]:
    """``POOL`` memfds of ``size`` bytes of plausible AWB zone statistics."""
    zone = ZONE.pack(12000, 10000, 7000, 100)  # r, g, b sums over 100 pixels: usable
    data = zone * (size // ZONE.size)
    pool = []
    for i in range(POOL):
        fd = os.memfd_create(f"stats{i}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, data)
        protect("stats", fd)  # sealed as the client library seals what it passes
        pool.append(fd)
    return pool


def _serve_fds(sock: socket.socket, work: bool) -> None:
    fds = array.array("i")
    while True:
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        if not data:
            return
        for _, _, payload in ancillary:
            for fd in array.array("i", payload):
                if work:
                    buffer = Buffer(fd)
                    with buffer.map() as view:
                        zlib.crc32(view)
                    buffer.close()
                else:
                    os.close(fd)
        sock.send(b"r")


def frames_per_s(fn: Callable[[int], object], pool: list[int], frames: int) -> float:
    """Frames per second of ``fn(fd)`` over ``frames`` frames, buffers taken in turn."""
    for fd in pool:  # warm-up: first mapping of each buffer
        fn(fd)
    start = time.perf_counter()
    for i in range(frames):
        fn(pool[i % len(pool)])
    return frames / (time.perf_counter() - start)


def raw_fps(pool: list[int], frames: int, work: bool) -> float:
    """The raw fd-passing limit (with the checksum's work, if ``work``)."""
    with forked_peer(functools.partial(_serve_fds, work=work)) as sock:

        def frame(fd: int) -> None:
            socket.send_fds(sock, [b"f"], [fd])
            sock.recv(16)

        return frames_per_s(frame, pool, frames)


def awb_in_process_fps(pool: list[int], frames: int) -> float:
    """The AWB's own cost: process_stats called directly, no process boundary."""
    awb = GrayWorldAwb(ModuleContext({}, lambda _name, _data: None, 1))

    def frame(fd: int) -> None:
        buffer = Buffer(os.dup(fd))
        try:
            awb.process_stats(1, buffer)
        finally:
            buffer.close()

    return frames_per_s(frame, pool, frames)


def ipad_fps(path: str, pool: list[int], frames: int, module: str) -> float:
    """``echo.checksum`` or ``awb.process_stats`` through a blocking proxy."""
    with BlockingClient(path, name="bench_buffers") as client:
        proxy = client.request_proxy(module)
        if module == "awb":
            proxy.call("init")

            def frame(fd: int) -> None:
                proxy.call("process_stats", {"frame": 1}, fds={"stats": fd})

        else:

            def frame(fd: int) -> None:
                proxy.call("checksum", fds={"data": fd})

        return frames_per_s(frame, pool, frames)


def main(argv: list[str] | None = None) -> int:
    """Measure every variant and limit, print, save."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--frames", type=int, default=2000, help="frames per measurement")
    args_parser.add_argument("--awb-frames", type=int, default=60, help="frames for the AWB")
    args = args_parser.parse_args(argv)
    frames, awb_frames = (20, 4) if args.quick else (args.frames, args.awb_frames)

    pool = buffer_pool(BUFFER_BYTES)
    try:
        fps: dict[str, float] = {
            "limit: raw fd passing": raw_fps(pool, frames, work=False),
            "limit: raw fd passing + map + CRC-32": raw_fps(pool, frames, work=True),
            "limit: AWB in-process (no process boundary)": awb_in_process_fps(pool, awb_frames),
        }
        with running_daemon(CONFIG) as daemon:
            fps["ipad: echo.checksum"] = ipad_fps(str(daemon.socket), pool, frames, "echo")
            fps["ipad: awb.process_stats"] = ipad_fps(str(daemon.socket), pool, awb_frames, "awb")
    finally:
        for fd in pool:
            os.close(fd)
    rows: list[Row] = []
    raw, raw_crc = fps["limit: raw fd passing"], fps["limit: raw fd passing + map + CRC-32"]
    awb_alone = fps["limit: AWB in-process (no process boundary)"]
    # The ratio is limit fps / ipad fps: how many times slower than the limit (1.0 = as fast).
    for name, value, limit, to in (
        ("ipad: echo.checksum", fps["ipad: echo.checksum"], raw_crc, "raw fd + map + CRC"),
        ("ipad: awb.process_stats", fps["ipad: awb.process_stats"], awb_alone, "AWB in-process"),
        ("limit: raw fd passing", raw, raw, "raw fd"),
        ("limit: raw fd passing + map + CRC-32", raw_crc, raw, "raw fd"),
        ("limit: AWB in-process (no process boundary)", awb_alone, awb_alone, "AWB in-process"),
    ):
        rows.append(row(name, value, "fps", None) | {"ratio": limit / value, "ratio_to": to})
    # What ipad adds per frame, in microseconds, over the limit doing the same work.
    overhead = 1e6 / fps["ipad: echo.checksum"] - 1e6 / raw_crc
    rows.append(row("ipad: echo.checksum, added per frame", overhead, "us"))
    print_rows(f"1 MiB memfd per call (frames/s; ratio = limit fps / this fps), {frames} frames",
               rows)  # fmt: skip
    data: dict[str, Any] = {"quick": args.quick, "buffer_bytes": BUFFER_BYTES, "pool": POOL,
                            "frames": frames, "awb_frames": awb_frames, "fps": fps}  # fmt: skip
    write_results(args.results, "buffers", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
