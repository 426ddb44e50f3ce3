"""Scale: N modules from start to all valid, the supervisor's memory, descriptors and idle CPU.

ipad runs N copies of the shipped ``echo`` module (each a module of its own,
so N real workers; with the default ``standby = true`` each also gets an
idle standby worker, started after all are running). supervisord and
circus run N copies of the same child program the restart benchmark uses,
each announcing itself to a beacon socket as its first act. For every N:

- start -> all valid: from launching the supervisor's process to the last
  of the N reporting in: for ipad the ``daemon.started`` record (every
  module's worker has loaded its module and said READY), timed on the log's
  wall clock; for the peers the N-th child's datagram. ipad's own figure
  from its first log record (after interpreter start-up and imports) is
  given too;
- the supervisor process's resident memory and open descriptors, in total
  and per worker, once everything is up (ipad: once the standbys are ready);
- at one N (200 by default), the CPU the supervisor uses while idle over
  30 s, and that of all its processes (ipad's workers, standbys included,
  beat on their heartbeat boards once a second); ipad once more at that N
  with heartbeats off, which shows their share. ipad's window opens once
  every module has been logged stable (``stable_after``, 10 s): a one-off
  burst of 200 records is not idling.

- at that N, ipad once more without standbys, for where the start's CPU goes:
  the CPU (schedstat) the daemon, its fork server and its workers used until
  all were valid, and all of it spread over the vCPUs next to the wall time.
  Where the two meet, the start is bound by CPU: only less work makes it faster.

The same N go to every supervisor, so the growth with N can be read across.

Next to the 200-module goal, two limits measured in the same run: starting
an interpreter that imports the libraries the daemon is built on (trio,
attrs, cattrs, structlog, msgspec) and nothing of ipad, and forking a warm
Python process that answers over SEQPACKET, N times one after another (as
one fork server does). Their sum is what any Python daemon on these
libraries that forks its workers from one process pays before doing anything
of its own.

Run: python bench/bench_scale.py [--sizes 10,100,200,500] [--idle-n 200] [--idle-s 30]
(writes bench/results/scale.json)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    Row,
    exit_on_sigterm,
    fork_message_ms,
    goal,
    parser,
    print_goals,
    row,
    spawn_ms,
    write_results,
)
from _ipad import DaemonProcess, copies_daemon_section, echo_copies, log_time
from _peers import (
    PEER_TIMEOUT,
    Beacon,
    Peer,
    beacon_in,
    child_argv,
    circusd,
    process_cpu_s,
    process_fds,
    process_rss_kib,
    supervisord,
)

#: The goal from the supervision issue: this many modules valid in under GOAL_S seconds.
GOAL_N = 200
GOAL_S = 0.5
#: How long ipad may take to get every standby ready (or failed) after all modules run.
STANDBY_TIMEOUT = 120.0
#: Longest wait for every module's ``module.stable`` (stable_after is 10 s by default).
STABLE_TIMEOUT = 30.0
#: The log records that end a standby's preparation.
STANDBY_ENDS = ("worker.standby_ready", "worker.standby_failed")


def family(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from /proc)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = Path(f"/proc/{current}/task").iterdir()
            for task in tasks:
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def idle_cpu(pid: int, seconds: float) -> dict[str, float]:
    """CPU used over ``seconds`` by ``pid`` alone and with all its descendants, in percent."""
    members = family(pid)

    def used() -> tuple[float, float]:
        own = process_cpu_s(pid)
        total = 0.0
        for member in members:
            try:
                total += process_cpu_s(member)
            except OSError:
                continue  # gone meanwhile
        return own, total

    own0, all0 = used()
    time.sleep(seconds)
    own1, all1 = used()
    return {
        "seconds": seconds,
        "processes": len(members),
        "supervisor_cpu_percent": (own1 - own0) / seconds * 100,
        "all_processes_cpu_percent": (all1 - all0) / seconds * 100,
    }


def footprint(pid: int, count: int) -> dict[str, float]:
    """The supervisor process's memory and descriptors, per worker too."""
    rss, fds = process_rss_kib(pid), process_fds(pid)
    return {"rss_kib": rss, "fds": fds, "rss_kib_per_worker": rss / count,
            "fds_per_worker": fds / count}  # fmt: skip


#: The ``[restart]`` table of the variant that tells what heartbeats cost an idle daemon.
NO_HEARTBEATS = '[restart]\nheartbeat_interval = "1h"\nheartbeat_timeout = "2h"\n'

#: The ``[restart]`` table of the variant whose CPU is read once all are valid: without
#: standbys, nothing starts after ``daemon.started`` to blur the figures.
NO_STANDBY = "[restart]\nstandby = false\n"

#: Pause after ``daemon.started`` before reading the CPU used: the last READY's sender settles.
CPU_SETTLE_S = 0.2


def start_cpu(daemon: DaemonProcess) -> dict[str, Any]:
    """CPU (s) the daemon, its fork server and its workers used up to all valid.

    Read from each process's schedstat once the daemon idles (no standbys);
    their sum against the wall time and the vCPUs says whether the start is
    bound by CPU: if the sum, spread over every vCPU, is the wall time, no
    reordering makes it faster, only less work.
    """
    time.sleep(CPU_SETTLE_S)
    records = daemon.records()
    server = next((r["pid"] for r in records if r["event"] == "forkserver.started"), None)
    workers = [r["worker_pid"] for r in records if r["event"] == "worker.ready"]
    per_worker = [process_cpu_s(pid) for pid in workers]
    out: dict[str, Any] = {
        "daemon_s": process_cpu_s(daemon.proc.pid),
        "forkserver_s": process_cpu_s(server) if server is not None else 0.0,
        "workers_s": sum(per_worker),
        "worker_median_ms": statistics.median(per_worker) * 1e3 if per_worker else 0.0,
        "vcpus": os.cpu_count() or 1,
    }
    out["all_s"] = out["daemon_s"] + out["forkserver_s"] + out["workers_s"]
    return out


#: Samples of each limit.
LIMIT_SAMPLES = 5

#: What the daemon is built on, imported by the "libraries" limit.
LIBRARIES = "import trio, attrs, cattrs, structlog, msgspec"


def measure_limits(count: int, samples: int) -> dict[str, Any]:
    """The floor under N modules from launch to valid: the libraries' import, N warm forks."""
    imports = spawn_ms([sys.executable, "-c", LIBRARIES], samples)
    forks = [sum(fork_message_ms(count)) for _ in range(samples)]
    return {"modules": count, "import_libraries_ms": imports, "forks_ms": forks}


def run_ipad(
    root: Path,
    count: int,
    forkserver: bool,
    idle_s: float | None,
    heartbeats: bool = True,
    standby: bool = True,
) -> dict[str, Any]:
    """One daemon with ``count`` echo modules: start -> valid, footprint, idle CPU.

    Without ``standby`` it reads the CPU each process used to get there instead
    (``start_cpu``) and stops once all are valid.
    """
    label = "ipad, fork server" if forkserver else "ipad, fresh interpreters"
    if not heartbeats:
        label += ", heartbeats off"
    if not standby:
        label += ", no standby"
    # Short: the daemon's socket goes below it, and AF_UNIX paths stop at 107 bytes.
    variant = ("" if heartbeats else "h") + ("" if standby else "n")
    directory = root / f"i{count}{'f' if forkserver else 's'}{variant}"
    directory.mkdir()
    mods, names = echo_copies(directory, count)
    config = copies_daemon_section(mods, forkserver) + ("" if heartbeats else NO_HEARTBEATS)
    config += "" if standby else NO_STANDBY
    config += "".join(f"[modules.{n}]\n" for n in names)
    env = {"IPAD_CONFIG_PATH": str(directory / "tuning")}
    daemon = DaemonProcess(directory, config, "info", env)
    try:
        started = daemon.wait_started()
        first = daemon.records()[0]
        result: dict[str, Any] = {
            "supervisor": label,
            "modules": count,
            "all_running": set(started["modules"].values()) == {"running"},
            "start_to_valid_s": log_time(started) - daemon.launched,
            "from_first_log_s": log_time(started) - log_time(first),
        }
        if not standby:
            result["start_cpu"] = start_cpu(daemon)
            result |= footprint(daemon.proc.pid, count)
            return result
        # Every module's standby ready, or given up on (ipad does not retry a failed one).
        ended = daemon.collect(STANDBY_ENDS, count, STANDBY_TIMEOUT)
        ready = [r for r in ended if r["event"] == "worker.standby_ready"]
        result["standbys_ready"] = len(ready)
        result["standbys_failed"] = len(ended) - len(ready)
        result["standbys_unaccounted"] = count - len(ended)
        if ended:
            result["standbys_settled_s"] = log_time(ended[-1]) - daemon.launched
        result |= footprint(daemon.proc.pid, count)
        if idle_s is not None:
            # Idle means nothing left to do: not even saying, stable_after (10 s) in,
            # that each worker has run stably (200 module.stable records at once).
            daemon.collect("module.stable", count, STABLE_TIMEOUT)
            result["idle"] = idle_cpu(daemon.proc.pid, idle_s)
        return result
    finally:
        daemon.close()


def run_peer(
    root: Path,
    beacon: Beacon,
    name: str,
    start: Callable[..., Any],
    count: int,
    idle_s: float | None,
) -> dict[str, Any]:
    """One peer with ``count`` children: start -> all announced, footprint, idle CPU."""
    directory = root / f"{name}-{count}"
    directory.mkdir()
    launched = time.perf_counter()
    with start(directory, child_argv(beacon.path), count) as peer:
        assert isinstance(peer, Peer)  # noqa: S101 - for the type checker
        heard = beacon.wait_for(count, PEER_TIMEOUT + count * 0.1)
        result: dict[str, Any] = {
            "supervisor": name,
            "modules": count,
            "all_running": True,
            "start_to_valid_s": max(t for _, t in heard) - launched,
        }
        result |= footprint(peer.pid, count)
        if idle_s is not None:
            result["idle"] = idle_cpu(peer.pid, idle_s)
        peer.check_alive()
    beacon.kill_children()
    return result


def table(runs: list[dict[str, Any]]) -> None:
    """Every run, grouped by supervisor, so the growth with N reads down a column."""
    print(f"{'supervisor':26s} {'N':>5s} {'start->valid s':>14s} {'RSS MiB':>8s} "
          f"{'KiB/worker':>10s} {'fds/worker':>10s} {'idle CPU %':>10s}")  # fmt: skip
    for r in sorted(runs, key=lambda r: (r["supervisor"], r["modules"])):
        idle = r.get("idle", {}).get("supervisor_cpu_percent")
        idle_text = "" if idle is None else f"{idle:.3f}"
        print(f"{r['supervisor']:26s} {r['modules']:5d} {r['start_to_valid_s']:14.3f} "
              f"{r['rss_kib'] / 1024:8.1f} {r['rss_kib_per_worker']:10.1f} "
              f"{r['fds_per_worker']:10.2f} {idle_text:>10s}")  # fmt: skip
    for who, slope in marginal(runs).items():
        print(
            f"{who}: each worker more costs the supervisor {slope['rss_kib']:.1f} KiB "
            f"and {slope['fds']:.2f} fds (from N={slope['from']} to N={slope['to']})"
        )


def marginal(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per supervisor, the memory and descriptors one more worker costs it.

    The slope between the smallest and the largest N, which leaves out what
    the supervisor costs with no worker at all (its interpreter, imports, sockets).
    """
    out: dict[str, dict[str, float]] = {}
    for who in sorted({r["supervisor"] for r in runs}):
        mine = sorted((r for r in runs if r["supervisor"] == who), key=lambda r: r["modules"])
        low, high = mine[0], mine[-1]
        if high["modules"] == low["modules"]:
            continue
        span = high["modules"] - low["modules"]
        out[who] = {"rss_kib": (high["rss_kib"] - low["rss_kib"]) / span,
                    "fds": (high["fds"] - low["fds"]) / span,
                    "from": low["modules"], "to": high["modules"]}  # fmt: skip
    return out


def limit_rows(limits: dict[str, Any]) -> list[Row]:
    """The libraries' import, N warm forks one after another, and the two together (p50)."""
    imports = statistics.median(limits["import_libraries_ms"])
    forks = statistics.median(limits["forks_ms"])
    n = limits["modules"]
    return [
        row(f"limit: spawn python -c '{LIBRARIES}' p50", imports, "ms"),
        row(f"limit: {n} warm forks + SEQPACKET message, one after another, p50", forks, "ms"),
        row(f"limit: the two together ({n} modules)", imports + forks, "ms"),
    ]


def headline(runs: list[dict[str, Any]], idle_n: int, limits: dict[str, Any]) -> list[Row]:
    """Per supervisor and N: start -> valid, memory and fds per worker; idle CPU at idle_n."""
    rows: list[Row] = limit_rows(limits)
    floor = rows[-1]["value"]  # the import + forks limit
    for who, slope in marginal(runs).items():
        rows.append(row(f"{who}: RSS per additional worker", slope["rss_kib"], "KiB"))
    for r in runs:
        who, n = r["supervisor"], r["modules"]
        to = floor if n == limits["modules"] else None
        rows.append(row(f"{who}: {n} start -> all valid", r["start_to_valid_s"] * 1e3, "ms",
                        to, "import + forks limit"))  # fmt: skip
        rows.append(row(f"{who}: {n} RSS per worker", r["rss_kib_per_worker"], "KiB"))
        rows.append(row(f"{who}: {n} fds per worker", r["fds_per_worker"], ""))
        if r.get("standbys_failed") or r.get("standbys_unaccounted"):
            lacking = r["standbys_failed"] + r["standbys_unaccounted"]
            rows.append(row(f"{who}: {n} standbys never ready (not retried)", lacking, ""))
        if "start_cpu" in r:
            rows += start_cpu_rows(f"{who}: {n}", r["start_cpu"], r["start_to_valid_s"])
        if "idle" in r:
            idle = r["idle"]
            rows.append(row(f"{who}: {idle_n} idle CPU, supervisor",
                            idle["supervisor_cpu_percent"], "%"))  # fmt: skip
            rows.append(row(f"{who}: {idle_n} idle CPU, all its processes",
                            idle["all_processes_cpu_percent"], "%"))  # fmt: skip
    return rows


def start_cpu_rows(prefix: str, cpu: dict[str, Any], wall_s: float) -> list[Row]:
    """The CPU of the start by process; all of it spread over the vCPUs, against the wall time."""
    vcpus = cpu["vcpus"]
    return [
        row(f"{prefix} CPU until all valid: daemon", cpu["daemon_s"] * 1e3, "ms"),
        row(f"{prefix} CPU until all valid: fork server", cpu["forkserver_s"] * 1e3, "ms"),
        row(f"{prefix} CPU until all valid: workers (sum)", cpu["workers_s"] * 1e3, "ms"),
        row(f"{prefix} CPU until all valid: one worker, p50", cpu["worker_median_ms"], "ms"),
        row(f"{prefix} CPU until all valid: all / {vcpus} vCPUs", cpu["all_s"] / vcpus * 1e3,
            "ms", wall_s * 1e3, "start -> all valid"),
    ]  # fmt: skip


def goals(runs: list[dict[str, Any]], goal_n: int) -> list[dict[str, Any]]:
    """200 valid in under 0.5 s; ipad's memory per worker and idle CPU below both peers'."""
    at = {r["supervisor"]: r for r in runs if r["modules"] == goal_n}
    ipad = at.get("ipad, fork server")
    if ipad is None:
        return [goal(f"{goal_n} modules valid in < {GOAL_S:g} s", "not measured", None)]
    slopes = marginal(runs)
    out = [
        goal(f"{goal_n} modules valid in < {GOAL_S:g} s, from launch",
             f"{ipad['start_to_valid_s']:.3f} s", ipad["start_to_valid_s"] < GOAL_S),
        goal(f"{goal_n} modules valid in < {GOAL_S:g} s, from the daemon's first log record",
             f"{ipad['from_first_log_s']:.3f} s", ipad["from_first_log_s"] < GOAL_S),
    ]  # fmt: skip
    for peer in ("supervisord", "circus"):
        other = at.get(peer)
        if other is None:
            continue
        mine, theirs = ipad["rss_kib_per_worker"], other["rss_kib_per_worker"]
        out.append(goal(f"daemon memory per worker below {peer}'s (RSS / N, N={goal_n})",
                        f"{mine:.0f} vs {theirs:.0f} KiB", mine < theirs))  # fmt: skip
        if "ipad, fork server" in slopes and peer in slopes:
            mine, theirs = slopes["ipad, fork server"]["rss_kib"], slopes[peer]["rss_kib"]
            out.append(goal(f"daemon memory per additional worker below {peer}'s",
                            f"{mine:.1f} vs {theirs:.1f} KiB", mine < theirs))  # fmt: skip
        if "idle" in ipad and "idle" in other:
            mine = ipad["idle"]["supervisor_cpu_percent"]
            theirs = other["idle"]["supervisor_cpu_percent"]
            out.append(goal(f"daemon idle CPU below {peer}'s (N={goal_n})",
                            f"{mine:.3f} vs {theirs:.3f} %", mine < theirs))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every supervisor at every N, print the table, save."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--sizes", default="10,100,200,500", help="the N, comma-separated")
    args_parser.add_argument("--idle-n", type=int, default=GOAL_N, help="N for idle CPU")
    args_parser.add_argument("--idle-s", type=float, default=30.0, help="idle CPU window (s)")
    args_parser.add_argument(
        "--fresh-max", type=int, default=100, help="largest N for ipad without the fork server"
    )
    args = args_parser.parse_args(argv)
    if args.quick:
        args.sizes, args.idle_n, args.idle_s, args.fresh_max = "3,5", 5, 0.5, 3
    sizes = [int(x) for x in args.sizes.split(",")]

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ipad-bench-scale-") as tmp, \
            beacon_in(Path(tmp)) as beacon:  # fmt: skip
        root = Path(tmp)
        for n in sizes:
            idle = args.idle_s if n == args.idle_n else None
            runs.append(run_ipad(root, n, True, idle))
            if idle is not None:  # what the heartbeats (1 s, default) cost of that idle CPU
                runs.append(run_ipad(root, n, True, idle, heartbeats=False))
                # ... and where the CPU of the start goes
                runs.append(run_ipad(root, n, True, None, standby=False))
            if n <= args.fresh_max:
                runs.append(run_ipad(root, n, False, None))
            runs.append(run_peer(root, beacon, "supervisord", supervisord, n, idle))
            runs.append(run_peer(root, beacon, "circus", circusd, n, idle))
    limits = measure_limits(args.idle_n, 1 if args.quick else LIMIT_SAMPLES)
    table(runs)
    for limit in limit_rows(limits):
        print(f"{limit['name']}: {limit['value']:.1f} {limit['unit']}")
    checked = goals(runs, args.idle_n)
    print_goals(checked)
    rows = headline(runs, args.idle_n, limits)
    data = {"quick": args.quick, "sizes": sizes, "idle_n": args.idle_n, "idle_s": args.idle_s,
            "runs": runs, "marginal_per_worker": marginal(runs), "goals": checked,
            "limits": limits}  # fmt: skip
    write_results(args.results, "scale", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
