"""Event fan-out: how long a validity change takes to reach 100 subscribed clients.

A daemon runs the ``echo`` module; this process holds one proxy on it. 100
trio clients, spread over 4 subscriber processes (``_fanout_subscriber.py``),
are subscribed to the daemon's events. The benchmark SIGKILLs the proxy's
worker, which turns the proxy ``invalid``; each subscriber stamps the moment
that event reaches it. Stamps are CLOCK_MONOTONIC, one clock for every
process on the machine, and are compared with the moment just before the
kill. After each change the proxy recovers (a new worker) before the next.

Reported over all changes: the time to reach each client (p50, p99, max),
the time to reach the last of the 100 (the change has reached everyone), and
the spread between the first and the last client.

The limit, measured in the same run with the same subscriber processes: this
process writes one 128-byte packet to each of 100 SEQPACKET connections, as
fast as it can, and each client stamps its packet, timed from just before
the first write. It is what delivering one event to 100 sockets costs with
nothing else to do; ipad's figure adds noticing the worker's death (its
pidfd), publishing the event and encoding it per subscriber.

Run: python bench/bench_fanout.py [--clients 100] [--changes 30]
(writes bench/results/fanout.json)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    Row,
    dies_with_us,
    exit_on_sigterm,
    parser,
    print_rows,
    row,
    summary,
    write_results,
)
from _ipad import module_config, running_daemon

from ipad.client import BlockingClient
from ipad.protocol.errors import WorkerCrashed

SUBSCRIBER = BENCH / "_fanout_subscriber.py"
#: Pause after each change, for every subscriber to read it and the proxy to recover.
PAUSE = 0.1
PACKET = b"e" * 128
#: How long the subscribers may take to be ready, or to hand in their stamps.
SUBSCRIBER_TIMEOUT = 120.0


@contextlib.contextmanager
def subscribers(
    where: list[str], processes: int, clients: int, expect: int
) -> Iterator[list[subprocess.Popen[str]]]:
    """``processes`` subscriber processes of ``clients // processes`` clients each."""
    per = clients // processes
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(processes):
            procs.append(subprocess.Popen(
                dies_with_us([sys.executable, str(SUBSCRIBER), *where, "--clients", str(per),
                              "--expect", str(expect)]),
                stdout=subprocess.PIPE, text=True, cwd=BENCH.parent,
            ))  # fmt: skip
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def wait_ready(procs: list[subprocess.Popen[str]]) -> None:
    """Wait for each subscriber process's ``ready`` line."""
    for proc in procs:
        assert proc.stdout is not None  # noqa: S101 - for the type checker
        line = proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"a subscriber did not get ready (said {line[:200]!r})")


def collect(procs: list[subprocess.Popen[str]]) -> list[list[float]]:
    """Every client's stamps, from every subscriber process."""
    stamps: list[list[float]] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=SUBSCRIBER_TIMEOUT)
        stamps += json.loads(out.strip().splitlines()[-1])
    return stamps


def figures(starts: list[float], stamps: list[list[float]]) -> dict[str, Any]:
    """Latency to each client, to the last client, and the spread, per change (ms)."""
    each: list[float] = []
    last: list[float] = []
    spread: list[float] = []
    short = sum(1 for mine in stamps if len(mine) < len(starts))
    for i, start in enumerate(starts):
        arrived = [mine[i] for mine in stamps if len(mine) > i]
        if not arrived:
            continue
        each += [(t - start) * 1e3 for t in arrived]
        last.append((max(arrived) - start) * 1e3)
        spread.append((max(arrived) - min(arrived)) * 1e3)
    return {"to_each_client_ms": summary(each), "to_last_client_ms": summary(last),
            "spread_ms": summary(spread), "clients_missing_changes": short}  # fmt: skip


def run_raw(directory: Path, processes: int, clients: int, changes: int) -> dict[str, Any]:
    """The limit: one packet written to each of ``clients`` connections per change."""
    path = directory / "raw.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conns: list[socket.socket] = []
    try:
        listener.bind(str(path))
        listener.listen(clients)
        with subscribers(["--raw", str(path)], processes, clients, changes) as procs:
            listener.settimeout(SUBSCRIBER_TIMEOUT)
            for _ in range(clients // processes * processes):
                conn, _ = listener.accept()
                conn.send(b"h")
                conns.append(conn)
            wait_ready(procs)
            starts = []
            for _ in range(changes):
                time.sleep(PAUSE)
                starts.append(time.monotonic())
                for conn in conns:
                    conn.send(PACKET)
            return figures(starts, collect(procs))
    finally:
        for conn in conns:
            conn.close()
        listener.close()


def recover(call: Callable[[], int]) -> int:
    """The new worker's pid, once the proxy has recovered (a first call may see the crash)."""
    for _ in range(3):
        with contextlib.suppress(WorkerCrashed):
            return call()
    raise RuntimeError("the proxy did not recover")


def worker_pid(client: BlockingClient) -> int:
    """The echo worker's pid as the daemon sees it (a sandboxed one is pid 1 to itself)."""
    return int(client.status().modules["echo"]["worker_pid"])


def run_ipad(processes: int, clients: int, changes: int) -> dict[str, Any]:
    """ipad: a proxy's worker killed ``changes`` times, the invalid event timed at each client."""
    # Every subscriber is this user: lift the per-user connection limit (64 by default).
    room = clients + 16
    limits = f"[clients]\nmax_connections = {room}\nmax_connections_per_user = {room}\n"
    with running_daemon(limits + module_config("echo")) as daemon:
        where = ["--ipad", str(daemon.socket)]
        with subscribers(where, processes, clients, changes) as procs, \
                BlockingClient(daemon.socket, name="bench_fanout") as client:  # fmt: skip
            wait_ready(procs)
            proxy = client.request_proxy("echo")
            pid = worker_pid(client)
            starts = []
            for _ in range(changes):
                time.sleep(PAUSE)
                starts.append(time.monotonic())
                os.kill(pid, signal.SIGKILL)
                recover(lambda: int(proxy.call("pid", wait=5.0)))
                pid = worker_pid(client)
            result = figures(starts, collect(procs))
        result["daemon_alive"] = daemon.alive()
        return result


def main(argv: list[str] | None = None) -> int:
    """Measure ipad and the limit, print, save."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--clients", type=int, default=100)
    args_parser.add_argument("--processes", type=int, default=4, help="subscriber processes")
    args_parser.add_argument("--changes", type=int, default=30, help="validity changes timed")
    args = args_parser.parse_args(argv)
    if args.quick:
        args.clients, args.processes, args.changes = 6, 2, 3

    with tempfile.TemporaryDirectory(prefix="ipad-bench-fanout-") as tmp:
        raw = run_raw(Path(tmp), args.processes, args.clients, args.changes)
    ipad = run_ipad(args.processes, args.clients, args.changes)
    rows: list[Row] = []
    for label, result in (("ipad", ipad), ("limit: raw writes", raw)):
        to_last = raw["to_last_client_ms"]["p50"]
        for key, what in (("to_each_client_ms", "to each client"),
                          ("to_last_client_ms", "to the last client")):  # fmt: skip
            s = result[key]
            for q in ("p50", "p99", "max"):
                rows.append(row(f"{label}: {what} {q}", s[q], "ms", to_last, "raw to last p50"))
        rows.append(row(f"{label}: first -> last client p50", result["spread_ms"]["p50"], "ms"))
    print_rows(f"a validity change reaching {args.clients} subscribed clients "
               f"({args.processes} processes), {args.changes} changes", rows)  # fmt: skip
    missing = ipad["clients_missing_changes"] + raw["clients_missing_changes"]
    if missing:
        print(f"clients that did not see every change: {missing}", file=sys.stderr)
    data = {"quick": args.quick, "clients": args.clients, "processes": args.processes,
            "changes": args.changes, "ipad": ipad, "raw": raw}  # fmt: skip
    write_results(args.results, "fanout", data, rows)
    return 1 if missing or not ipad["daemon_alive"] else 0


if __name__ == "__main__":
    sys.exit(main())
