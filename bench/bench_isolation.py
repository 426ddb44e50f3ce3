"""What one camera's crashes cost another: isolation per proxy against one shared worker.

Two clients of the shipped ``echo`` module, each a camera at 30 frames/s
(one ``echo`` call per frame, on its own proxy). The *victim* measures each
frame's latency (the call, including any wait for a recovery); the
*neighbour* runs in a process of its own and, in the crash runs, SIGKILLs the
worker serving its proxy once a second. Three runs, each on a fresh daemon:

- ``isolation = "proxy"``, no crashes: the baseline (the limit);
- ``isolation = "proxy"``, neighbour crashing every second: its worker is its
  own, so the victim's p99 should be within noise of the baseline;
- ``isolation = "module"``, neighbour crashing every second: the shared worker
  dies under the victim too (for contrast).

The restart policy makes every restart immediate and never a cooldown, so
the runs measure latency, not the crash-loop policy (which would put the
neighbour's proxy, or the shared module, into cooldown after 5 crashes).
Frames that failed (``WorkerCrashed``: in flight when the worker died) are
counted, not timed, and so are the victim's recoveries (its proxy invalidated
by a crash and brought back). Nothing is asserted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from typing import Any

from _common import (
    Row,
    exit_on_sigterm,
    goal,
    percentile,
    print_goals,
    print_rows,
    row,
    write_results,
)
from _common import parser as common_parser
from _ipad import FAST_RESTART, running_daemon

from ipad.client import BlockingClient, IpadError

FPS = 30.0
#: The neighbour's crashes per second.
CRASH_EVERY = 1.0


def config(isolation: str) -> str:
    """The echo module alone, isolated as asked, restarting at once, never in cooldown."""
    return f'[modules.echo]\nisolation = "{isolation}"\n[modules.echo.restart]\n{FAST_RESTART}'


def neighbour(socket_path: str, seconds: float, crash: bool) -> int:
    """The other camera: 30 frames/s on its own proxy, killing its own worker every second."""
    crashes = 0
    with BlockingClient(socket_path) as client:
        proxy = client.request_proxy("echo")
        start = time.monotonic()
        next_crash = start + CRASH_EVERY
        frame = 0
        while (now := time.monotonic()) < start + seconds:
            if crash and now >= next_crash:
                next_crash += CRASH_EVERY
                try:
                    os.kill(proxy.call("pid", timeout=5), signal.SIGKILL)
                    crashes += 1
                except (IpadError, ProcessLookupError):
                    pass
            with contextlib.suppress(IpadError):  # in flight as its own worker died
                proxy.call("echo", {"text": "frame"}, timeout=5)
            frame += 1
            delay = start + frame / FPS - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    print(crashes)
    return 0


def victim(socket_path: str, seconds: float, crash: bool) -> dict[str, Any]:
    """The measured camera's frame latencies (ms) and failures, beside the neighbour."""
    latencies: list[float] = []
    failed = 0
    with BlockingClient(socket_path) as client:
        proxy = client.request_proxy("echo")
        proxy.call("echo", {"text": "warm"})
        other = subprocess.Popen(
            [sys.executable, __file__, "--neighbour", socket_path, str(seconds),
             "1" if crash else "0"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(0.2)  # the neighbour has its proxy
            start = time.monotonic()
            frame = 0
            while time.monotonic() < start + seconds - 0.3:
                began = time.perf_counter()
                try:
                    proxy.call("echo", {"text": "frame"}, timeout=5)
                    latencies.append((time.perf_counter() - began) * 1e3)
                except IpadError:
                    failed += 1
                frame += 1
                delay = start + frame / FPS - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            recoveries = proxy.recoveries
            out, _ = other.communicate(timeout=seconds + 30)
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
    crashes = int(out.strip() or 0)
    return {"latencies_ms": latencies, "failed": failed, "frames": frame, "crashes": crashes,
            "recoveries": recoveries}  # fmt: skip


def run(isolation: str, crash: bool, seconds: float) -> dict[str, Any]:
    """One run on a fresh daemon: the victim's p50/p99/max and counts."""
    with running_daemon(config(isolation)) as daemon:
        measured = victim(str(daemon.socket), seconds, crash)
    lat = measured.pop("latencies_ms")
    return {
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat, default=float("nan")),
        **measured,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the three runs, print, save."""
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--neighbour"]:
        return neighbour(args_in[1], float(args_in[2]), args_in[3] == "1")
    exit_on_sigterm()
    parser = common_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    args = parser.parse_args(args_in)
    seconds = 2.5 if args.quick else args.seconds
    runs = {
        "proxy isolation, no crashes": run("proxy", crash=False, seconds=seconds),
        "proxy isolation, neighbour crashing 1/s": run("proxy", crash=True, seconds=seconds),
        "module isolation, neighbour crashing 1/s": run("module", crash=True, seconds=seconds),
    }
    base = runs["proxy isolation, no crashes"]["p99_ms"]
    rows: list[Row] = []
    for name, figures in runs.items():
        rows.append(row(f"victim frame p99, {name}", figures["p99_ms"], "ms", base,
                        "no crashes"))  # fmt: skip
    for name, figures in runs.items():
        rows.append(row(f"victim frame max, {name}", figures["max_ms"], "ms"))
    for name, figures in runs.items():
        rows.append(row(f"victim frames failed, {name}", figures["failed"], ""))
    for name, figures in runs.items():  # its proxy invalidated and recovered
        rows.append(row(f"victim recoveries, {name}", figures["recoveries"], ""))
    rows.append(row("neighbour crashes, proxy isolation",
                    runs["proxy isolation, neighbour crashing 1/s"]["crashes"], ""))  # fmt: skip
    print_rows(f"two cameras at {FPS:g} frames/s, {seconds:g} s each run", rows)
    crashing = runs["proxy isolation, neighbour crashing 1/s"]
    # "Within noise": no more than half again the baseline's p99, or 1 ms over it.
    within = crashing["p99_ms"] <= max(1.5 * base, base + 1.0) and crashing["failed"] == 0
    goals = [
        goal(
            "per-proxy isolation: victim p99 within noise of no crashes (<= 1.5x or +1 ms), "
            "no failed frame",
            f"{crashing['p99_ms']:.2f} ms vs {base:.2f} ms, {crashing['failed']} failed",
            within if not args.quick else None,
        )
    ]
    print_goals(goals)
    data = {"quick": args.quick, "seconds": seconds, "fps": FPS, "runs": runs, "goals": goals}
    write_results(args.results, "isolation", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
