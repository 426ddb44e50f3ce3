"""Crash-to-valid latency: how long a client is without its module after the worker dies.

ipad exists so that a crashed IPA worker is back, and its client's proxy valid
again, in a few milliseconds. This runs a real daemon (one ``echo`` module)
and one trio client that holds a proxy on which it made the ``init`` and
``configure`` setup calls. It SIGKILLs the worker N times and measures, per
kill, from just before ``os.kill``:

- crash -> running: until the client receives the daemon's ``module`` event
  saying the module is ``running`` again, on a new worker;
- crash -> valid: until the client library reports the proxy ``recovered``
  (reopened on the new worker, setup calls replayed, daemon told).

Three variants: a standby worker promoted at once (the default), the fork
server alone (workers forked from a warm process), and neither (each worker a
fresh interpreter, posix_spawn); the first two also with the ``sandboxed``
proxy kind, which shows what the sandbox costs. The restart policy makes every restart
immediate and never cools down (``_ipad.FAST_RESTART``).

Then the peers, on one child program (``_child.py``, which announces itself
to a beacon as its first act: that is their "running"): supervisord with
``autorestart``, circus with its default settings, and systemd booted in a
namespace with ``Restart=always`` and the default or a zero ``RestartSec``.

The same run measures the limits a restart cannot beat on this machine:
spawning ``python -I -S -c pass``, spawning ``python -I -c 'import
ipad.worker.host'`` (what a fresh worker pays before it can say READY), and
forking an already warm Python process that answers over SEQPACKET, which is
what the fork server does at best. Ratios are to that last one.

The daemon's JSON log of each run gives a per-stage breakdown (exit seen,
restart started, worker ready, proxy valid), printed as medians.

Run: python bench/bench_restart.py [--kills N] [--peer-kills N] [--no-peers]
(prints a table, writes bench/results/restart.json; exit status 1 if a kill did
not recover within 2 s)
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from _common import (
    Row,
    exit_on_sigterm,
    fork_message_ms,
    goal,
    parser,
    print_goals,
    row,
    spawn_ms,
    summary,
    write_results,
)
from _ipad import FAST_RESTART, log_time, module_config, running_daemon
from _peers import (
    PEER_TIMEOUT,
    Beacon,
    beacon_in,
    child_argv,
    circusd,
    supervisord,
    systemd,
    systemd_available,
    systemd_unit,
)

from ipad.client._trio import RECOVERY_RETRY, Client, LocalEvent, Proxy, open_client

#: A kill whose proxy is not valid again within this many seconds counts as not recovered.
RECOVERY_LIMIT = 2.0
#: How long to wait, after such a miss, for the proxy to come back before giving up.
RECOVERY_GIVE_UP = 30.0
#: Pause between a recovery and the next kill.
PAUSE = 0.02
#: Kills before the measured ones (first-use costs: page cache, imports, allocators).
WARMUP = 1

#: A module-running -> proxy-valid gap above this means recovery waited for a timer.
RETRY_HINT_MS = 100.0

#: Goals from the issue: ipad (standby + fork server) crash -> valid under these, in ms,
GOAL_P50_MS = 5.0
GOAL_P99_MS = 20.0
#: and at least this many times faster than these peers' crash -> running (p50).
GOAL_SPEEDUP = {"supervisord, autorestart": 100.0, "systemd, Restart=always, RestartSec=0": 5.0}

POLICY_SUMMARY = "every restart immediate, no cooldown, heartbeats off (1 h)"

#: The setup calls the client makes, replayed on each new worker.
SETUP_CALLS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("init", {"settings": {"pipeline": "simple", "frame_rate": 30}}),
    ("configure", {"sensor_info": {"width": 1920, "height": 1080, "exposure_us": 10000}}),
)


def config_text(forkserver: bool, standby: bool, proxy: str = "isolated") -> str:
    """The daemon configuration of one variant."""
    daemon = f"[daemon]\nforkserver = {'true' if forkserver else 'false'}\n"
    return daemon + module_config("echo", standby=standby, proxy=proxy)


# --- limits -------------------------------------------------------------------------


def measure_limits(n: int) -> dict[str, list[float]]:
    """Every limit, ``n`` samples each, in milliseconds."""
    python = sys.executable
    return {
        "spawn python -I -S -c pass": spawn_ms([python, "-I", "-S", "-c", "pass"], n),
        "spawn python -I -c 'import ipad.worker.host'": spawn_ms(
            [python, "-I", "-c", "import ipad.worker.host"], n
        ),
        "fork a warm process + SEQPACKET message": fork_message_ms(n),
    }


# --- the client: kill, watch, recover ---------------------------------------------------


@attrs.define
class Kill:
    """One kill: what was killed, and when each step was seen by the client."""

    old_pid: int
    t0: float  # perf_counter just before os.kill
    wall0: float  # time.time() at the same moment, to line up with the daemon's log
    #: step name -> seconds after t0 the client saw it
    seen: dict[str, float] = attrs.field(factory=dict)
    new_pid: int | None = None
    recovered: bool = False


class Recorder:
    """Reads the client's events in the background and timestamps them as they arrive."""

    def __init__(self, client: Client, proxy: Proxy) -> None:
        self.client = client
        self.proxy = proxy
        self.current: Kill | None = None
        self.changed = trio.Event()

    async def run(self) -> None:
        """Time each event that belongs to the current kill."""
        async for event in self.client.events:
            now = time.perf_counter()
            kill = self.current
            if kill is None:
                continue
            step = self._step(event, kill.old_pid)
            if step is not None and step not in kill.seen:
                kill.seen[step] = now - kill.t0
                if step == "running":
                    kill.new_pid = event.worker_pid
                self.changed.set()
                self.changed = trio.Event()

    def _step(self, event: Any, old: int) -> str | None:
        """Which step of a kill of ``old`` this event is, if it is one (stale ones are not)."""
        if isinstance(event, LocalEvent):
            recovered = event.kind == "recovered" and event.proxy_id == self.proxy.proxy_id
            return "recovered" if recovered and event.details.get("worker_pid") != old else None
        if event.kind == "module" and event.module == "echo":
            if event.state in ("exited", "starting") and event.worker_pid == old:
                return f"module {event.state}"
            if event.state == "running" and event.worker_pid != old:
                return "running"
        if event.kind == "proxy" and event.proxy_id == self.proxy.proxy_id:
            if event.state == "invalid" and event.worker_pid == old:
                return "proxy invalid"
            if event.state == "valid" and event.worker_pid != old:
                return "proxy valid (daemon)"
        return None

    async def wait_for(self, kill: Kill, steps: Sequence[str], timeout: float) -> bool:
        """Wait until ``kill`` has seen every step; False after ``timeout``."""
        with trio.move_on_after(timeout):
            while not all(step in kill.seen for step in steps):
                await self.changed.wait()
            return True
        return False


async def worker_pid(client: Client) -> int:
    """The echo worker's pid as the daemon sees it (a sandboxed one is pid 1 to itself)."""
    return int((await client.status()).modules["echo"]["worker_pid"])


async def kill_loop(
    socket_path: Path, kills: int, warmup: int, daemon_alive: Callable[[], bool]
) -> list[Kill]:
    """Hold one proxy, kill its worker ``warmup + kills`` times; the measured kills."""
    done: list[Kill] = []
    async with open_client(socket_path, name="bench_restart") as client:
        proxy = await client.request_proxy("echo")
        for method, args in SETUP_CALLS:
            await proxy.call(method, args)
        recorder = Recorder(client, proxy)
        client.nursery.start_soon(recorder.run)
        pid = await worker_pid(client)
        for _ in range(warmup + kills):
            await trio.sleep(PAUSE)
            # Events still arriving for the previous kill are read as that kill's until here.
            kill = Kill(pid, 0.0, 0.0)
            recorder.current = kill
            kill.wall0 = time.time()
            kill.t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            kill.recovered = await recorder.wait_for(kill, ("running", "recovered"), RECOVERY_LIMIT)
            if not kill.recovered:
                # A miss is counted; the run goes on if the proxy comes back at all.
                await wait_valid(proxy, daemon_alive)
            await proxy.call("pid")  # the proxy answers again
            pid = await worker_pid(client)
            if kill.new_pid is not None and pid != kill.new_pid:
                raise RuntimeError(f"proxy answers from {pid}, module runs {kill.new_pid}")
            kill.new_pid = pid
            done.append(kill)
    return done[warmup:]


async def wait_valid(proxy: Proxy, daemon_alive: Callable[[], bool]) -> None:
    """Wait for a proxy that missed the limit; raise if the daemon died or it never comes."""
    deadline = trio.current_time() + RECOVERY_GIVE_UP
    while not proxy.valid:
        if not daemon_alive():
            raise DaemonDied("the daemon exited during the run")
        if trio.current_time() > deadline:
            raise RuntimeError(f"the proxy did not recover within {RECOVERY_GIVE_UP:g} s")
        await trio.sleep(0.05)


class DaemonDied(RuntimeError):
    """The daemon exited while the benchmark was using it."""


# --- the daemon's log: where the time goes ----------------------------------------------


#: Stages read from the daemon's log, in the order they happen: (name, matcher).
Matcher = Callable[[dict[str, Any], Kill], bool]


def _is(event: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("event") == event and all(r.get(k) == v for k, v in fields.items())


def _stages() -> list[tuple[str, Matcher]]:
    exited = _is("worker.exited", module="echo")
    starting = _is("module.state_changed", module="echo", state="starting")
    forked = _is("worker.forked", module="echo")
    spawned = _is("worker.spawned", module="echo")
    ready = _is("worker.ready", module="echo")
    running = _is("module.state_changed", module="echo", state="running")
    valid = _is("proxy.state_changed", state="valid", reason="recovered")
    return [
        ("daemon: worker.exited logged", lambda r, k: exited(r) and r["worker_pid"] == k.old_pid),
        ("daemon: first reopen refused", lambda r, _: refused(r)),
        ("daemon: starting", lambda r, _: starting(r)),
        ("daemon: worker forked/spawned (debug log)",
         lambda r, k: (forked(r) or spawned(r)) and r["worker_pid"] == k.new_pid),
        ("daemon: worker.ready (READY received)",
         lambda r, k: ready(r) and r["worker_pid"] == k.new_pid),
        ("daemon: running", lambda r, k: running(r) and r.get("worker_pid") == k.new_pid),
        ("daemon: proxy valid (ProxyReady handled)",
         lambda r, k: valid(r) and r.get("worker_pid") == k.new_pid),
    ]  # fmt: skip


#: The daemon refused a client's REOPEN_PROXY because the module was not running (yet).
refused = _is("request.failed", code="module_unavailable")


def breakdown(
    records: list[dict[str, Any]], kills: list[Kill]
) -> tuple[dict[str, dict[str, float]], int]:
    """Per stage, ms after the kill (daemon log and client), summarised; and reopens refused.

    The daemon's log times are wall-clock (CLOCK_REALTIME), as is each kill's
    ``wall0``, so both are on one clock; a kill's window ends at the next kill.
    """
    stages = _stages()
    per_stage: dict[str, list[float]] = {name: [] for name, _ in stages}
    timed = [(r, log_time(r)) for r in records if "timestamp" in r]
    ends = [k.wall0 for k in kills[1:]] + [math.inf]
    refusals = 0
    for kill, end in zip(kills, ends, strict=True):
        window = [(r, t) for r, t in timed if kill.wall0 <= t < end]
        refusals += sum(1 for r, _ in window if refused(r))
        for name, match in stages:
            hit = next((t for r, t in window if match(r, kill)), None)
            if hit is not None:
                per_stage[name].append((hit - kill.wall0) * 1e3)
    client_steps = ["proxy invalid", "module exited", "module starting", "running",
                    "proxy valid (daemon)", "recovered"]  # fmt: skip
    for step in client_steps:
        per_stage[f"client: {step}"] = [k.seen[step] * 1e3 for k in kills if step in k.seen]
    return {name: summary(values) for name, values in per_stage.items() if values}, refusals


# --- running a variant ---------------------------------------------------------------


def run_variant(
    forkserver: bool,
    standby: bool,
    kills: int,
    warmup: int,
    log_level: str,
    keep_log: Path | None,
    proxy: str = "isolated",
) -> dict[str, Any]:
    """Start a daemon, kill its worker ``kills`` times, and summarise."""
    config = config_text(forkserver, standby, proxy)
    with running_daemon(config, log_level, keep_log) as daemon:
        try:
            measured = trio.run(kill_loop, daemon.socket, kills, warmup, daemon.alive)
        except BaseException:
            if not daemon.alive():
                tail = daemon.log_path.read_text(errors="replace")[-4000:]
                print(f"the daemon exited (status {daemon.proc.returncode}) during the run; "
                      f"its log ends:\n{tail}", file=sys.stderr)  # fmt: skip
            raise
        records = daemon.records()
        status_forks = [r for r in records if r.get("event") == "forkserver.fork_failed"]
    to_running = [k.seen["running"] * 1e3 for k in measured if "running" in k.seen]
    to_valid = [k.seen["recovered"] * 1e3 for k in measured if "recovered" in k.seen]
    missed = [i for i, k in enumerate(measured) if not k.recovered]
    stages, refusals = breakdown(records, measured)
    after_running = [
        (k.seen["recovered"] - k.seen["running"]) * 1e3
        for k in measured
        if "recovered" in k.seen and "running" in k.seen
    ]
    return {
        "config": config,
        "log_level": log_level,
        "kills": len(measured),
        "warmup_kills": warmup,
        "not_recovered_within_2s": len(missed),
        "fork_failures": len(status_forks),
        "crash_to_running_ms": summary(to_running),
        "crash_to_valid_ms": summary(to_valid),
        "samples_ms": {"crash_to_running": to_running, "crash_to_valid": to_valid},
        # Per kill: pids, the kill's wall-clock time and each step as the client saw it.
        "running_to_valid_ms": summary(after_running),
        "reopen_refused": refusals,
        "breakdown_ms": stages,
        "kills_detail": [
            {
                "old_pid": k.old_pid,
                "new_pid": k.new_pid,
                "wall0": k.wall0,
                "seen_ms": {step: t * 1e3 for step, t in k.seen.items()},
            }
            for k in measured
        ],
    }


# --- the peers: same kills, same child program -------------------------------------------

#: name, how the peer is started, its polling period (s): kills land at a random phase of
#: it, as a real crash does not wait for a supervisor's tick. supervisord wakes from its
#: poll() once a second to reap; circus checks its processes every ``check_delay`` (5 s).
PEER_VARIANTS = (
    ("supervisord, autorestart", "supervisord", 1.0),
    ("circus, default settings", "circus", 5.0),
    ("systemd, Restart=always (default RestartSec=100ms)", "systemd:default", 0.0),
    ("systemd, Restart=always, RestartSec=0", "systemd:0", 0.0),
)
#: The systemd unit of each systemd variant, and its RestartSec (None: systemd's default).
SYSTEMD_UNITS = {"systemd:default": ("child-default.service", None),
                 "systemd:0": ("child-zero.service", "0")}  # fmt: skip


def peer_kill_loop(
    beacon: Beacon, pid: int, kills: int, warmup: int, period: float, rng: random.Random
) -> list[float]:
    """SIGKILL the peer's child ``warmup + kills`` times; ms until each new child announced."""
    times = []
    for _ in range(warmup + kills):
        time.sleep(PAUSE + rng.uniform(0, period))
        start = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        heard = beacon.receive(period + RECOVERY_LIMIT + 5)
        if heard is None:
            raise RuntimeError(f"no new child within {period + RECOVERY_LIMIT + 5:g} s of a kill")
        new_pid, seen = heard
        if new_pid == pid:
            raise RuntimeError(f"the killed child {pid} announced itself again")
        pid = new_pid
        times.append((seen - start) * 1e3)
    return times[warmup:]


def run_peers(kills: int, warmup: int, seed: int) -> dict[str, Any]:
    """Every peer's crash -> running, on the same child program; skipped ones say why."""
    rng = random.Random(seed)  # noqa: S311 - pauses, not secrets
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ipad-bench-peers-") as tmp, \
            beacon_in(Path(tmp)) as beacon:  # fmt: skip
        argv = child_argv(beacon.path)
        for name, how, period in PEER_VARIANTS:
            if how.startswith("systemd"):
                continue
            directory = Path(tmp) / how
            directory.mkdir()
            start = supervisord if how == "supervisord" else circusd
            with start(directory, argv) as peer:
                pid = beacon.wait_for(1, PEER_TIMEOUT)[0][0]
                samples = peer_kill_loop(beacon, pid, kills, warmup, period, rng)
                peer.check_alive()
            beacon.kill_children()
            results[name] = peer_result(samples, period)
        why_not = systemd_available()
        systemd_names = [(n, how, period) for n, how, period in PEER_VARIANTS if n not in results]
        if why_not is not None:
            for name, _, _ in systemd_names:
                results[name] = {"skipped": why_not}
            return results
        units = {unit: systemd_unit(argv, sec) for unit, sec in SYSTEMD_UNITS.values()}
        directory = Path(tmp) / "systemd"
        directory.mkdir()
        with systemd(directory, units) as booted:
            for name, how, period in systemd_names:
                unit = SYSTEMD_UNITS[how][0]
                booted.systemctl("start", unit)
                pid = beacon.wait_for(1, PEER_TIMEOUT)[0][0]
                samples = peer_kill_loop(beacon, pid, kills, warmup, period, rng)
                booted.systemctl("stop", unit)
                results[name] = peer_result(samples, period)
    return results


def peer_result(samples: list[float], period: float) -> dict[str, Any]:
    """One peer's figures."""
    return {
        "kills": len(samples),
        "random_pause_s": [PAUSE, PAUSE + period],
        "crash_to_running_ms": summary(samples),
        "samples_ms": samples,
    }


# --- output --------------------------------------------------------------------------

#: name, fork server, standby worker, proxy kind. The first is the default configuration;
#: the sandboxed ones show what the sandbox costs (docs/security.md), next to the same
#: variant isolated.
VARIANTS = (
    ("ipad, standby + fork server", True, True, "isolated"),
    ("ipad, standby + fork server, sandboxed", True, True, "sandboxed"),
    ("ipad, fork server", True, False, "isolated"),
    ("ipad, fork server, sandboxed", True, False, "sandboxed"),
    ("ipad, fresh interpreter", False, False, "isolated"),
)
FORK_LIMIT = "fork a warm process + SEQPACKET message"


def print_table(
    variants: dict[str, Any], peers: dict[str, Any], limits: dict[str, dict[str, float]]
) -> None:
    """The figures, each with its ratio to the warm-fork limit."""
    fork_p50 = limits[FORK_LIMIT]["p50"]
    head = f"{'variant':60s} {'p50':>8s} {'p90':>8s} {'p99':>8s} {'max':>8s} {'p50/fork':>9s}"
    print(head + "   (ms)")
    print("-" * len(head))
    rows: list[tuple[str, dict[str, float]]] = []
    for name, result in variants.items():
        rows.append((f"{name}: crash -> running", result["crash_to_running_ms"]))
        rows.append((f"{name}: crash -> valid", result["crash_to_valid_ms"]))
    for name, result in peers.items():
        if "skipped" in result:
            print(f"{name}: crash -> running: skipped ({result['skipped']})")
            continue
        rows.append((f"{name}: crash -> running", result["crash_to_running_ms"]))
    rows += [(f"limit: {name}", figures) for name, figures in limits.items()]
    for label, s in rows:
        print(f"{label:60s} {s['p50']:8.2f} {s['p90']:8.2f} {s['p99']:8.2f} {s['max']:8.2f} "
              f"{s['p50'] / fork_p50:9.1f}")  # fmt: skip


def print_breakdown(name: str, result: dict[str, Any]) -> None:
    """Median time after the kill at which each stage was reached."""
    stages: dict[str, dict[str, float]] = result["breakdown_ms"]
    print(f"\n{name}: where the time goes (ms after the kill: median, p90, n)")
    ordered = sorted(stages.items(), key=lambda item: item[1]["p50"])
    for stage, s in ordered:
        print(f"  {stage:52s} {s['p50']:9.2f} {s['p90']:9.2f} {int(s['n']):5d}")
    gap = result["running_to_valid_ms"]
    print(f"  client: module running -> proxy valid: median {gap['p50']:.2f} ms, "
          f"max {gap['max']:.2f} ms; reopens refused: {result['reopen_refused']} "
          f"in {result['kills']} kills")  # fmt: skip
    if gap["p50"] > RETRY_HINT_MS:
        print(
            "  note: the client recovers long after the module runs again: its first "
            "REOPEN_PROXY was refused\n  (module not running yet) and it retried only on "
            f"its timer (ipad/client/_trio.py RECOVERY_RETRY = {RECOVERY_RETRY:g} s)."
        )


def goals(ipad: dict[str, Any], peers: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals for ipad's default configuration (standby + fork server)."""
    valid = ipad["crash_to_valid_ms"]
    out = [
        goal(f"crash -> valid p50 < {GOAL_P50_MS:g} ms", f"{valid['p50']:.2f} ms",
             valid["p50"] < GOAL_P50_MS),
        goal(f"crash -> valid p99 < {GOAL_P99_MS:g} ms", f"{valid['p99']:.2f} ms",
             valid["p99"] < GOAL_P99_MS),
    ]  # fmt: skip
    for name, factor in GOAL_SPEEDUP.items():
        peer = peers.get(name, {})
        if "crash_to_running_ms" not in peer:
            out.append(goal(f">= {factor:g}x faster than {name}", "not measured", None))
            continue
        speedup = peer["crash_to_running_ms"]["p50"] / valid["p50"]
        out.append(goal(f">= {factor:g}x faster than {name} (p50)", f"{speedup:.1f}x",
                        speedup >= factor))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every variant, peer and limit, print the table, save the figures."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--kills", type=int, default=60, help="measured kills per variant")
    args_parser.add_argument(
        "--peer-kills", type=int, default=50, help="measured kills per peer (circus: ~5 s each)"
    )
    args_parser.add_argument("--warmup", type=int, default=WARMUP, help="unmeasured kills first")
    args_parser.add_argument("--no-peers", action="store_true", help="measure ipad only")
    args_parser.add_argument("--seed", type=int, default=6, help="seed of the peers' pauses")
    args_parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info"],
        help="the daemon's log level (debug adds worker.forked to the breakdown)",
    )
    args_parser.add_argument(
        "--keep-logs",
        type=Path,
        metavar="DIR",
        help="copy each variant's daemon log (JSON lines) into DIR",
    )
    args = args_parser.parse_args(argv)
    if args.quick:
        args.kills, args.peer_kills, args.warmup = 3, 1, 1

    load_before = [round(x, 2) for x in os.getloadavg()]
    limits_raw = measure_limits(max(args.kills, 10))
    limits = {name: summary(values) for name, values in limits_raw.items()}
    variants: dict[str, Any] = {}
    for name, forkserver, standby, proxy in VARIANTS:
        keep = None
        if args.keep_logs is not None:
            slug = ("standby-" if standby else "") + ("forkserver" if forkserver else "fresh")
            keep = args.keep_logs / f"daemon-{slug}-{proxy}.log"
        variants[name] = run_variant(
            forkserver, standby, args.kills, args.warmup, args.log_level, keep, proxy
        )
    peer_warmup = 0 if args.quick else args.warmup
    peers = {} if args.no_peers else run_peers(args.peer_kills, peer_warmup, args.seed)

    print(f"crash -> running / valid over {args.kills} SIGKILLs per ipad variant, "
          f"{args.peer_kills} per peer (+{args.warmup} warm-up); ipad's restart policy: "
          f"{POLICY_SUMMARY}")  # fmt: skip
    print_table(variants, peers, limits)
    for name, result in variants.items():
        print_breakdown(name, result)
    checked = goals(variants[VARIANTS[0][0]], peers)
    print()
    print_goals(checked)
    missed = {name: r["not_recovered_within_2s"] for name, r in variants.items()}
    print(f"kills not recovered within {RECOVERY_LIMIT:g} s: {missed}")

    data = {
        "load_average_before": load_before,
        "quick": args.quick,
        "kills": args.kills,
        "peer_kills": args.peer_kills,
        "restart_policy": FAST_RESTART,
        "variants": variants,
        "peers": peers,
        "limits_ms": limits,
        "limit_samples_ms": limits_raw,
        "goals": checked,
    }
    write_results(args.results, "restart", data, headline(variants, peers, limits))
    if any(missed.values()):
        print(f"FAILED: kills did not recover within {RECOVERY_LIMIT:g} s: {missed}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def headline(
    variants: dict[str, Any], peers: dict[str, Any], limits: dict[str, dict[str, float]]
) -> list[Row]:
    """The figures ``bench/run.py`` shows: name, value, unit, ratio to the limit."""
    fork_p50 = limits[FORK_LIMIT]["p50"]
    rows = []
    for name, result in variants.items():
        for key, label in (("crash_to_running_ms", "crash -> running"),
                           ("crash_to_valid_ms", "crash -> valid")):  # fmt: skip
            s = result[key]
            rows.append(row(f"{name}: {label} p50", s["p50"], "ms", fork_p50, "warm fork"))
            rows.append(row(f"{name}: {label} p99", s["p99"], "ms", fork_p50, "warm fork"))
    for name, result in peers.items():
        if "skipped" in result:
            rows.append(row(f"{name}: skipped ({result['skipped']})", math.nan, ""))
            continue
        s = result["crash_to_running_ms"]
        rows.append(row(f"{name}: crash -> running p50", s["p50"], "ms", fork_p50, "warm fork"))
        rows.append(row(f"{name}: crash -> running p99", s["p99"], "ms", fork_p50, "warm fork"))
    for name, s in limits.items():
        rows.append(row(f"limit: {name} p50", s["p50"], "ms", fork_p50, "warm fork"))
    return rows


if __name__ == "__main__":
    sys.exit(main())
