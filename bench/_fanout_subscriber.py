"""One subscriber process of the fan-out benchmark: many clients, each timing what reaches it.

``--ipad SOCKET``: each of ``--clients`` trio clients connects to the daemon,
subscribes, and stamps (CLOCK_MONOTONIC, shared by every process on the
machine) each ``proxy`` event turning a proxy ``invalid``. ``--raw SOCKET``:
each client connects to the benchmark's own listening SEQPACKET socket and
stamps each packet: the same receivers, with nothing but a socket behind them.

Prints ``ready`` once every client is subscribed, then, after each has seen
``--expect`` changes, one JSON line: a list per client of its stamps.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

import trio

from ipad.client._trio import open_client

#: A subscriber that has not seen every change by then gives up (the benchmark reports it).
TIMEOUT = 120.0


async def ipad_client(path: Path, expect: int, stamps: list[float], ready: trio.Event) -> None:
    """One daemon subscriber; stamps each proxy-invalid event."""
    async with open_client(path, name="bench_fanout") as client:
        ready.set()
        async for event in client.events:
            if getattr(event, "kind", None) == "proxy" and event.state == "invalid":
                stamps.append(time.monotonic())
                if len(stamps) == expect:
                    return


async def raw_client(path: Path, expect: int, stamps: list[float], ready: trio.Event) -> None:
    """One raw subscriber; stamps each packet."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with sock:
        await sock.connect(str(path))
        await sock.recv(16)  # the server's hello: it has accepted us
        ready.set()
        while len(stamps) < expect:
            if not await sock.recv(4096):
                return
            stamps.append(time.monotonic())


async def main_async(args: argparse.Namespace) -> list[list[float]]:
    """Run every client; their stamps."""
    stamps: list[list[float]] = [[] for _ in range(args.clients)]
    run = ipad_client if args.ipad else raw_client
    path = Path(args.ipad or args.raw)
    with trio.move_on_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for mine in stamps:
                ready = trio.Event()
                nursery.start_soon(run, path, args.expect, mine, ready)
                await ready.wait()
            print("ready", flush=True)
    return stamps


def main() -> None:
    """Parse, run, print the stamps."""
    parsed = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    where = parsed.add_mutually_exclusive_group(required=True)
    where.add_argument("--ipad", metavar="SOCKET")
    where.add_argument("--raw", metavar="SOCKET")
    parsed.add_argument("--clients", type=int, required=True)
    parsed.add_argument("--expect", type=int, required=True)
    stamps = trio.run(main_async, parsed.parse_args())
    sys.stdout.write(json.dumps(stamps) + "\n")


if __name__ == "__main__":
    main()
