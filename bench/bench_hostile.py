"""What a hostile module costs everyone else: the daemon, another module, the operator.

Each attack runs against a fresh daemon serving two sandboxed modules: the
shipped ``echo`` (the bystander) and ``hostile``, a module written for this
benchmark whose methods each start one attack. For every attack the same run
measures, first with no attack (the baseline, which is the limit) and then for
a few seconds of attack:

- ``ipadctl status`` latency (a STATUS request) p50, as a ratio to the baseline;
- a call on the bystander p50, as a ratio to the baseline;
- the daemon's CPU (per cent of one core) and the bytes it logged per second;
- after the attacker's worker is gone (hung or killed and restarted): the
  daemon's descriptors and RSS against the baseline;
- what became of the attacker (its crash reason, or how long until it was
  seen hung).

Nothing is asserted: the hostile-module tests (tests/test_hostile_*.py,
tests/test_e2e_hostile_*.py) prove that each attack fails; this shows what it
still costs. A two-core machine shares its CPU between the attacker's worker
and everyone else, so a module burning CPU shows up in every ratio: that row
is the floor the others are compared with.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import trio
from _common import REPO, Row, exit_on_sigterm, percentile, print_rows, row, write_results
from _common import parser as common_parser
from _ipad import DaemonProcess, log_time

from ipad.client import IpadError, open_client

#: The hostile module: every public method ``attack_<kind>`` starts one attack.
HOSTILE_MODULE = '''
"""A module that attacks whatever it can reach from inside its worker (benchmark)."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time

from ipad.protocol import wire as p
from ipad.ipa import IPAModule

__version__ = "1.0"


def _until(seconds, step):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        step()


def _control():
    return socket.socket(fileno=os.dup(3))


def _board():
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "ipad-heartbeat" in target:
            fd = int(name)
            return mmap.mmap(fd, os.fstat(fd).st_size)
    return None


class Hostile(IPAModule):
    def _background(self, work, seconds):
        threading.Thread(target=_until, args=(seconds, work), daemon=True).start()
        return "started"

    def attack_nothing(self, seconds: float) -> str:
        return "idle"

    def attack_cpu(self, seconds: float) -> str:
        for _ in range(2):
            self._background(lambda: sum(range(10000)), seconds)
        return "started"

    def attack_newlines(self, seconds: float) -> str:
        chunk = b"\\n" * 65536
        return self._background(lambda: os.write(2, chunk), seconds)

    def attack_long_lines(self, seconds: float) -> str:
        chunk = (b"x" * 2000 + b"\\n") * 32
        return self._background(lambda: os.write(2, chunk), seconds)

    def attack_unknown_replies(self, seconds: float) -> str:
        sock = _control()
        ids = iter(range(2**62, 2**63))
        return self._background(lambda: sock.send(p.encode(p.Pong(), next(ids))), seconds)

    def attack_unknown_closes(self, seconds: float) -> str:
        sock = _control()
        packet = p.encode(p.InstanceClosed(instance_id=2**40, reason="lie"))
        return self._background(lambda: sock.send(packet), seconds)

    def attack_huge_reason(self, seconds: float) -> str:
        sock = _control()
        reason = "r" * (p.MAX_PAYLOAD - 64)
        packet = p.encode(p.InstanceClosed(instance_id=self.context.instance_id, reason=reason))
        sock.send(packet)
        return "sent"

    def attack_big_events(self, seconds: float) -> str:
        blob = "e" * 200_000
        return self._background(lambda: self.context.emit("flood", blob), seconds)

    def attack_hang_beating(self, seconds: float) -> str:
        board = _board()
        if board is not None:
            def beat():
                (count,) = struct.unpack_from("<Q", board, 0)
                struct.pack_into("<Q", board, 0, count + 1)
                time.sleep(0.05)
            threading.Thread(target=_until, args=(3600, beat), daemon=True).start()
        time.sleep(3600)
        return "never"
'''

HOSTILE_MANIFEST = """\
name = "hostile"
version = "1.0.0"
api_version = 1
worker = "ipad-worker"
entry_point = "hostile_bench:Hostile"
description = "attacks whatever it can reach (benchmark)"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""

#: (attack, what it tries) in the order they run; ``nothing`` is the baseline's twin.
ATTACKS: list[tuple[str, str]] = [
    ("nothing", "an idle hostile module (the noise floor)"),
    ("cpu", "two threads burning CPU (the machine's floor)"),
    ("newlines", "bare newlines to stderr, 64 KiB writes"),
    ("long_lines", "2 KB lines to stderr"),
    ("unknown_replies", "PONGs to ids the daemon never sent"),
    ("unknown_closes", "INSTANCE_CLOSED for an instance that does not exist"),
    ("huge_reason", "INSTANCE_CLOSED of its own instance with a 256 KiB reason"),
    ("big_events", "200 KB events to its client as fast as it can"),
    ("hang_beating", "main loop blocked, a thread bumping the heartbeat board"),
]

#: The attacks ``--quick`` runs.
QUICK = ("nothing", "unknown_replies", "hang_beating")

#: How long the bystander and status are sampled with no attack, and during one.
BASELINE_S = 1.5
ATTACK_S = 3.0
#: How long after the attacker is gone the daemon's fds and RSS are read.
SETTLE_S = 1.0


def config(root: Path) -> str:
    """Two sandboxed modules (echo, hostile), short heartbeats, the hostile code untrusted."""
    mods = root / "modules"
    mods.mkdir()
    (mods / "hostile.toml").write_text(HOSTILE_MANIFEST)
    (mods / "hostile_bench.py").write_text(textwrap.dedent(HOSTILE_MODULE))
    (mods / "echo.toml").write_text((REPO / "workers/modules/echo.toml").read_text())
    (mods / "ipa_modules").symlink_to(REPO / "workers" / "modules" / "ipa_modules")
    for name in ("echo", "hostile"):
        (root / "tuning" / name).mkdir(parents=True)
        (root / "tuning" / name / "uncalibrated.toml").write_text("")
    trusted = REPO / "workers" / "modules"
    return textwrap.dedent(f"""\
        [daemon]
        module_dirs = ["{mods}"]
        trusted_module_dirs = ["{trusted}"]
        [sandbox]
        optional = ["memory_max"]
        [modules.echo]
        proxy = "sandboxed"
        [modules.hostile]
        proxy = "sandboxed"
        [modules.hostile.restart]
        heartbeat_interval = "100ms"
        heartbeat_timeout = "1s"
        call_timeout = "1s"
        """)


def proc_figures(pid: int) -> dict[str, float]:
    """The daemon's CPU seconds, open descriptors and RSS (KiB), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {
        "cpu_s": (int(stat[11]) + int(stat[12])) / ticks,
        "fds": sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()),
        "rss_kib": rss,
    }


async def sample(client: Any, echo: Any, seconds: float) -> dict[str, list[float]]:
    """Status and bystander-call latencies (ms), alternating, for ``seconds``."""
    status: list[float] = []
    calls: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            with trio.fail_after(5):
                await client.status()
            status.append((time.perf_counter() - start) * 1e3)
        except (IpadError, trio.TooSlowError):
            failures += 1
        start = time.perf_counter()
        try:
            with trio.fail_after(5):
                await echo.call("echo", {"text": "x"})
            calls.append((time.perf_counter() - start) * 1e3)
        except (IpadError, trio.TooSlowError):
            failures += 1
        await trio.sleep(0.005)
    return {"status": status, "calls": calls, "failures": [float(failures)]}


def p50(values: list[float]) -> float:
    """The median, or NaN for no samples."""
    return percentile(values, 50) if values else math.nan


async def attacker_gone(client: Any, old_pid: int, limit: float) -> float | None:
    """Seconds until the hostile module runs a worker other than ``old_pid``; None if not."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        with trio.move_on_after(2):
            reply = await client.status()
            worker = reply.modules.get("hostile", {})
            if worker.get("state") == "running" and worker.get("worker_pid") not in (None, old_pid):
                return time.monotonic() - start
        await trio.sleep(0.02)
    return None


async def episode(daemon: DaemonProcess, attack: str) -> dict[str, Any]:
    """One attack against a started daemon; its figures."""
    pid = daemon.proc.pid
    async with open_client(daemon.socket, subscribe=False) as client:
        echo = await client.request_proxy("echo")
        hostile = await client.request_proxy("hostile")
        await sample(client, echo, 0.3)  # warm up
        before = proc_figures(pid)
        log_before = daemon.log_path.stat().st_size
        base = await sample(client, echo, BASELINE_S)
        worker_pid = (await client.status()).modules["hostile"]["worker_pid"]
        if not isinstance(worker_pid, int) or worker_pid <= 1:
            raise RuntimeError(f"no worker pid for the hostile module: {worker_pid!r}")
        mid = proc_figures(pid)
        mid_log = daemon.log_path.stat().st_size
        started = time.monotonic()
        started_wall = time.time()
        async with trio.open_nursery() as nursery:

            async def trigger() -> None:
                with contextlib.suppress(IpadError), trio.move_on_after(ATTACK_S + 1):
                    await hostile.call("attack_" + attack, {"seconds": ATTACK_S})

            nursery.start_soon(trigger)
            during = await sample(client, echo, ATTACK_S)
            nursery.cancel_scope.cancel()
        took = time.monotonic() - started
        after_attack = proc_figures(pid)
        log_during = daemon.log_path.stat().st_size - mid_log
        # The attacker goes: by itself (seen hung, or killed for what it sent), else we kill it.
        gone = await attacker_gone(client, worker_pid, 0.5)
        killed = gone is None
        if killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, 9)
            gone = await attacker_gone(client, worker_pid, 10)
        await trio.sleep(SETTLE_S)
        settled = proc_figures(pid)
        reply = await client.status()
    exits = [r for r in daemon.records() if r.get("event") == "worker.exited"
             and r.get("module") == "hostile" and r.get("worker_pid") == worker_pid]  # fmt: skip
    last = exits[-1] if exits else {}
    reason = last.get("cause") or last.get("signal") or last.get("exit_status")
    ended = log_time(last) - started_wall if exits and not killed else None
    return {
        "attack": attack,
        "status_p50_base_ms": p50(base["status"]),
        "status_p50_ms": p50(during["status"]),
        "call_p50_base_ms": p50(base["calls"]),
        "call_p50_ms": p50(during["calls"]),
        "failures": int(during["failures"][0]),
        "cpu_pct_base": 100 * (mid["cpu_s"] - before["cpu_s"]) / BASELINE_S,
        "cpu_pct": 100 * (after_attack["cpu_s"] - mid["cpu_s"]) / took,
        "log_bytes_per_s_base": (mid_log - log_before) / BASELINE_S,
        "log_bytes_per_s": log_during / took,
        "fds_delta": settled["fds"] - before["fds"],
        "rss_delta_kib": settled["rss_kib"] - before["rss_kib"],
        "attacker_gone_s": gone,
        "attacker_ended_after_s": ended,
        "attacker_killed_by_us": killed,
        "attacker_exit": reason,
        "hostile_state_after": reply.modules.get("hostile", {}).get("state"),
        "samples": {"base": base, "during": during},
    }


def run_attack(attack: str, keep: Path | None) -> dict[str, Any]:
    """A fresh daemon for one attack, stopped with SIGTERM afterwards."""
    with tempfile.TemporaryDirectory(prefix="ipad-bench-hostile-") as tmp:
        root = Path(tmp)
        env = {"IPAD_CONFIG_PATH": str(root / "tuning")}
        daemon = DaemonProcess(root, config(root), "info", env)
        try:
            daemon.wait_started()
            figures = trio.run(episode, daemon, attack)
            figures["daemon_alive_after"] = daemon.alive()
        finally:
            daemon.close()
            figures_exit = daemon.proc.returncode
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"hostile-{attack}.log").write_bytes(daemon.log_path.read_bytes())
        figures["daemon_exit_status"] = figures_exit
        return figures


def main(argv: list[str] | None = None) -> int:
    """Every attack in turn; print one table and save the figures."""
    exit_on_sigterm()
    parsed = common_parser(__doc__)
    parsed.add_argument("--attack", action="append", help="only this attack (repeatable)")
    parsed.add_argument("--keep-logs", type=Path, help="keep each daemon's log in this directory")
    args = parsed.parse_args(argv)
    global BASELINE_S, ATTACK_S, SETTLE_S
    if args.quick:
        BASELINE_S, ATTACK_S, SETTLE_S = 0.3, 0.5, 0.2
    chosen = [a for a in ATTACKS if not args.attack or a[0] in args.attack]
    if args.quick and not args.attack:  # every code path, not every attack
        chosen = [a for a in ATTACKS if a[0] in QUICK]
    results = [run_attack(name, args.keep_logs) for name, _ in chosen]
    print(f"hostile modules: {BASELINE_S:g} s baseline, {ATTACK_S:g} s of each attack")
    head = (f"  {'attack':16s} {'status x':>8s} {'call x':>7s} {'cpu %':>6s} {'log KB/s':>9s} "
            f"{'fds +':>5s} {'rss KiB +':>9s} {'fails':>5s}  attacker")  # fmt: skip
    print(head)
    for r in results:
        outcome = "still running, killed by the bench"
        if not r["attacker_killed_by_us"]:
            ended = r["attacker_ended_after_s"]
            outcome = f"ended {ended:.2f} s into the attack ({r['attacker_exit']})"
        print(f"  {r['attack']:16s} {r['status_p50_ms'] / r['status_p50_base_ms']:8.2f} "
              f"{r['call_p50_ms'] / r['call_p50_base_ms']:7.2f} {r['cpu_pct']:6.1f} "
              f"{r['log_bytes_per_s'] / 1e3:9.1f} {r['fds_delta']:5d} {r['rss_delta_kib']:9d} "
              f"{r['failures']:5d}  {outcome}")  # fmt: skip
    rows: list[Row] = []
    for r in results:
        rows.append(row(f"{r['attack']}: status p50", r["status_p50_ms"], "ms",
                        r["status_p50_base_ms"], "no attack"))  # fmt: skip
        rows.append(row(f"{r['attack']}: bystander call p50", r["call_p50_ms"], "ms",
                        r["call_p50_base_ms"], "no attack"))  # fmt: skip
    print_rows("headline", rows)
    clean = all(r["daemon_alive_after"] and r["daemon_exit_status"] == 0 for r in results)
    print(f"daemon alive after every attack and stopped cleanly by SIGTERM: {clean}")
    data = {"quick": args.quick, "baseline_s": BASELINE_S, "attack_s": ATTACK_S,
            "attacks": dict(chosen), "results": results}  # fmt: skip
    write_results(args.results, "hostile", data, rows)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
