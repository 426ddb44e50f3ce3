"""What every benchmark shares: statistics, the machine's description, options and output.

A ``bench_<name>.py`` takes ``--quick`` (tiny sizes, for the smoke test: the
code runs, the figures mean nothing) and ``--results DIR`` (where its JSON
goes), prints its own table and writes ``<DIR>/<name>.json`` with a
``headline`` list that ``bench/run.py`` puts into the combined table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from _profile import ProfileInto

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"

#: A headline row: name, value, unit, and optionally ratio and ratio_to.
Row = dict[str, Any]


# --- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max (and min, mean, n) of samples."""
    return {
        "n": len(values),
        "min": min(values, default=math.nan),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values, default=math.nan),
        "mean": statistics.fmean(values) if values else math.nan,
    }


def ratio(value: float, to: float) -> float | None:
    """``value / to``, or None where ``to`` is missing or zero (no ratio to print)."""
    if not math.isfinite(value) or not math.isfinite(to) or to == 0:
        return None
    return value / to


def row(name: str, value: float, unit: str, to: float | None = None, to_name: str = "") -> Row:
    """One headline row; with ``to``, its ratio to that figure."""
    out: Row = {"name": name, "value": value, "unit": unit}
    if to is not None:
        out["ratio"] = ratio(value, to)
        out["ratio_to"] = to_name
    return out


def rounds_us(fn: Callable[[], object], n: int, rounds: int) -> list[float]:
    """Microseconds per call of ``fn``, over ``n`` calls, once per round."""
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - start) / n * 1e6)
    return out


# --- raw peers: the limits ----------------------------------------------------------------


@contextlib.contextmanager
def forked_peer(serve: Callable[[socket.socket], None]) -> Iterator[socket.socket]:
    """A forked (so already warm) process running ``serve`` on one end of a SEQPACKET pair.

    Yields the other end; closing it ends the peer, which is then reaped.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the peer: nothing but ``serve``
        try:
            ours.close()
            serve(theirs)
        finally:
            os._exit(0)
    theirs.close()
    try:
        yield ours
    finally:
        ours.close()
        os.waitpid(pid, 0)


def echo_back(sock: socket.socket) -> None:
    """Send every packet back until the other end closes: the raw round-trip peer."""
    while data := sock.recv(4096):
        sock.send(data)


# --- processes ---------------------------------------------------------------------------

#: util-linux's setpriv, which can set the parent-death signal and then exec a command.
SETPRIV = shutil.which("setpriv")


def dies_with_us(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM if the benchmark itself dies (``setpriv --pdeathsig``).

    A benchmark stopped by SIGKILL runs no ``finally``; this way its daemon or
    supervisor still goes (and takes its workers with it) instead of being
    orphaned. The signal survives the exec; the process keeps its pid.
    """
    if SETPRIV is None:
        return list(argv)
    return [SETPRIV, "--pdeathsig", "TERM", "--", *argv]


# --- the machine ------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" if unknown)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# --- options and output -----------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    parsed = argparse.ArgumentParser(description=(doc or "").split("\n", 1)[0])
    parsed.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, to check that the benchmark runs (its figures mean nothing)",
    )
    parsed.add_argument(
        "--results", type=Path, default=RESULTS, metavar="DIR", help="where the JSON goes"
    )
    parsed.add_argument(
        "--profile",
        action=ProfileInto,
        metavar="DIR",
        help="record each daemon with py-spy into DIR (its figures are then not for the table)",
    )
    return parsed


def write_results(directory: Path, name: str, data: dict[str, Any], headline: list[Row]) -> Path:
    """Save ``data`` with the machine's description and the headline rows as ``<name>.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    out = {"machine": machine(), **data, "headline": headline}
    path.write_text(json.dumps(out, indent=2, default=str))
    return path


def _interrupt(signum: int, frame: object) -> None:
    signal.raise_signal(signal.SIGINT)


def exit_on_sigterm() -> None:
    """Make SIGTERM (and SIGHUP) unwind like Ctrl-C, so every ``finally`` cleans up.

    As SIGINT, not an exception raised from this handler: inside ``trio.run``
    trio's own SIGINT handler raises KeyboardInterrupt where it is safe, and
    outside it Python's does; either way every context manager stops what it started.
    """
    # A shell's background job starts with SIGINT ignored: make it interrupt again.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


def print_rows(title: str, rows: Sequence[Row]) -> None:
    """A benchmark's own table: each headline row with its ratio."""
    print(title)
    width = max([len(str(r["name"])) for r in rows] + [6])
    for r in rows:
        ratio_text = ""
        if isinstance(r.get("ratio"), int | float):
            ratio_text = f"{r['ratio']:9.2f} x {r.get('ratio_to', '')}"
        value = r["value"]
        shown = f"{value:10.3f}" if isinstance(value, int | float) else f"{value!s:>10}"
        print(f"  {r['name']:{width}s} {shown} {r['unit']:5s}{ratio_text}")


# --- goals --------------------------------------------------------------------------------


def goal(text: str, measured: str, met: bool | None) -> dict[str, Any]:
    """One of the issue's goals, what was measured, and whether it is met (None: not measured)."""
    return {"goal": text, "measured": measured, "met": met}


def verdict(met: bool | None) -> str:
    """PASS, MISS or "not measured"."""
    return "not measured" if met is None else ("PASS" if met else "MISS")


def print_goals(goals: Sequence[dict[str, Any]]) -> None:
    """Each goal with its measured figure and PASS/MISS (a miss is reported, not asserted)."""
    for g in goals:
        print(f"goal: {g['goal']}: measured {g['measured']}: {verdict(g['met'])}")


# --- limits shared by the scenarios ---------------------------------------------------


def spawn_ms(argv: Sequence[str], n: int) -> list[float]:
    """posix_spawn ``argv`` and wait for it to exit, ``n`` times (as the daemon spawns)."""
    times = []
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for _ in range(n):
        start = time.perf_counter()
        pid = os.posix_spawn(argv[0], list(argv), env)
        _, status = os.waitpid(pid, 0)
        times.append((time.perf_counter() - start) * 1e3)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{argv} exited with status {status}")
    return times


def fork_message_ms(n: int) -> list[float]:
    """Fork this (warm) process; the child sends one byte over SEQPACKET and exits."""
    times = []
    for _ in range(n):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:  # the child: nothing but the message
                try:
                    theirs.send(b"r")
                finally:
                    os._exit(0)
            ours.recv(16)
            times.append((time.perf_counter() - start) * 1e3)
            os.waitpid(pid, 0)
        finally:
            ours.close()
            theirs.close()
    return times
