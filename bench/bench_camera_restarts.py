"""A camera at 30 frames/s against a killed AWB worker: the old restart defaults against the new.

The story of issue 20: an app calling ``awb.process_stats`` once per frame
(every 33 ms, through the blocking client and its transparent recovery)
while its worker is SIGKILLed N times in T seconds. Each kill loop runs twice
on a fresh daemon in the same run, once with each policy:

- *old defaults*: the policy before ``served_after`` and ``promote_at_once``
  (``served_after = "1h"``: no run counts as served; ``promote_at_once =
  false``: a loaded standby waits out the backoff like a fresh start);
- *new defaults*: the shipped ``[restart]`` table, nothing overridden.

For every kill: the outage (kill -> the end of the next successful call) and
the frames missed (frame slots from the kill to that call that got no
answer in time); per run: max and p50 outage, seconds in cooldown (from the
daemon's state changes), frames served. Two kill loops: the issue's 10 kills
in 20 s, and a harsher one, 20 kills in 5 s (every 250 ms: shorter runs than
``served_after``, which the new policy still treats as a crash loop).

The kill loops also count worker forks per second and the daemon's CPU per
second of wall time (daemon, fork server and the workers it reaped, from
/proc; the camera's calls are served in it too): what the new policy's
restarts cost. These daemons log at debug level (``worker.forked`` and
``worker.spawned`` are debug records).

Then the crash loops the policy must still contain, each module alone on a
daemon, with each policy: ``broken`` (its import fails: every start dies in
LOAD) and ``fleeting`` (READY, then dead 20 ms later, standbys too): forks
per second and CPU over a window once the daemon has started, and how long
after the first fork it entered cooldown. Ratios, not assertions: bench/RESULTS.md reads the table.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
from _common import (
    REPO,
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
from _ipad import DaemonProcess, log_time, running_daemon

from ipad.client import BlockingClient, IpadError, make_buffer

sys.path.insert(0, str(REPO / "workers" / "modules"))
from ipa_modules.awb import pack_zones

FPS = 30.0
FRAME = 1.0 / FPS
#: A camera does not wait longer than this for one frame's AWB.
CALL_TIMEOUT = 1.0
#: How long the camera keeps running after the last kill (the last outage ends in it).
TAIL = 3.0

#: The policies compared, as ``[modules.<name>.restart]`` lines.
POLICIES = {
    "old defaults": 'served_after = "1h"\npromote_at_once = false\n',
    "new defaults": "",
}

TEST_MODULES = REPO / "tests" / "modules"
#: The daemon's debug records of a new worker process (forked, or spawned afresh).
FORKED = ("worker.forked", "worker.spawned")


@attrs.frozen
class KillLoop:
    """N SIGKILLs of the active worker, evenly spread over T seconds."""

    name: str
    kills: int
    seconds: float


@attrs.define
class Slot:
    """One frame: when it was due, and how its call went (None: skipped, the camera ran late)."""

    due: float
    began: float | None = None
    ended: float | None = None
    ok: bool = False

    @property
    def on_time(self) -> bool:
        """Answered before the next frame was due."""
        return self.ok and self.ended is not None and self.ended <= self.due + FRAME


def config(module: str, policy: str, extra_dirs: bool = False) -> str:
    """One module with the policy's overrides (the test modules' directory if asked)."""
    dirs = f'[daemon]\nmodule_dirs = ["{REPO / "workers" / "modules"}", "{TEST_MODULES}"]\n'
    return (
        dirs if extra_dirs else ""
    ) + f"[modules.{module}]\n[modules.{module}.restart]\n{policy}"


@contextlib.contextmanager
def stats_fd() -> Iterator[int]:
    """A sealable memfd holding one frame's AWB statistics (64 grey-ish zones)."""
    fd = make_buffer(pack_zones([(4000, 5000, 4500, 100)] * 64), "awb-stats")
    try:
        yield fd
    finally:
        os.close(fd)


def killer(socket_path: str, loop: KillLoop, start: float, kills: list[float | None]) -> None:
    """At each kill time, SIGKILL the module's running worker (None: none to kill then)."""
    with BlockingClient(socket_path, name="bench_camera_killer") as client:
        for k in range(1, loop.kills + 1):
            delay = start + k * loop.seconds / loop.kills - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            module = client.status().modules["awb"]
            pid = module.get("worker_pid")
            if module.get("state") != "running" or not isinstance(pid, int):
                kills.append(None)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                kills.append(time.monotonic())
                continue
            kills.append(None)


def camera(socket_path: str, seconds: float, start: float) -> tuple[list[Slot], int]:
    """Call process_stats once per frame until ``seconds`` after ``start``; the slots."""
    slots: list[Slot] = []
    with BlockingClient(socket_path, name="bench_camera") as client, stats_fd() as fd:
        proxy = client.request_proxy("awb")
        proxy.call("init")
        proxy.call("process_stats", {"frame": 0}, fds={"stats": fd})  # a bad call fails the run
        frame = 0
        while (due := start + frame * FRAME) < start + seconds:
            frame += 1
            slot = Slot(due)
            slots.append(slot)
            if time.monotonic() > due + FRAME:
                continue  # behind: this frame is dropped, as a camera would
            time.sleep(max(0.0, due - time.monotonic()))
            slot.began = time.monotonic()
            try:
                proxy.call(
                    "process_stats", {"frame": frame}, fds={"stats": fd}, timeout=CALL_TIMEOUT
                )
                slot.ok = True
            except IpadError:
                pass
            slot.ended = time.monotonic()
        return slots, proxy.recoveries


def outages(slots: list[Slot], kills: list[float]) -> list[dict[str, float]]:
    """Per kill: ms from the kill to the end of the next successful call, and frames missed."""
    out = []
    for at in kills:
        served = next((s for s in slots if s.ok and s.began is not None and s.began >= at), None)
        until = served.due if served is not None else slots[-1].due + FRAME
        missed = sum(1 for s in slots if s.due + FRAME > at and s.due < until and not s.on_time)
        end = served.ended if served is not None and served.ended is not None else until
        out.append(
            {"outage_ms": (end - at) * 1e3, "missed": missed, "recovered": served is not None}
        )
    return out


def state_seconds(
    daemon: DaemonProcess, module: str, state: str, since: float, until: float
) -> float:
    """Seconds of wall time the module spent in ``state`` between ``since`` and ``until``."""
    changes = [
        (log_time(r), r.get("state"))
        for r in daemon.records()
        if r.get("event") == "module.state_changed" and r.get("module") == module
    ]
    total, entered = 0.0, None
    for when, now in changes:
        if now == state and entered is None:
            entered = when
        elif now != state and entered is not None:
            total += max(0.0, min(when, until) - max(entered, since))
            entered = None
    if entered is not None:
        total += max(0.0, until - max(entered, since))
    return total


def run_kill_loop(loop: KillLoop, policy: str) -> dict[str, Any]:
    """One kill loop against one policy, on a fresh daemon (logging at debug: forks are counted)."""
    with running_daemon(config("awb", policy), log_level="debug") as daemon:
        pids = daemon_pids(daemon)
        kills: list[float | None] = []
        start = time.monotonic() + 0.5  # the camera's proxy is granted and warm by then
        wall_start = time.time() + 0.5
        thread = threading.Thread(
            target=killer, args=(str(daemon.socket), loop, start, kills), daemon=True
        )
        ticks_before = sum(_cpu_ticks(pid) for pid in pids)
        thread.start()
        try:
            slots, recoveries = camera(str(daemon.socket), loop.seconds + TAIL, start)
        finally:
            thread.join(timeout=loop.seconds + TAIL + 10)
        ticks = sum(_cpu_ticks(pid) for pid in pids) - ticks_before
        wall_end = wall_start + loop.seconds + TAIL
        cooldown = state_seconds(daemon, "awb", "cooldown", wall_start, wall_end)
        backoff = state_seconds(daemon, "awb", "backoff", wall_start, wall_end)
        records = daemon.records()
        names = [r.get("event") for r in records]
    forks = [r for r in records if r.get("event") in FORKED and log_time(r) >= wall_start]
    done = [k for k in kills if k is not None]
    per_kill = outages(slots, done)
    ms = [k["outage_ms"] for k in per_kill]
    return {
        "kills": len(done),
        "kills_skipped": len(kills) - len(done),
        "outage_p50_ms": percentile(ms, 50),
        "outage_max_ms": max(ms, default=float("nan")),
        "missed_max": max((k["missed"] for k in per_kill), default=0),
        "missed_total": sum(1 for s in slots if not s.on_time),
        "unrecovered_kills": sum(1 for k in per_kill if not k["recovered"]),
        "frames": len(slots),
        "served": sum(1 for s in slots if s.ok),
        "cooldown_s": cooldown,
        "backoff_s": backoff,
        "backoffs": names.count("module.backoff"),
        "backoffs_skipped": names.count("module.backoff_skipped"),
        "recoveries": recoveries,
        "forks": len(forks),
        "forks_per_s": len(forks) / (wall_end - wall_start),
        # The camera's own calls are in it: the client is another process, the daemon serves it.
        "cpu_per_s": ticks / os.sysconf("SC_CLK_TCK") / (wall_end - wall_start),
        "per_kill": per_kill,
    }


def daemon_pids(daemon: DaemonProcess) -> list[int]:
    """The daemon's pid and its fork server's (whose CPU, with the reaped workers', is its cost)."""
    server = daemon.collect("forkserver.started", 1, 5.0)
    return [daemon.proc.pid, *(r["pid"] for r in server if isinstance(r.get("pid"), int))]


def _cpu_ticks(pid: int) -> int:
    """CPU ticks used by ``pid`` and the children it reaped (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])


@attrs.frozen
class CrashLoop:
    """A module alone on a daemon that dies, every start, as ``module`` (and ``die_after``) say."""

    name: str
    module: str
    #: fleeting's tuning: seconds from its load to its death.
    die_after: float | None = None


def run_crash_loop(loop: CrashLoop, policy: str, window: float) -> dict[str, Any]:
    """A crash-looping module alone on a daemon: forks, CPU, time to cooldown.

    Forks are counted from the daemon's launch (``forks``) and within the
    window (``window_forks_per_s``); CPU over the window only, from once every
    module had its first start (the daemon's own start-up is not the loop's).
    """
    with tempfile.TemporaryDirectory(prefix="ipad-bench-tuning-") as tmp:
        env = {"IPAD_CONFIG_PATH": str(TEST_MODULES / "tuning")}
        if loop.die_after is not None:
            tuning = Path(tmp) / "fleeting.toml"
            tuning.write_text(f"die_after = {loop.die_after}\n")
            env["IPAD_FLEETING_TUNING_FILE"] = str(tuning)
        daemon_config = config(loop.module, policy, extra_dirs=True)
        with running_daemon(daemon_config, log_level="debug", env=env) as daemon:
            pids = daemon_pids(daemon)
            ticks_before = sum(_cpu_ticks(pid) for pid in pids)
            measured_from, wall_from = time.monotonic(), time.time()
            time.sleep(window)
            ticks = sum(_cpu_ticks(pid) for pid in pids) - ticks_before
            took = time.monotonic() - measured_from
            records = list(daemon.records())
    forks = [r for r in records if r.get("event") in FORKED]
    in_window = [r for r in forks if log_time(r) >= wall_from]
    cooled = [
        log_time(r)
        for r in records
        if r.get("event") == "module.cooldown" and r.get("module") == loop.module
    ]
    return {
        "forks": len(forks),
        "window_forks_per_s": len(in_window) / took,
        "cpu_per_s": ticks / os.sysconf("SC_CLK_TCK") / took,
        "to_cooldown_s": cooled[0] - log_time(forks[0]) if cooled and forks else None,
        "cooldowns": len(cooled),
        "measured_s": took,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every kill loop and crash loop with both policies, print, save."""
    exit_on_sigterm()
    parser = common_parser(__doc__)
    parser.add_argument(
        "--window", type=float, default=10.0, help="seconds each crash loop is measured"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        loops = [
            KillLoop("story, 3 kills in 1.5 s", 3, 1.5),
            KillLoop("harsh, 4 kills in 0.8 s", 4, 0.8),
        ]
        window = 1.0
    else:
        loops = [
            KillLoop("story, 10 kills in 20 s", 10, 20.0),
            KillLoop("harsh, 20 kills in 5 s", 20, 5.0),
        ]
        window = args.window
    global TAIL  # noqa: PLW0603 - a quick run waits less after its last kill
    TAIL = 0.5 if args.quick else TAIL
    kill_runs = {
        (loop.name, name): run_kill_loop(loop, policy)
        for loop in loops
        for name, policy in POLICIES.items()
    }
    crash_loops = [
        CrashLoop("crash loop (dies in LOAD)", "broken"),
        CrashLoop("crash loop (dies 20 ms after READY)", "fleeting", 0.02),
    ]
    crash_runs = {
        (loop.name, name): run_crash_loop(loop, policy, window)
        for loop in crash_loops
        for name, policy in POLICIES.items()
    }
    rows: list[Row] = []
    for loop in loops:
        old = kill_runs[(loop.name, "old defaults")]
        new = kill_runs[(loop.name, "new defaults")]
        for key, label, unit in (
            ("outage_max_ms", "outage max", "ms"),
            ("outage_p50_ms", "outage p50", "ms"),
            ("cooldown_s", "time in cooldown", "s"),
            ("missed_total", "frames missed", ""),
            ("served", "frames served", ""),
            ("forks_per_s", "forks/s", "/s"),
            ("cpu_per_s", "daemon CPU", "s/s"),
        ):
            rows.append(
                row(f"{loop.name}, new defaults: {label}", new[key], unit, old[key], "old defaults")
            )
            rows.append(row(f"{loop.name}, old defaults: {label}", old[key], unit))
    for crash in crash_loops:
        old = crash_runs[(crash.name, "old defaults")]
        new = crash_runs[(crash.name, "new defaults")]
        for key, label, unit in (
            ("forks", "forks from the daemon's start", ""),
            ("window_forks_per_s", "forks/s", "/s"),
            ("cpu_per_s", "daemon CPU", "s/s"),
        ):
            rows.append(
                row(
                    f"{crash.name}, new defaults: {label}", new[key], unit, old[key], "old defaults"
                )
            )
            rows.append(row(f"{crash.name}, old defaults: {label}", old[key], unit))
        for name in POLICIES:
            to_cooldown = crash_runs[(crash.name, name)]["to_cooldown_s"]
            rows.append(
                row(
                    f"{crash.name}, {name}: first fork -> cooldown",
                    math.nan if to_cooldown is None else to_cooldown,
                    "s",
                )
            )
    print_rows(
        f"a camera at {FPS:g} frames/s, its AWB worker killed; crash loops over {window:g} s", rows
    )
    story = kill_runs[(loops[0].name, "new defaults")]
    goals = [
        goal(
            f"{loops[0].name} at 30 frames/s: never out for a second, never in cooldown",
            f"max outage {story['outage_max_ms']:.0f} ms, {story['cooldown_s']:.1f} s in cooldown",
            None if args.quick else story["outage_max_ms"] < 1000 and story["cooldown_s"] == 0,
        ),
        goal(
            "crash loops still reach cooldown with the new defaults",
            ", ".join(
                f"{c.name}: {crash_runs[(c.name, 'new defaults')]['to_cooldown_s']} s"
                for c in crash_loops[:2]
            ),
            None
            if args.quick
            else all(crash_runs[(c.name, "new defaults")]["cooldowns"] for c in crash_loops[:2]),
        ),
    ]
    print_goals(goals)
    data = {
        "quick": args.quick,
        "fps": FPS,
        "window": window,
        "kill_loops": {
            f"{loop} / {policy}": figures for (loop, policy), figures in kill_runs.items()
        },
        "crash_loops": {
            f"{loop} / {policy}": figures for (loop, policy), figures in crash_runs.items()
        },
        "goals": goals,
    }
    write_results(args.results, "camera_restarts", data, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
