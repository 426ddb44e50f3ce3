"""Crash storm: clients calling at full speed while workers are killed at random, 20 times a second.

A daemon runs M copies of the ``echo`` module. C trio clients each hold a
proxy to every module (C x M proxies, each set up with ``init``), and one
task per proxy calls ``echo`` in a loop as fast as it is answered. Every
call carries a unique token (client, module, sequence number) and must get
exactly its own token back, or a clear error. Meanwhile a killer SIGKILLs
the worker of a module picked at random among the running ones, 20 times a
second for 10 s. Calls made while a proxy is invalid wait for its recovery
(``wait=2``); a call neither answered nor failed within 5 s is lost.

Reported: calls answered, calls failed (by cause: in flight when the worker
died, sent on a channel found closed before the proxy knew it was invalid,
or not recovered within the wait), calls lost and calls misrouted
(both must be zero), and recovery: for each kill and each proxy on the
killed module, from the kill to the client library's ``recovered`` event
(p50, p99, max). The limit, measured in the same run, is the same clients
calling with no kill for a few seconds first: the storm's calls per second
over the calm ones says how much of its throughput ipad keeps.

The restart policy restarts at once and never cools down (a storm of 200
kills would otherwise be a crash loop, which it is not); heartbeats keep
their defaults.

Run: python bench/bench_storm.py [--seconds 10] [--rate 20]  (writes bench/results/storm.json)
"""

from __future__ import annotations

import collections
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio
from _common import (
    Row,
    exit_on_sigterm,
    goal,
    parser,
    print_goals,
    print_rows,
    row,
    summary,
    write_results,
)
from _ipad import DaemonProcess, copies_daemon_section, echo_copies, module_config

from ipad.client._trio import Client, LocalEvent, Proxy, open_client
from ipad.protocol.errors import IpadError, WorkerCrashed

#: A call neither answered nor failed within this many seconds is lost.
CALL_DEADLINE = 5.0
#: Between the storm's last kill and the calls that check every proxy answers again (s).
SETTLE = 0.1
#: A call on an invalid proxy waits this long for it to recover.
WAIT = 2.0
#: A call whose send fails on a channel its worker already closed once raised
#: WorkerCrashed at once, without a trio checkpoint and without marking the proxy
#: invalid, so a caller retrying at once spun for ever (this benchmark hung on it;
#: bench/RESULTS.md). The client library now resends such a call after recovery
#: (CallNotSent). Callers still checkpoint after any failure, so that a regression
#: shows up in the counts, under this cause, instead of as a hang.
FAILED_SEND = "sent on a channel already closed, before the proxy knew"
#: Every restart immediate, never a cooldown; heartbeats as configured by default.
STORM_RESTART = 'max_failures = 1000000\ninitial_delay = "0"\nmax_delay = "0"\n'


@attrs.define
class Tally:
    """What happened to the calls."""

    answered: int = 0
    failed: collections.Counter[str] = attrs.field(factory=collections.Counter)
    lost: int = 0
    misrouted: int = 0
    examples: list[str] = attrs.field(factory=list)

    def add(self, other: Tally) -> None:
        """Fold ``other`` into this one."""
        self.answered += other.answered
        self.failed.update(other.failed)
        self.lost += other.lost
        self.misrouted += other.misrouted
        self.examples += other.examples[:5]


@attrs.define
class Storm:
    """The shared state of one run."""

    tally: Tally = attrs.field(factory=Tally)
    #: module -> its current worker's pid, None while it is being restarted.
    pids: dict[str, int | None] = attrs.field(factory=dict)
    #: (module, killed pid, perf_counter before the kill)
    kills: list[tuple[str, int, float]] = attrs.field(factory=list)
    #: (module, proxy id, perf_counter when the client library reported it recovered)
    recoveries: list[tuple[str, int, float]] = attrs.field(factory=list)
    recovery_failed: int = 0
    kill_skipped: int = 0


async def call_loop(proxy: Proxy, tag: str, tally: Tally, stop: trio.Event) -> None:
    """Call ``echo`` with a unique token per call, as fast as answers come, until ``stop``."""
    seq = 0
    while not stop.is_set():
        seq += 1
        token = f"{tag}:{seq}"
        reply: Any = None
        with trio.move_on_after(CALL_DEADLINE) as deadline:
            try:
                reply = await proxy.call("echo", {"text": token}, wait=WAIT)
            except WorkerCrashed as exc:
                tally.failed[f"WorkerCrashed ({crash_cause(exc.message)})"] += 1
                await trio.lowlevel.checkpoint()  # see FAILED_SEND below
                continue
            except IpadError as exc:
                tally.failed[type(exc).__name__] += 1
                await trio.lowlevel.checkpoint()
                continue
        if deadline.cancelled_caught:
            tally.lost += 1
            continue
        text = reply.get("text") if isinstance(reply, dict) else None
        if text == token:
            tally.answered += 1
        else:
            tally.misrouted += 1
            tally.examples.append(f"sent {token!r}, got {reply!r}")


def crash_cause(message: str) -> str:
    """Why a call failed with WorkerCrashed, from its message (ipad/client/_trio.py's wording)."""
    if "did not recover" in message:
        return "not recovered within the wait"
    if "channel is closed" in message:
        return FAILED_SEND
    return "in flight when the worker died"


async def watch_events(client: Client, storm: Storm, track_pids: bool) -> None:
    """Record recoveries (and, for one client, which worker each module runs on)."""
    async for event in client.events:
        if isinstance(event, LocalEvent):
            if event.kind == "recovered" and event.proxy_id is not None:
                storm.recoveries.append((event.module, event.proxy_id, time.perf_counter()))
            elif event.kind == "recovery_failed":
                storm.recovery_failed += 1
        elif track_pids and event.kind == "module" and event.module in storm.pids:
            running = event.state == "running"
            storm.pids[event.module] = event.worker_pid if running else None


async def killer(storm: Storm, rate: float, seconds: float, rng: random.Random) -> None:
    """SIGKILL a random running module's worker ``rate`` times a second for ``seconds``."""
    at = trio.current_time()
    end = at + seconds
    while True:
        at += 1 / rate
        if at > end:
            return
        await trio.sleep_until(at)
        running = [(module, pid) for module, pid in storm.pids.items() if pid is not None]
        if not running:
            storm.kill_skipped += 1
            continue
        module, pid = rng.choice(running)
        storm.pids[module] = None  # until the daemon says it runs again
        start = time.perf_counter()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            storm.kill_skipped += 1
            continue
        storm.kills.append((module, pid, start))


async def run_storm(
    socket_path: Path, modules: list[str], clients: int, calm_s: float, seconds: float,
    rate: float, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Calm calls first, then the storm; everything that happened."""
    storm = Storm()
    rng = random.Random(seed)  # noqa: S311 - which worker to kill, not a secret
    async with trio.open_nursery() as nursery:
        opened: list[Client] = []
        proxies: list[tuple[str, Proxy]] = []
        for c in range(clients):
            client = await nursery.start(_client_task, socket_path, f"storm{c}")
            opened.append(client)
            for module in modules:
                proxy = await client.request_proxy(module)
                await proxy.call("init")
                proxies.append((f"c{c}:{module}", proxy))
        status = await opened[0].status()
        storm.pids = {m: status.modules[m]["worker_pid"] for m in modules}
        for i, client in enumerate(opened):
            nursery.start_soon(watch_events, client, storm, i == 0)

        async def phase(length: float, with_kills: bool) -> tuple[Tally, float]:
            tally, stop = Tally(), trio.Event()
            started = time.perf_counter()
            async with trio.open_nursery() as callers:
                for tag, proxy in proxies:
                    callers.start_soon(call_loop, proxy, tag, tally, stop)
                if with_kills:
                    await killer(storm, rate, length, rng)
                else:
                    await trio.sleep(length)
                stop.set()
            return tally, time.perf_counter() - started

        calm, calm_took = await phase(calm_s, with_kills=False)
        stormy, storm_took = await phase(seconds, with_kills=True)
        # Afterwards every proxy must be valid again and answer its own token. The last
        # kill can land in the storm's last instant: a final call sent before its client
        # has seen that death fails as in flight, which is the storm's figure, not this
        # one's. So the final calls start once such a kill has been seen and recovered
        # from (a settle of ten median recoveries).
        await trio.sleep(SETTLE)
        final = Tally()
        with trio.move_on_after(CALL_DEADLINE * 2):
            for tag, proxy in proxies:
                await call_once(proxy, f"{tag}:final", final)
        for client in opened:
            client.close()
        nursery.cancel_scope.cancel()
    return {"calm": calm, "calm_s": calm_took, "storm": stormy, "storm_s": storm_took,
            "final": final, "state": storm, "proxies": len(proxies)}  # fmt: skip


async def call_once(proxy: Proxy, token: str, tally: Tally) -> None:
    """One call after the storm, waiting for recovery; counted like the storm's."""
    try:
        reply = await proxy.call("echo", {"text": token}, wait=CALL_DEADLINE)
    except IpadError as exc:
        tally.failed[type(exc).__name__] += 1
        return
    if isinstance(reply, dict) and reply.get("text") == token:
        tally.answered += 1
    else:
        tally.misrouted += 1


async def _client_task(
    socket_path: Path, name: str, *, task_status: trio.TaskStatus[Client]
) -> None:
    async with open_client(socket_path, name=name) as client:
        task_status.started(client)
        await trio.sleep_forever()


def recovery_times(storm: Storm, proxies_per_module: int) -> tuple[list[float], int]:
    """Per kill and proxy on its module: ms from the kill to recovered; and how many never did.

    A proxy killed again before it recovered from the previous kill counts
    as not recovered for that kill (its recovery is the next kill's).
    """
    by_proxy: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    for module, proxy_id, at in storm.recoveries:
        by_proxy[(module, proxy_id)].append(at)
    times: list[float] = []
    missing = 0
    for i, (module, _, start) in enumerate(storm.kills):
        later = [t for m, _, t in storm.kills[i + 1 :] if m == module]
        until = later[0] if later else float("inf")
        keys = [key for key in by_proxy if key[0] == module]
        for key in keys:
            hit = next((t for t in by_proxy[key] if start < t < until), None)
            if hit is None:
                missing += 1
            else:
                times.append((hit - start) * 1e3)
        missing += proxies_per_module - len(keys)
    return times, missing


def main(argv: list[str] | None = None) -> int:
    """Run the storm, print, save; exit status 1 if a call was lost or misrouted."""
    exit_on_sigterm()
    args_parser = parser(__doc__)
    args_parser.add_argument("--seconds", type=float, default=10.0, help="how long the storm")
    args_parser.add_argument("--rate", type=float, default=20.0, help="kills per second")
    args_parser.add_argument("--modules", type=int, default=4)
    args_parser.add_argument("--clients", type=int, default=4)
    args_parser.add_argument("--calm", type=float, default=3.0, help="seconds without kills")
    args_parser.add_argument("--seed", type=int, default=6)
    args = args_parser.parse_args(argv)
    if args.quick:
        args.seconds, args.calm, args.modules, args.clients = 0.5, 0.3, 2, 2

    with tempfile.TemporaryDirectory(prefix="ipad-bench-storm-") as tmp:
        root = Path(tmp)
        mods, names = echo_copies(root, args.modules)
        restart = STORM_RESTART
        config = copies_daemon_section(mods) + "".join(
            module_config(n, restart=restart) for n in names
        )
        daemon = DaemonProcess(root, config, "info", {"IPAD_CONFIG_PATH": str(root / "tuning")})
        try:
            daemon.wait_started()
            out = trio.run(run_storm, daemon.socket, names, args.clients, args.calm,
                           args.seconds, args.rate, args.seed)  # fmt: skip
            daemon_alive = daemon.alive()
        finally:
            daemon.close()

    storm: Storm = out["state"]
    stormy: Tally = out["storm"]
    calm: Tally = out["calm"]
    final: Tally = out["final"]
    recovery, not_recovered = recovery_times(storm, args.clients)
    rec = summary(recovery)
    calm_rate = calm.answered / out["calm_s"]
    storm_rate = stormy.answered / out["storm_s"]
    failed = sum(stormy.failed.values())
    rows: list[Row] = [
        row("kills", len(storm.kills), ""),
        row("calls answered with their own token", stormy.answered, ""),
        row("calls failed with a clear error", failed, ""),
        row("calls lost (no answer, no error)", stormy.lost + calm.lost, ""),
        row("calls misrouted (another call's answer)", stormy.misrouted + calm.misrouted, ""),
        row("recovery (kill -> proxy recovered) p50", rec["p50"], "ms"),
        row("recovery (kill -> proxy recovered) p99", rec["p99"], "ms"),
        row("recovery max", rec["max"], "ms"),
        row("calls/s during the storm", storm_rate, "1/s", calm_rate, "calm calls/s"),
        row("limit: calls/s with no kill", calm_rate, "1/s", calm_rate, "calm calls/s"),
    ]
    print_rows(f"crash storm: {args.modules} modules x {args.clients} clients, "
               f"{args.rate:g} kills/s for {args.seconds:g} s", rows)  # fmt: skip
    print(f"  failures by cause: {dict(stormy.failed)}; kills skipped (none running): "
          f"{storm.kill_skipped}; proxy recoveries missing: {not_recovered}; "
          f"recovery_failed events: {storm.recovery_failed}")  # fmt: skip
    print(f"  after the storm: {final.answered} of {out['proxies']} proxies answered; "
          f"daemon alive: {daemon_alive}")  # fmt: skip
    zero = stormy.lost + stormy.misrouted + calm.lost + calm.misrouted
    checked = [
        goal("no call lost or misrouted", str(zero), zero == 0),
        goal("every proxy answers after the storm", f"{final.answered}/{out['proxies']}",
             final.answered == out["proxies"]),
    ]  # fmt: skip
    print_goals(checked)
    data = {
        "quick": args.quick,
        "modules": args.modules,
        "clients": args.clients,
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        "restart_policy": STORM_RESTART,
        "calm": attrs.asdict(calm),
        "storm": attrs.asdict(stormy),
        "final": attrs.asdict(final),
        "kills": len(storm.kills),
        "kills_skipped": storm.kill_skipped,
        "recovery_ms": rec,
        "recovery_samples_ms": recovery,
        "proxy_recoveries_missing": not_recovered,
        "recovery_failed_events": storm.recovery_failed,
        "daemon_alive_after": daemon_alive,
        "goals": checked,
    }
    write_results(args.results, "storm", data, rows)
    return 0 if zero == 0 and daemon_alive else 1


if __name__ == "__main__":
    sys.exit(main())
