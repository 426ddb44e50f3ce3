"""The chaos test's engine: one seeded episode of faults and operations against one live daemon.

An episode starts a real daemon on a configuration drawn from the seed, then
runs a schedule drawn from the same seed (kills, hangs, slow starts, crash
loops, restarts, reloads with configuration changes, abandoned admin commands)
while client actors come and go on their own, and ends with a stop drawn from
a list of awkward moments. Invariants are checked throughout, by a watcher
that reads /proc every 50 ms and by a comparison of ``ipadctl --json status``
with /proc after every step; every breach is recorded with the time, the
schedule as run and the daemon's log, never raised at once, so that one run
reports everything it found. tests/test_e2e_chaos.py says why this is a
seeded schedule and not a hypothesis state machine.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from ipad.client import IpadError, Proxy, open_client
from tests.chaos_blocking import CALLS, MARGIN, PATIENT, REQUEST_BOUND, setup_calls, stats_memfd
from tests.daemon_process import REPO, TEST_MODULES, DaemonProcess, Record

# --- timings: short, so that an episode sees many restarts in a few seconds ------------

HEARTBEAT_INTERVAL = 0.1
HEARTBEAT_TIMEOUT = 0.5
STOP_TIMEOUT = 0.5
START_TIMEOUT = 1.5
COOLDOWN_INTERVAL = 1.0

#: The [restart] defaults every module gets; KNOBS are the ones a reload changes per module.
RESTART: dict[str, str | int | bool] = {
    "heartbeat_interval": "100ms",
    "heartbeat_timeout": "500ms",
    "stop_timeout": "500ms",
    "start_timeout": "1500ms",
    "initial_delay": "10ms",
    "max_delay": "500ms",
    "cooldown_interval": "1s",
    "stable_after": "2s",
    "max_failures": 5,
    "standby": True,
    "served_after": "1s",
    "promote_at_once": True,
}
KNOBS: dict[str, tuple[str | int | bool, ...]] = {
    "max_failures": (4, 5, 6),
    "standby": (True, False),
    "initial_delay": ("5ms", "10ms", "20ms"),
    "stable_after": ("1s", "2s", "3s"),
    # The policy before issue 20 too: every death counted, a standby waiting out the backoff.
    "served_after": ("1s", "1h"),
    "promote_at_once": (True, False),
}

#: Every module an episode may configure; CORE are in every first configuration.
MODULES = ("echo", "awb", "agc", "faulty", "steady", "sluggish")
CORE = ("echo", "faulty", "sluggish")
#: How long the sluggish module takes to load; the last is beyond START_TIMEOUT.
LOADS = (0.0, 0.2, 0.6, 1.0, 3.0)

#: A zombie child of the daemon may exist for this long between its exit and its reaping.
ZOMBIE_GRACE = 1.0
#: The stop must end, exit status 0, within the modules' stop_timeout plus this.
STOP_MARGIN = 2.0
#: After this long the stop is declared hung and the daemon killed, for the report.
STOP_GIVE_UP = 15.0
#: Every ipadctl command must be answered within these (reloads wait for slow starts).
ADMIN_DEADLINE = 15.0
STATUS_DEADLINE = 10.0
#: How long status may keep naming a dead (or zombie) pid: it learns of deaths through pidfds.
STALE_GRACE = 1.5
#: How long a configured module may stay stopped, or the module set be a mix, after a step.
DOWN_GRACE = 4.0
#: How long a SIGSTOPped worker may still be reported running: heartbeat_timeout and change.
HANG_GRACE = HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL + 1.5
#: How long one start may stay "starting": start_timeout, then the kill of a worker too slow.
STUCK_GRACE = START_TIMEOUT + 2 * STOP_TIMEOUT + 2.0
#: How long a child of the daemon may be alive yet named nowhere in status (loading, stopping).
LEAK_GRACE = START_TIMEOUT + 2 * STOP_TIMEOUT + 2.0
#: How long the modules get, after the chaos, to be back running with their standbys.
SETTLE_DEADLINE = COOLDOWN_INTERVAL + 2 * START_TIMEOUT + 6.0
#: How long a long-lived proxy gets to serve again once its module runs after the chaos.
RECOVERY_DEADLINE = 5.0
#: Longest a client may take to connect and say HELLO.
CONNECT_BOUND = 10.0
#: Backstop for a whole trio client session (each operation has its own, shorter bound).
SESSION_BOUND = 120.0

#: How many operator steps an episode has, at least and at most (about 0.5 s each).
STEPS = (10, 20)
#: The operator's actions and how often each is drawn.
WEIGHTS = {
    "kill_worker": 14,
    "kill_standby": 5,
    "hang_worker": 8,
    "hang_standby": 2,
    "kill_forkserver": 2,
    "restart": 9,
    "restart_abandoned": 3,
    "reload": 9,
    "reload_abandoned": 6,
    "sighup": 4,
    "reload_invalid": 2,
    "crash_storm": 4,
    "crashloop": 4,
    "sluggish_load": 4,
    "pause": 5,
}
#: The actions that signal a module's worker or standby: the status field and the signal.
SIGNALS = {
    "kill_worker": ("worker_pid", signal.SIGKILL),
    "kill_standby": ("standby_pid", signal.SIGKILL),
    "hang_worker": ("worker_pid", signal.SIGSTOP),
    "hang_standby": ("standby_pid", signal.SIGSTOP),
}
#: How an episode ends; every one of them must stop the daemon cleanly and in time.
FINALES = (
    "ctl_stop",
    "sigterm",
    "kill_then_term",
    "hang_then_term",
    "reload_then_term",
    "restart_then_term",
    "sighup_then_term",
    "cooldown_then_term",
    "stop_twice",
)


# --- the configuration an episode writes -----------------------------------------------


@attrs.frozen
class Table:
    """One module's table: restart overrides (sorted pairs) and a fallback."""

    policy: tuple[tuple[str, str | int | bool], ...] = ()
    fallback: str | None = None

    def effective(self) -> dict[str, object]:
        """What the daemon compares at a reload: the policy in force, and the fallback."""
        knobs = {knob: RESTART[knob] for knob in KNOBS}
        return {**knobs, **dict(self.policy), "fallback": self.fallback}


Layout = dict[str, Table]


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def render(layout: Layout, *, invalid: bool = False) -> str:
    """The configuration file for ``layout``; ``invalid`` adds an unknown key."""
    lines = ['chaos_unknown_key = "a reload must refuse this file"'] if invalid else []
    lines += ["[daemon]", f'module_dirs = ["{TEST_MODULES}"]', "", "[restart]"]
    lines += [f"{key} = {_toml(value)}" for key, value in RESTART.items()]
    for name in sorted(layout):
        table = layout[name]
        lines += ["", f"[modules.{name}]"]
        if table.fallback is not None:
            lines.append(f'fallback = "{table.fallback}"')
        if table.policy:
            lines.append(f"[modules.{name}.restart]")
            lines += [f"{key} = {_toml(value)}" for key, value in table.policy]
    return "\n".join(lines) + "\n"


def diff(old: Layout, new: Layout) -> dict[str, list[str]]:
    """What a reload from ``old`` to ``new`` must answer it did."""
    both = set(old) & set(new)
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": sorted(m for m in both if old[m].effective() != new[m].effective()),
        "unchanged": sorted(m for m in both if old[m].effective() == new[m].effective()),
    }


def widened(candidates: list[Layout], new: Layout) -> list[Layout]:
    """The configurations that may be in force after a reload of ``new`` that may not have run."""
    known = {describe(layout) for layout in candidates}
    return candidates if describe(new) in known else [*candidates, new]


def describe(layout: Layout) -> str:
    """A layout in one line: modules, with their overrides."""
    parts = []
    for name in sorted(layout):
        table = layout[name]
        extra = [f"{k}={v}" for k, v in table.policy]
        if table.fallback:
            extra.append(f"fallback={table.fallback}")
        parts.append(f"{name}({', '.join(extra)})" if extra else name)
    return " ".join(parts)


def _changed(rng: random.Random, name: str, table: Table, layout: Layout) -> Table:
    """``table`` with one thing changed for real, so the module counts as changed."""
    if name == "faulty" and "steady" in layout and rng.random() < 0.3:
        return attrs.evolve(table, fallback=None if table.fallback else "steady")
    knob = rng.choice(sorted(KNOBS))
    current = table.effective()[knob]
    policy = dict(table.policy)
    policy[knob] = rng.choice([v for v in KNOBS[knob] if v != current])
    return attrs.evolve(table, policy=tuple(sorted(policy.items())))


def mutate(rng: random.Random, layout: Layout) -> Layout:
    """A new layout: one or two of add a module, remove one, change one."""
    new = dict(layout)
    for kind in rng.sample(["add", "remove", "change"], rng.randint(1, 2)):
        absent = [m for m in MODULES if m not in new]
        if kind == "add" and absent:
            new[rng.choice(absent)] = Table()
        elif kind == "remove" and len(new) > 1:
            del new[rng.choice(sorted(new))]
        elif kind == "change":
            name = rng.choice(sorted(new))
            new[name] = _changed(rng, name, new[name], new)
    faulty = new.get("faulty")
    if faulty is not None and faulty.fallback is not None and faulty.fallback not in new:
        new["faulty"] = attrs.evolve(faulty, fallback=None)  # a fallback must be configured
    return new


# --- the schedule -------------------------------------------------------------------------


@attrs.frozen
class Step:
    """One operator action; ``pick`` and ``arg`` resolve it against the daemon's state."""

    delay: float
    action: str
    pick: float
    arg: float
    layout: Layout | None = attrs.field(default=None, eq=False)

    def __str__(self) -> str:
        where = f" -> {describe(self.layout)}" if self.layout is not None else ""
        return f"+{self.delay:.3f}s {self.action} pick={self.pick:.2f} arg={self.arg:.2f}{where}"


@attrs.frozen
class Plan:
    """Everything an episode does, drawn from its seed before it starts."""

    seed: int
    initial: Layout = attrs.field(eq=False)
    load: float
    steps: tuple[Step, ...]
    settle: bool
    finale: Step


def make_plan(seed: int) -> Plan:
    """The schedule of episode ``seed``: the same seed always gives the same plan, its length too."""
    rng = random.Random(seed)  # noqa: S311 - a schedule, not a secret
    steps = rng.randint(*STEPS)
    layout: Layout = {m: Table() for m in CORE}
    for extra in ("awb", "agc", "steady"):
        if rng.random() < 0.5:
            layout[extra] = Table()
    if "steady" in layout and rng.random() < 0.5:
        layout["faulty"] = Table(fallback="steady")
    initial = dict(layout)
    actions, weights = zip(*WEIGHTS.items(), strict=True)
    planned = []
    for _ in range(steps):
        action = rng.choices(actions, weights)[0]
        delay = 0.0 if rng.random() < 0.2 else rng.expovariate(1 / 0.15)
        new = None
        if action in ("reload", "reload_abandoned", "sighup"):
            new = layout = mutate(rng, layout)
        planned.append(Step(round(delay, 3), action, rng.random(), rng.random(), new))
    finale_action = rng.choice(FINALES)
    finale_layout = mutate(rng, layout) if finale_action == "reload_then_term" else None
    finale = Step(0.0, finale_action, rng.random(), rng.random(), finale_layout)
    load = rng.choice(LOADS[:3])
    return Plan(seed, initial, load, tuple(planned), rng.random() < 0.5, finale)


# --- /proc ---------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid``, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def children(pid: int) -> set[int]:
    """The children of ``pid`` (of each of its threads)."""
    found: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found |= {int(x) for x in (task / "children").read_text().split()}
    return found


def comm(pid: int) -> str:
    """``pid``'s command name and state, for messages."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    stat = proc_stat(pid)
    return f"{name}, state {stat[0] if stat else '?'}"


def started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(text.rsplit(")", 1)[1].split()[19])


def ticks_now() -> int:
    """Now, in clock ticks since boot, as ``started`` counts."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def ours(pid: int, before: int) -> bool:
    """Whether ``pid`` is alive, an ipad process, and started by tick ``before``.

    pid_max is 32768 here and other test runs start ipad processes too: a pid
    from the log may be someone else's by now, but not one started earlier.
    """
    stat = proc_stat(pid)
    begun = started(pid)
    if stat is None or stat[0] == "Z" or begun is None or begun > before:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        name = Path(f"/proc/{pid}/comm").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return name.startswith("ipad") or b"ipad" in cmdline


def wall() -> str:
    """Now, in the daemon's log timestamp format, to line records and steps up."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- results ------------------------------------------------------------------------------


@attrs.frozen
class Violation:
    """One breach of an invariant: when, which kind, what exactly."""

    at: float
    wall: str
    kind: str
    message: str


@attrs.define
class Outcome:
    """How an ipadctl command ended: its exit status and its JSON answer or error."""

    rc: int
    result: Any = None
    error: dict[str, Any] | None = None

    @property
    def code(self) -> str | None:
        """The error code, if it was refused."""
        return None if self.error is None else str(self.error.get("code"))


@attrs.define
class Episode:
    """One daemon's life under chaos; ``violations`` is what it found."""

    plan: Plan
    directory: Path
    t0: float = attrs.field(factory=time.monotonic)
    violations: list[Violation] = attrs.Factory(list)
    as_run: list[str] = attrs.Factory(list)
    counts: collections.Counter[str] = attrs.Factory(collections.Counter)
    stop_seconds: float | None = None
    daemon: DaemonProcess | None = None
    layout: Layout = attrs.Factory(dict)
    #: The configurations that may be in force: one, or two after an abandoned reload.
    candidates: list[Layout] = attrs.Factory(list)
    removed_ever: set[str] = attrs.Factory(set)
    crashloop: bool = False
    load: float = 0.0
    stop_asked: bool = False
    exited: bool = False
    exit_ticks: int = 0
    stop_at: float = 0.0
    zombie_since: dict[int, float] = attrs.Factory(dict)
    unlisted_since: dict[int, float] = attrs.Factory(dict)
    problem_since: dict[tuple[str, ...], float] = attrs.Factory(dict)
    reported: set[tuple[str, ...]] = attrs.Factory(set)
    stopped_pids: set[int] = attrs.Factory(set)
    last_status: dict[str, Any] | None = None
    camera: dict[str, tuple[Proxy, int | None]] = attrs.Factory(dict)
    stats_fd: int = -1

    # --- bookkeeping ---------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the episode began."""
        return time.monotonic() - self.t0

    def note(self, text: str) -> None:
        """One line of the schedule as run."""
        self.as_run.append(f"[{self.now():7.3f}s {wall()[11:]}] {text}")

    def violate(self, kind: str, message: str, key: tuple[str, ...] | None = None) -> None:
        """Record a breach (once per ``key``, if given)."""
        if key is not None:
            if key in self.reported:
                return
            self.reported.add(key)
        self.violations.append(Violation(self.now(), wall(), kind, message))
        self.note(f"VIOLATION {kind}: {message}")

    @property
    def died(self) -> bool:
        """Whether the daemon exited unasked (what follows from that is not reported again)."""
        return ("exit",) in self.reported

    @property
    def hung(self) -> bool:
        """Whether a request went unanswered: the rest of the schedule would wait 15 s a step."""
        return any(v.kind == "unanswered" for v in self.violations)

    @property
    def socket(self) -> Path:
        """The daemon's socket."""
        return self.directory / "run" / "ipad.sock"

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        assert self.daemon is not None
        return self.daemon.proc.pid

    def env(self) -> dict[str, str]:
        """The daemon's and every client's environment: this episode's socket and tuning."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
        env["IPAD_SOCKET"] = str(self.socket)
        env["IPAD_CONFIG_PATH"] = str(TEST_MODULES / "tuning")
        env["IPAD_FAULTY_TUNING_FILE"] = str(self.directory / "faulty.toml")
        env["IPAD_SLUGGISH_TUNING_FILE"] = str(self.directory / "sluggish.toml")
        return env

    def write_layout(self, layout: Layout, *, invalid: bool = False) -> None:
        """Replace the configuration file (atomically: the daemon may read it any time)."""
        temporary = self.directory / "config.toml.new"
        temporary.write_text(render(layout, invalid=invalid))
        temporary.replace(self.directory / "config.toml")
        if not invalid:
            self.removed_ever |= set(self.layout) - set(layout)
            self.layout = layout

    def write_tuning(self) -> None:
        """The faulty module's crash flag and the sluggish module's load time."""
        flag = self.directory / "crash"
        (self.directory / "faulty.toml").write_text(f'crash_if_exists = "{flag}"\n')
        if self.crashloop:
            flag.write_text("")
        else:
            flag.unlink(missing_ok=True)
        (self.directory / "sluggish.toml").write_text(f"load_seconds = {self.load}\n")

    # --- the episode ------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the daemon, run the plan with actors and checks, stop, check what is left."""
        (self.directory / "run").mkdir(parents=True)
        self.load = self.plan.load
        self.write_tuning()
        self.write_layout(self.plan.initial)
        self.candidates = [self.plan.initial]
        self.stats_fd = stats_memfd()
        self.note(f"seed {self.plan.seed}: start with {describe(self.layout)}, "
                  f"sluggish load {self.load}s")  # fmt: skip
        self.daemon = DaemonProcess(self.directory / "config.toml", self.env())
        try:
            await trio.to_thread.run_sync(self.daemon.wait_for, "daemon.started")
        except AssertionError as exc:
            self.violate("start", f"the daemon did not start: {exc}")
            return
        self.note(f"daemon {self.pid} started")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.watch)
            async with trio.open_nursery() as actors:
                rng = random.Random(self.plan.seed ^ 0x5EED)  # noqa: S311 - not a secret
                actors.start_soon(self.camera_app, random.Random(rng.random()))  # noqa: S311
                actors.start_soon(self.trio_actor, random.Random(rng.random()))  # noqa: S311
                actors.start_soon(self.blocking_actor, random.Random(rng.random()))  # noqa: S311
                await self.operate()
                await self.finale(nursery)
                # The clients see the daemon go; give them a moment to notice, then end them.
                with trio.move_on_after(2.0):
                    while self.actors_busy(actors):
                        await trio.sleep(0.05)
                actors.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
        self.after_stop()

    @staticmethod
    def actors_busy(actors: trio.Nursery) -> bool:
        """Whether any actor task is still running."""
        return bool(actors.child_tasks)

    def teardown(self) -> None:
        """Kill and reap whatever is left (the daemon, its workers, its cgroups); keep the log."""
        if self.stats_fd >= 0:
            os.close(self.stats_fd)
            self.stats_fd = -1
        if self.daemon is not None:
            self.daemon.kill()
            (self.directory / "daemon.log").write_text("".join(self.daemon.raw))

    # --- watching /proc ---------------------------------------------------------------------

    async def watch(self) -> None:
        """Every 50 ms: the daemon is alive unless asked to stop; no child stays a zombie."""
        while True:
            self.look()
            await trio.sleep(0.05)

    def look(self) -> None:
        """One look at the daemon and its children."""
        assert self.daemon is not None
        if self.daemon.proc.poll() is not None:
            if not self.stop_asked:
                self.violate("exit", f"the daemon exited unasked, status {self.daemon.proc.returncode}; "
                             f"last lines:\n{self.tail()}", key=("exit",))  # fmt: skip
            return
        now = time.monotonic()
        kids = children(self.pid)
        for pid in kids:
            stat = proc_stat(pid)
            if stat is not None and stat[0] == "Z":
                since = self.zombie_since.setdefault(pid, now)
                if now - since > ZOMBIE_GRACE:
                    self.violate("zombie", f"child {pid} of the daemon has been a zombie for "
                                 f"{now - since:.1f}s", key=("zombie", str(pid)))  # fmt: skip
            else:
                self.zombie_since.pop(pid, None)
        for pid in set(self.zombie_since) - kids:
            del self.zombie_since[pid]

    def tail(self, lines: int = 15) -> str:
        """The daemon's last log lines."""
        assert self.daemon is not None
        return "".join(self.daemon.raw[-lines:])

    # --- ipadctl --------------------------------------------------------------------------

    def ctl_argv(self, *args: str) -> list[str]:
        """The ipadctl command line."""
        return [sys.executable, "-m", "ipad.cli.ctl", "--json", *args]

    async def ctl(self, *args: str, deadline: float = ADMIN_DEADLINE) -> Outcome | None:
        """Run ipadctl; its outcome, or None (recorded) if it was not answered in time."""
        what = "ipadctl " + " ".join(args)
        with trio.move_on_after(deadline) as scope:
            done = await trio.run_process(self.ctl_argv(*args), capture_stdout=True,
                                          capture_stderr=True, check=False, env=self.env(),
                                          cwd=REPO)  # fmt: skip
        if scope.cancelled_caught:
            self.violate("unanswered", f"{what}: no answer within {deadline:g}s")
            return None
        self.counts[f"ipadctl {args[0]}"] += 1
        try:
            answer = json.loads(done.stdout) if done.stdout.strip() else None
        except json.JSONDecodeError:
            answer = None
        # An answer, though not a success: `status` exits 3 when a module is not running
        # and `restart` 1 when the module did not start again (systemctl's statuses).
        answered = {"status": (0, 3), "restart": (0, 1)}.get(args[0], (0,))
        if done.returncode in answered and isinstance(answer, dict) and "error" not in answer:
            return Outcome(0, result=answer)
        if done.returncode == 0 and answer is not None:
            return Outcome(0, result=answer)
        # Refused: 1, or 4 for a module the daemon does not know (systemctl's "no such unit").
        if done.returncode in (1, 4) and isinstance(answer, dict) and "error" in answer:
            outcome = Outcome(1, error=answer["error"])
            self.counts[f"ipadctl {args[0]} refused: {outcome.code}"] += 1
            if outcome.code == "internal":
                self.violate("internal", f"{what}: internal error: {answer['error']['message']}")
            elif outcome.code in ("unreachable", "disconnected") and not (
                self.stop_asked or self.died
            ):
                self.violate("refused", f"{what}: {answer['error']['message']} (the daemon "
                             "was not asked to stop)")  # fmt: skip
            return outcome
        self.violate("ipadctl", f"{what}: exit status {done.returncode}, stdout "
                     f"{done.stdout[:300]!r}, stderr {done.stderr[-500:]!r}")  # fmt: skip
        return Outcome(done.returncode)

    async def ctl_abandoned(self, after: float, signum: int, *args: str) -> None:
        """Start ipadctl and end it with ``signum`` after ``after`` seconds: a client that leaves."""
        process = await trio.lowlevel.open_process(
            self.ctl_argv(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self.env(), cwd=REPO,
        )  # fmt: skip
        try:
            with trio.move_on_after(after):
                await process.wait()
            finished = process.returncode is not None
            if not finished:
                process.send_signal(signum)
            with trio.fail_after(ADMIN_DEADLINE):
                await process.wait()
            how = f"exited by itself, status {process.returncode}" if finished else (
                f"{signal.Signals(signum).name} after {after * 1000:.0f} ms")  # fmt: skip
            self.note(f"  ipadctl {' '.join(args)}: {how}")
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    async def status(self) -> dict[str, Any] | None:
        """``ipadctl --json status``, or None (recorded) if it failed."""
        outcome = await self.ctl("status", deadline=STATUS_DEADLINE)
        if outcome is None or outcome.rc != 0:
            if outcome is not None and not self.stop_asked and not self.died:
                self.violate("status", f"ipadctl status failed: {outcome.error}")
            return None
        status: dict[str, Any] = outcome.result
        self.last_status = status
        return status

    # --- status against /proc -----------------------------------------------------------------

    async def check(self) -> None:
        """Status agrees with /proc, and the configuration in force is one that was asked for.

        A disagreement may be the truth changing between the reply and the look
        at /proc: it is a breach only once it has lasted its grace. Short ones
        (a pid just dead) are waited for, status asked again every 250 ms;
        longer ones (a module still starting) are followed from step to step.
        """
        while not self.stop_asked:
            status = await self.status()
            if status is None:
                return
            now = time.monotonic()
            problems = self.disagreements(status)
            self.track_unlisted(status, now)
            for key in set(self.problem_since) - set(problems):
                del self.problem_since[key]
            pending = False
            for key, (grace, message) in problems.items():
                since = self.problem_since.setdefault(key, now)
                if now - since >= grace:
                    self.violate("status", f"{message} (for {now - since:.1f}s)", key=key)
                elif key not in self.reported and grace <= STALE_GRACE:
                    pending = True  # longer graces are followed across steps, not waited for
            if not pending:
                return
            await trio.sleep(0.25)

    def disagreements(self, status: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[float, str]]:
        """Each way ``status`` disagrees with /proc now: key -> (grace, message)."""
        found: dict[tuple[str, ...], tuple[float, str]] = {}

        def check_pid(role: str, module: str, pid: int) -> None:
            stat = proc_stat(pid)
            if stat is None:
                why = "it does not exist"
            elif stat[0] == "Z":
                why = "it is a zombie"
            elif stat[1] != self.pid:
                why = f"it is not a child of the daemon (parent {stat[1]})"
            else:
                return
            found[(role, module, str(pid))] = (
                STALE_GRACE, f"status gives {module} {role} pid {pid}, but {why}")  # fmt: skip

        daemon = status["daemon"]
        if daemon["pid"] != self.pid:
            found[("daemon",)] = (0.0, f"status gives daemon pid {daemon['pid']}, not {self.pid}")
        if daemon.get("forkserver_pid") is not None:
            check_pid("fork server", "daemon", daemon["forkserver_pid"])
        for name, module in status["modules"].items():
            pid = module["worker_pid"]
            if module["state"] == "running":
                if pid is None:
                    found[("nopid", name)] = (STALE_GRACE, f"{name} is running with no worker_pid")
                else:
                    check_pid("worker", name, pid)
                    stat = proc_stat(pid)
                    if pid in self.stopped_pids and stat is not None and stat[0] == "T":
                        found[("hung", name, str(pid))] = (HANG_GRACE, (
                            f"{name} worker {pid} is stopped (SIGSTOP) yet status says it is "
                            "running: its hang went unnoticed"))  # fmt: skip
            if module["state"] == "starting":  # the same start (``starts``) for too long
                found[("starting", name, str(module["starts"]))] = (STUCK_GRACE, (
                    f"{name} has been starting (start {module['starts']}) for longer than "
                    f"start_timeout {START_TIMEOUT:g}s"))  # fmt: skip
            if module["standby_pid"] is not None:
                check_pid("standby", name, module["standby_pid"])
            if module["state"] in ("stopped", "stopping"):
                found[("down", name)] = (DOWN_GRACE, (
                    f"{name} is {module['state']} ({module['reason']}), though configured and "
                    "the daemon not stopping"))  # fmt: skip
        listed = set(status["modules"])
        if all(listed != set(layout) for layout in self.candidates):
            wanted = " or ".join(f"[{' '.join(sorted(layout))}]" for layout in self.candidates)
            found[("modules",)] = (DOWN_GRACE, (
                f"status lists modules [{' '.join(sorted(listed))}]; the configuration in "
                f"force is {wanted}"))  # fmt: skip
        return found

    def track_unlisted(self, status: Mapping[str, Any], now: float) -> None:
        """A live child of the daemon that status names nowhere for long is leaked."""
        listed = {status["daemon"].get("forkserver_pid")}
        for module in status["modules"].values():
            listed |= {module["worker_pid"], module["standby_pid"]}
        kids = children(self.pid)
        for pid in kids:
            stat = proc_stat(pid)
            if stat is None or stat[0] == "Z" or pid in listed:
                self.unlisted_since.pop(pid, None)
                continue
            since = self.unlisted_since.setdefault(pid, now)
            if now - since > LEAK_GRACE:
                self.violate("leak", f"child {pid} ({comm(pid)}) of the daemon is alive and "
                             f"named nowhere in status for {now - since:.1f}s",
                             key=("leak", str(pid)))  # fmt: skip
        for pid in set(self.unlisted_since) - kids:
            del self.unlisted_since[pid]

    # --- the operator ------------------------------------------------------------------------

    async def operate(self) -> None:
        """Run the plan's steps, checking status against /proc after each; then maybe settle."""
        for step in self.plan.steps:
            if self.stop_asked or self.died or self.hung:
                return
            await trio.sleep(step.delay)
            self.note(str(step))
            await self.perform(step)
            await self.check()
        if self.plan.settle and not self.died and not self.hung:
            await self.settle()

    def pick_pid(self, step: Step, field: str) -> tuple[str, int] | None:
        """A module's ``field`` pid (worker_pid, standby_pid) from the last status, by ``pick``."""
        status = self.last_status
        if status is None:
            return None
        found = sorted((name, m[field]) for name, m in status["modules"].items()
                       if m[field] is not None)  # fmt: skip
        return found[int(step.pick * len(found))] if found else None

    def signal_child(self, pid: int, signum: int) -> bool:
        """Signal ``pid`` if it is still a child of the daemon (through a pidfd: no reuse race)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            stat = proc_stat(pid)
            if stat is None or stat[1] != self.pid:
                return False
            signal.pidfd_send_signal(fd, signum)
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)
        if signum == signal.SIGSTOP:
            self.stopped_pids.add(pid)
        return True

    async def signal_module(self, step: Step, field: str, signum: int) -> None:
        """Signal a module's worker or standby, chosen by ``step.pick``."""
        status = await self.status()
        if status is None:
            return
        target = self.pick_pid(step, field)
        if target is None:
            self.note(f"  no {field} to signal")
            return
        name, pid = target
        sent = self.signal_child(pid, signum)
        self.note(f"  {signal.Signals(signum).name} {name} {field} {pid}: "
                  f"{'sent' if sent else 'no longer a child'}")  # fmt: skip

    def module_pick(self, step: Step) -> str:
        """A configured module chosen by ``step.pick`` (now and then one that does not exist)."""
        if step.arg < 0.05:
            return "nosuch"
        names = sorted(self.layout)
        return names[int(step.pick * len(names))]

    async def perform(self, step: Step) -> None:
        """Carry out one step."""
        action = step.action
        if action in SIGNALS:
            await self.signal_module(step, *SIGNALS[action])
        elif action == "kill_forkserver":
            status = await self.status()
            pid = status["daemon"].get("forkserver_pid") if status else None
            sent = pid is not None and self.signal_child(pid, signal.SIGKILL)
            self.note(f"  SIGKILL fork server {pid}: {'sent' if sent else 'none'}")
        elif action == "crash_storm":
            module = sorted(self.layout)[int(step.pick * len(self.layout))]
            await self.crash_storm(module, patient=step.arg >= 0.5)
        elif action == "restart":
            await self.restart(self.module_pick(step))
        elif action == "restart_abandoned":
            module = self.module_pick(step)
            signum = signal.SIGINT if step.arg < 0.5 else signal.SIGKILL
            # ipadctl takes about 0.1 s to start: leave before, during or after its request.
            await self.ctl_abandoned(0.05 + step.arg * 0.3, signum, "restart", module)
        elif action in ("reload", "reload_abandoned", "sighup"):
            assert step.layout is not None
            await self.reload(step, step.layout)
        elif action == "reload_invalid":
            await self.reload_invalid()
        elif action == "crashloop":
            self.crashloop = step.arg >= 0.5
            self.write_tuning()
            self.note(f"  faulty crashes as it loads: {self.crashloop}")
        elif action == "sluggish_load":
            self.load = LOADS[int(step.arg * len(LOADS))]
            self.write_tuning()
            self.note(f"  sluggish loads in {self.load}s")
        elif action == "pause":
            await trio.sleep(0.3 + step.arg)

    async def crash_storm(self, module: str, *, patient: bool) -> None:
        """A module crashing at run time, over and over: SIGKILL each new worker as it is ready.

        More than max_failures crashes within the failure window put it in cooldown.
        A ``patient`` storm waits (up to a second) for each new standby to be ready
        before the kill, so the module waits out its backoff, and then its cooldown,
        with a standby loaded: SIGTERM there hung (issue 16's first bullet).
        """
        assert self.daemon is not None
        status = await self.status() if patient else None
        first_ready = bool(status and (status["modules"].get(module) or {}).get("standby_pid"))
        start = len(self.daemon.records)
        killed: list[int] = []
        deadline = time.monotonic() + (8.0 if patient else 4.0)
        standby_since = time.monotonic()
        while len(killed) < 7 and time.monotonic() < deadline:
            mine = [r for r in self.daemon.records[start:] if r.get("module") == module]
            ready = [r["worker_pid"] for r in self.daemon.events("worker.ready")
                     if r.get("module") == module]  # fmt: skip
            pid = ready[-1] if ready else None
            events = [r.get("event") for r in mine]
            standby = "worker.standby_ready" in events[_last_index(events, "worker.ready") + 1 :]
            standby = standby or (first_ready and not killed)
            waited = time.monotonic() - standby_since > 1.0
            if (
                pid is not None
                and pid not in killed
                and (not patient or standby or waited)
                and self.signal_child(pid, signal.SIGKILL)
            ):
                killed.append(pid)
                standby_since = time.monotonic()
            cooled = any(r.get("event") == "module.cooldown" and r.get("module") == module
                         for r in self.daemon.records[start:])  # fmt: skip
            if cooled:
                break
            await trio.sleep(0.01)
        self.note(f"  SIGKILLed {module} workers {killed}")

    async def restart(self, module: str) -> None:
        """``ipadctl restart MODULE``: answered with the module's state, or refused for a reason."""
        outcome = await self.ctl("restart", module)
        if outcome is None:
            return
        self.note(f"  -> {outcome.result if outcome.rc == 0 else outcome.error}")
        configured = all(module in layout for layout in self.candidates)
        if outcome.code == "unknown_module" and configured:
            self.violate(
                "restart", f"ipadctl restart {module}: refused as unknown, though configured"
            )
        if outcome.rc == 0 and module == "nosuch":
            self.violate("restart", "ipadctl restart nosuch: answered, though no such module")

    async def reload(self, step: Step, new: Layout) -> None:
        """Write ``new`` and reload it: by ipadctl, by an ipadctl that leaves, or by SIGHUP."""
        assert self.daemon is not None
        old_candidates = self.candidates
        self.write_layout(new)
        if step.action == "reload_abandoned":
            signum = signal.SIGINT if step.pick < 0.5 else signal.SIGKILL
            await self.ctl_abandoned(0.05 + step.arg * 0.3, signum, "reload")
            self.candidates = widened(old_candidates, new)
            return
        if step.action == "sighup":
            await self.sighup(old_candidates, new)
            return
        outcome = await self.ctl("reload")
        if outcome is None or outcome.rc != 0:
            self.note(f"  -> {outcome.error if outcome else 'no answer'}")
            self.candidates = widened(old_candidates, new)
            if outcome is not None and outcome.code == "invalid_config":
                self.violate("reload", f"a valid configuration was refused: {outcome.error}")
            return
        self.note(f"  -> {outcome.result}")
        self.check_reload(old_candidates, new, outcome.result, "ipadctl reload")
        self.candidates = [new]

    def check_reload(
        self, old_candidates: list[Layout], new: Layout, result: Mapping[str, Any], how: str
    ) -> None:
        """The reload says it did what the configuration change asks (when that is known)."""
        if len(old_candidates) != 1:
            return  # an abandoned reload may or may not have been applied before
        expected = diff(old_candidates[0], new)
        got = {key: sorted(result.get(key, [])) for key in expected}
        if got != expected:
            self.violate("reload", f"{how} answered {got}; the change was {expected}")

    async def sighup(self, old_candidates: list[Layout], new: Layout) -> None:
        """SIGHUP: a reload whose answer is the log's ``daemon.reloaded`` (or ``reload_failed``)."""
        assert self.daemon is not None
        before = len(self.daemon.events("daemon.reloaded"))
        failed = len(self.daemon.events("daemon.reload_failed"))
        self.daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + ADMIN_DEADLINE
        self.candidates = widened(old_candidates, new)
        while time.monotonic() < deadline:
            done = self.daemon.events("daemon.reloaded")
            if len(done) > before:
                self.note(f"  -> daemon.reloaded {done[-1].get('changed')}")
                self.check_reload(old_candidates, new, done[-1], "SIGHUP")
                self.candidates = [new]
                return
            if len(self.daemon.events("daemon.reload_failed")) > failed:
                self.violate("reload", "SIGHUP: a valid configuration failed to load")
                return
            if self.daemon.proc.poll() is not None:
                return
            await trio.sleep(0.02)
        self.violate("unanswered", f"SIGHUP: no daemon.reloaded within {ADMIN_DEADLINE:g}s")

    async def reload_invalid(self) -> None:
        """A broken file: the reload is refused with its problems; the old configuration runs."""
        current = self.layout
        self.write_layout(current, invalid=True)
        try:
            outcome = await self.ctl("reload")
        finally:
            self.write_layout(current)
        if outcome is None:
            return
        self.note(f"  -> {outcome.code}")
        if outcome.code != "invalid_config":
            self.violate("reload", f"an invalid configuration was answered {outcome.result} "
                         f"{outcome.error}")  # fmt: skip

    # --- settling and health ---------------------------------------------------------------

    def healthy(self) -> list[str]:
        """Configured modules that can run: not crash-looping, not slower than start_timeout."""
        sick = {"faulty"} if self.crashloop else set()
        if self.load >= START_TIMEOUT:
            sick.add("sluggish")
        return sorted(set(self.layout) - sick)

    async def settle(self) -> None:
        """After the chaos: every healthy module runs again, and clients old and new use it."""
        self.note("settle")
        # The chaos stops: a worker or standby left SIGSTOPped would be killed as hung (or,
        # promoted, hang) in the middle of the checks below, failing their calls for good reason.
        resumed = [
            pid for pid in sorted(self.stopped_pids) if self.signal_child(pid, signal.SIGCONT)
        ]
        self.stopped_pids.clear()
        if resumed:
            self.note(f"  SIGCONT {resumed}")
        if len(self.candidates) > 1:  # an abandoned reload: make the file's layout the one in force
            outcome = await self.ctl("reload")
            self.note(f"  reload -> {outcome and (outcome.result or outcome.error)}")
            if outcome is not None and outcome.rc == 0:
                self.candidates = [self.layout]
        await self.check()
        healthy = self.healthy()
        if not await self.wait_running(healthy):
            return
        self.note(f"  settled: {' '.join(healthy)} running")
        for name, (proxy, value) in sorted(self.camera.items()):
            if name in healthy and name not in self.removed_ever:
                await self.recovered(name, proxy, value)
        for name in healthy:
            await self.trio_session(random.Random(name), name, strict=True)  # noqa: S311
            await self.blocking_session(
                {"socket": str(self.socket), "module": name, "seed": 1, "calls": 2, "strict": True},
                None,
            )

    async def recovered(self, name: str, proxy: Proxy, value: int | None) -> None:
        """A proxy held since the episode began serves its module again within RECOVERY_DEADLINE.

        A call that was in flight when a worker died fails, as documented: only
        no success at all by the deadline is a breach.
        """
        deadline = time.monotonic() + RECOVERY_DEADLINE
        method, args, stats = CALLS[name][0]
        while True:
            wait = max(deadline - time.monotonic(), 0.1)
            ok, result = await self.trio_call(proxy, method, args, stats, wait, value)
            if ok:
                return
            if time.monotonic() >= deadline:
                self.violate("recovery", f"the camera's {name} proxy (held since the episode "
                             f"began) did not recover within {RECOVERY_DEADLINE:g}s, its module "
                             f"running: {result!r}")  # fmt: skip
                return
            await trio.sleep(0.05)

    async def wait_running(self, healthy: list[str]) -> bool:
        """Whether every module of ``healthy`` runs, with its standby, by SETTLE_DEADLINE."""
        deadline = time.monotonic() + SETTLE_DEADLINE
        waiting: dict[str, str] = {}
        while time.monotonic() < deadline:
            status = await self.status()
            if status is None:
                return False
            waiting = {}
            for name in healthy:
                module = status["modules"].get(name)
                standby = self.layout[name].effective()["standby"]
                if module is None:
                    waiting[name] = "not in status"
                elif module["state"] != "running" or (standby and module["standby_pid"] is None):
                    waiting[name] = (f"{module['state']} ({module['reason']}), "
                                     f"standby {module['standby_pid']}")  # fmt: skip
            if not waiting:
                return True
            await trio.sleep(0.2)
        self.violate("settle", f"{SETTLE_DEADLINE:g}s after the chaos these modules are not "
                     f"running with a standby: {waiting}")  # fmt: skip
        return False

    # --- the finale -----------------------------------------------------------------------

    def term(self, why: str) -> None:
        """SIGTERM the daemon; the stop clock starts at the first request."""
        assert self.daemon is not None
        self.ask_stop()
        self.daemon.proc.send_signal(signal.SIGTERM)
        self.note(f"SIGTERM ({why})")

    def ask_stop(self) -> None:
        """From now on the daemon may exit."""
        if not self.stop_asked:
            self.stop_asked = True
            self.stop_at = time.monotonic()

    async def finale(self, nursery: trio.Nursery) -> None:
        """Stop the daemon as the plan says, and hold the stop to its bound."""
        assert self.daemon is not None
        step = self.plan.finale
        self.note(f"finale {step}")
        if self.died:
            self.ask_stop()
        elif step.action == "ctl_stop":
            self.ask_stop()
            outcome = await self.ctl("stop")
            if outcome is not None and (outcome.rc != 0 or outcome.result != {"stopping": True}):
                self.violate("stop", f"ipadctl stop answered {outcome.result} {outcome.error}")
        elif step.action == "stop_twice":
            self.ask_stop()
            await self.ctl("stop")
            self.term("again, after ipadctl stop")
        elif step.action in ("kill_then_term", "hang_then_term"):
            await self.status()
            signum = signal.SIGKILL if step.action == "kill_then_term" else signal.SIGSTOP
            target = self.pick_pid(step, "worker_pid")
            if target is not None:
                self.signal_child(target[1], signum)
                self.note(f"{signal.Signals(signum).name} {target[0]} worker {target[1]}")
            await trio.sleep(step.arg * (0.005 if signum == signal.SIGKILL else 0.6))
            self.term(step.action)
        elif step.action in ("reload_then_term", "restart_then_term"):
            if step.layout is not None:
                self.write_layout(step.layout)
            args = ("reload",) if step.layout is not None else ("restart", self.module_pick(step))
            nursery.start_soon(self.final_request, args)
            await trio.sleep(0.15 + step.arg * 0.1)  # ipadctl takes about that long to start
            self.term(f"while ipadctl {' '.join(args)} runs")
        elif step.action == "cooldown_then_term":
            # A module crash-looping at run time, in cooldown with its standby loaded.
            module = sorted(self.layout)[int(step.pick * len(self.layout))]
            await self.crash_storm(module, patient=True)
            await trio.sleep(step.arg * 0.3)
            self.term(f"{module} in cooldown, or nearly")
        elif step.action == "sighup_then_term":
            self.daemon.proc.send_signal(signal.SIGHUP)
            self.note("SIGHUP")
            await trio.sleep(step.arg * 0.05)
            self.term("just after SIGHUP")
        else:
            self.term("plain")
        await self.wait_exit()

    async def final_request(self, args: tuple[str, ...]) -> None:
        """An admin request racing the stop: answered, or refused for a reason, in time."""
        outcome = await self.ctl(*args)
        self.note(f"  ipadctl {' '.join(args)} during the stop -> "
                  f"{outcome.result if outcome and outcome.rc == 0 else outcome and outcome.error}")  # fmt: skip

    async def wait_exit(self) -> None:
        """Exit status 0 within stop_timeout plus a margin; say what was left if not at all."""
        assert self.daemon is not None
        bound = STOP_TIMEOUT + STOP_MARGIN
        while self.daemon.proc.poll() is None:
            if time.monotonic() - self.stop_at > STOP_GIVE_UP:
                kids = sorted(children(self.pid))
                self.violate("stop", f"the daemon is still running {STOP_GIVE_UP:g}s after it was "
                             f"asked to stop (bound {bound:g}s); its children: "
                             f"{[(pid, comm(pid)) for pid in kids]}")  # fmt: skip
                self.daemon.proc.kill()
                self.daemon.proc.wait()
                return
            await trio.sleep(0.005)
        self.exited = True
        self.exit_ticks = ticks_now()
        self.stop_seconds = time.monotonic() - self.stop_at
        status = self.daemon.proc.returncode
        self.note(f"daemon exited with status {status} after {self.stop_seconds:.3f}s")
        if status < 0:
            stopped = any(r.get("event") == "daemon.stopped" for r in self.daemon.records)
            self.violate("stop", f"killed by {signal.Signals(-status).name} "
                         f"({'after' if stopped else 'before'} it logged daemon.stopped)")  # fmt: skip
        elif status != 0 and not self.died:
            self.violate("stop", f"exit status {status}; last lines:\n{self.tail()}")
        if self.stop_seconds > bound:
            self.violate("stop", f"the stop took {self.stop_seconds:.2f}s (bound {bound:g}s)")

    def after_stop(self) -> None:
        """No process of the daemon's left, no cgroup left, nothing odd in the log."""
        assert self.daemon is not None
        if not self.exited:
            return
        records = self.daemon.records
        pids = {r["worker_pid"] for r in records if r.get("event") in ("worker.spawned",
                                                                        "worker.forked")}  # fmt: skip
        pids |= {r["pid"] for r in records if r.get("event") == "forkserver.started"}
        left = sorted(pid for pid in pids if ours(pid, self.exit_ticks))
        if left:
            self.violate(
                "leftover", f"processes left after the stop: {[(p, comm(p)) for p in left]}"
            )
        for record in records:
            if record.get("event") == "cgroup.ready" and Path(record["cgroup"]).exists():
                inside = sorted(p.name for p in Path(record["cgroup"]).iterdir() if p.is_dir())
                self.violate("leftover", f"cgroup {record['cgroup']} left after the stop "
                             f"(holding {inside})")  # fmt: skip
        if not self.died and not any(r.get("event") == "daemon.stopped" for r in records):
            self.violate("stop", "no daemon.stopped in the log")
        for record in records:
            if record.get("event") in ("request.internal_error", "client.session_failed"):
                self.violate("log", f"{record['event']}: {_short(record)}",
                             key=("log", record["event"]))  # fmt: skip
        tracebacks = [line for line in self.daemon.raw if line.startswith("Traceback")]
        if tracebacks:
            self.violate("log", f"{len(tracebacks)} traceback(s) on the daemon's stderr; see "
                         f"{self.directory / 'daemon.log'}")  # fmt: skip

    # --- clients -------------------------------------------------------------------------------

    def refused(self, who: str, what: str, code: str | None, message: str) -> None:
        """A request refused: fine if for a reason; an internal error is a bug."""
        self.counts[f"{who} refused: {code}"] += 1
        if code == "internal":
            self.violate("internal", f"{who} client: {what}: internal error: {message}")

    async def op(
        self, who: str, what: str, bound: float, run: Callable[[], Awaitable[Any]]
    ) -> tuple[bool, Any]:
        """One client request, held to ``bound``: (True, value) or (False, what went wrong)."""
        self.counts[f"{who} requests"] += 1
        try:
            with trio.fail_after(bound):
                return True, await run()
        except trio.TooSlowError:
            self.violate("unanswered", f"{who} client: {what}: no answer within {bound:g}s")
            return False, None
        except IpadError as exc:
            self.refused(who, what, exc.code, str(exc))
            return False, exc
        except Exception as exc:  # noqa: BLE001 - any other kind escaping the client is a breach
            self.violate("client", f"{who} client: {what} raised {type(exc).__name__}: {exc}")
            return False, exc

    async def trio_call(
        self, proxy: Proxy, method: str, args: dict[str, Any], stats: bool, wait: float | None,
        expect: int | None,
    ) -> tuple[bool, Any]:  # fmt: skip
        """One call on a trio proxy; ``get`` must return ``expect``, what the setup gave.

        ``expect`` is None until the setup call that sets it has succeeded: one that
        failed (its worker died with it in flight) was never recorded, so a recovery
        replays nothing and ``get`` rightly returns the module's default.
        """
        fds = {"stats": self.stats_fd} if stats else None
        ok, result = await self.op(
            "trio", f"{proxy.module}.{method} (wait={wait})", (wait or 0) + PATIENT + MARGIN,
            lambda: proxy.call(method, args, fds, wait=wait),
        )  # fmt: skip
        if ok and method == "get" and expect is not None and result != expect:
            self.violate("replay", f"trio client: {proxy.module}.get() returned {result}, "
                         f"not {expect} as its setup (replayed after recoveries) set")  # fmt: skip
        return ok, result

    async def trio_session(
        self, rng: random.Random, module: str | None = None, *, strict: bool = False
    ) -> None:
        """A trio client: connect, a proxy, setup, calls, perhaps leave in the middle of one."""
        module = module or rng.choice(sorted(self.layout))
        leave = rng.uniform(0.02, 2.0) if not strict and rng.random() < 0.4 else math.inf
        value = rng.randrange(1, 1_000_000)
        calls = rng.randint(1, 8)
        try:
            with trio.fail_after(SESSION_BOUND), trio.move_on_after(leave) as leaving:
                await self._trio_session(rng, module, value, calls, strict)
        except trio.TooSlowError:
            self.violate("unanswered", f"a trio client session on {module} did not end within "
                         f"{SESSION_BOUND:g}s")  # fmt: skip
            return
        except ExceptionGroup as group:  # what is left of one once leaving took its Cancelled
            self.violate("client", f"trio client on {module}: open_client raised an exception "
                         f"group (the README says it does not): {group!r}")  # fmt: skip
            return
        if leaving.cancelled_caught:
            self.counts["trio clients left mid-way"] += 1

    async def _trio_session(
        self, rng: random.Random, module: str, value: int, calls: int, strict: bool
    ) -> None:
        connected = False
        try:
            with trio.CancelScope(deadline=trio.current_time() + CONNECT_BOUND) as connecting:
                async with open_client(self.socket, name="chaos-trio") as client:
                    connected = True
                    connecting.deadline = math.inf
                    ok, proxy = await self.op("trio", f"request_proxy {module}", REQUEST_BOUND,
                                              lambda: client.request_proxy(module))  # fmt: skip
                    if not ok:
                        if strict:
                            self.violate("settle", f"trio client: no proxy of {module}: {proxy}")
                        return
                    waits = [5.0] if strict else [None, 0.05, 0.5, 3.0]
                    steps = [(m, a, False) for m, a in setup_calls(module, value)]
                    steps += [rng.choice(CALLS[module]) for _ in range(calls)]
                    known: int | None = None
                    for method, args, stats in steps:
                        ok, result = await self.trio_call(proxy, method, args, stats,
                                                          rng.choice(waits), known)  # fmt: skip
                        if ok and "settings" in args:
                            known = value
                        if not ok and strict:
                            self.violate("settle", f"trio client: {module}.{method}: {result!r}")
                            return
                        await trio.sleep(rng.uniform(0, 0.05))
                    if rng.random() < 0.5:
                        await self.op("trio", f"release {module}", REQUEST_BOUND, proxy.release)
        except (OSError, IpadError) as exc:
            self.connect_failed("trio", exc)
            return
        if connecting.cancelled_caught and not connected:
            self.violate("unanswered", f"trio client: no connection within {CONNECT_BOUND:g}s")

    def connect_failed(self, who: str, exc: BaseException) -> None:
        """A client that could not connect (or say HELLO): fine only once the stop was asked."""
        self.counts[f"{who} connect failed: {type(exc).__name__}"] += 1
        if not (self.stop_asked or self.died):
            self.violate("client", f"{who} client could not connect: {type(exc).__name__}: {exc}")

    async def trio_actor(self, rng: random.Random) -> None:
        """Trio clients one after another until the stop."""
        while not self.stop_asked:
            await self.trio_session(rng)
            await trio.sleep(rng.uniform(0.02, 0.3))

    async def camera_app(self, rng: random.Random) -> None:
        """One long-lived trio client, as a camera application: proxies held, frames called."""
        modules = [m for m in ("echo", "faulty", "sluggish", "awb") if m in self.layout]
        try:
            async with open_client(self.socket, name="chaos-camera") as client:
                for name in modules:
                    value = rng.randrange(1, 1_000_000)
                    request = functools.partial(client.request_proxy, name)
                    ok, proxy = await self.op("trio", f"camera: request_proxy {name}",
                                              REQUEST_BOUND, request)  # fmt: skip
                    if not ok:
                        continue
                    known: int | None = None
                    for method, args in setup_calls(name, value):
                        ok, _ = await self.trio_call(proxy, method, args, False, 3.0, known)
                        if ok and "settings" in args:
                            known = value
                    self.camera[name] = (proxy, known)
                while not self.stop_asked:
                    for proxy, expect in list(self.camera.values()):
                        method, args, stats = rng.choice(CALLS[proxy.module])
                        await self.trio_call(proxy, method, args, stats, 1.0, expect)
                    await trio.sleep(0.05)
                async for _ in client.events:  # held open through the stop: it ends with it
                    pass
        except (OSError, IpadError) as exc:
            self.connect_failed("camera", exc)
        except ExceptionGroup as group:
            self.violate("client", f"camera client: open_client raised an exception group "
                         f"(the README says it does not): {group!r}")  # fmt: skip

    async def blocking_actor(self, rng: random.Random) -> None:
        """Blocking clients, each a process of its own, one after another until the stop."""
        while not self.stop_asked:
            kill = rng.uniform(0.1, 2.0) if rng.random() < 0.4 else None
            spec = {"socket": str(self.socket), "module": rng.choice(sorted(self.layout)),
                    "seed": rng.randrange(2**32), "calls": rng.randint(1, 8), "strict": False}  # fmt: skip
            await self.blocking_session(spec, kill)
            await trio.sleep(rng.uniform(0.05, 0.4))

    async def blocking_session(self, spec: dict[str, Any], kill_after: float | None) -> None:
        """Run one blocking session (tests/chaos_blocking.py), SIGKILLed at ``kill_after``."""
        stderr = self.directory / "blocking-stderr.txt"
        with stderr.open("ab") as errors:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.chaos_blocking", json.dumps(spec)],
                stdout=subprocess.PIPE, stderr=errors, env=self.env(), cwd=REPO,
            )  # fmt: skip
        assert process.stdout is not None
        kill_at = math.inf if kill_after is None else trio.current_time() + kill_after
        deadline = trio.current_time() + CONNECT_BOUND  # for the interpreter to start, then per op
        in_flight: dict[str, Any] | None = None
        killed = False
        pending = b""
        try:
            while True:
                with trio.move_on_at(min(deadline, kill_at)):
                    chunk = await process.stdout.receive_some(65536)
                    if not chunk:
                        with trio.move_on_after(CONNECT_BOUND):
                            await process.wait()
                        break
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        record = json.loads(line)
                        if record["phase"] == "begin":
                            in_flight = record
                            deadline = trio.current_time() + record["bound"]
                        else:
                            in_flight = None
                            deadline = trio.current_time() + CONNECT_BOUND
                            self.judge_blocking(record, spec)
                    continue
                if trio.current_time() >= kill_at:
                    killed = True
                    self.counts["blocking clients killed mid-way"] += 1
                elif in_flight is not None:
                    self.violate("unanswered", f"blocking client: {in_flight['op']} "
                                 f"{_fields(in_flight)}: no answer within {in_flight['bound']:g}s")  # fmt: skip
                else:
                    self.violate("client", "blocking client: silent between operations")
                break
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.stdout.aclose()
        if not killed and process.returncode not in (0, -signal.SIGKILL):
            self.violate("client", f"blocking client process exited with {process.returncode}; "
                         f"see {stderr}")  # fmt: skip

    def judge_blocking(self, record: Mapping[str, Any], spec: Mapping[str, Any]) -> None:
        """One finished blocking operation: a result, or a refusal for a reason, in time."""
        what = f"{record['op']} {_fields(record)}"
        self.counts["blocking requests"] += 1
        if record["ok"]:
            expect = record.get("expect")
            if expect is not None and record["value"] != expect:
                self.violate("replay", f"blocking client: {what} returned {record['value']}, "
                             f"not {expect} as its setup set")  # fmt: skip
            return
        error, message = record["error"], record["message"]
        if spec["strict"]:
            self.violate("settle", f"blocking client: {what} failed: {error}: {message}")
        elif record["ipad_error"]:
            self.refused("blocking", what, record["code"], message)
        elif error == "TimeoutError" and record.get("impatient"):
            self.counts["blocking clients gave up (their own timeout)"] += 1
        elif record["op"] == "connect" and isinstance(error, str) and error.endswith("Error"):
            self.connect_failed("blocking", OSError(f"{error}: {message}"))
        else:
            self.violate("client", f"blocking client: {what} raised {error}: {message}")


def _last_index(items: list[Any], value: Any) -> int:
    """The index of the last ``value`` in ``items``, -1 if none."""
    return max((i for i, item in enumerate(items) if item == value), default=-1)


def _fields(record: Mapping[str, Any]) -> str:
    keys = ("module", "method", "wait", "timeout")
    return " ".join(f"{k}={record[k]}" for k in keys if record.get(k) is not None)


def _short(record: Record) -> str:
    skip = {"event", "level", "timestamp", "func_name", "lineno", "filename"}
    return " ".join(f"{k}={str(v)[:300]}" for k, v in record.items() if k not in skip)


def excerpt(records: list[Record], until: str, lines: int = 12) -> str:
    """The daemon's last ``lines`` records at or before the wall time ``until``."""
    before = [r for r in records if str(r.get("timestamp", "")) <= until]
    return "\n".join(f"      {str(r.get('timestamp', ''))[11:]} {r.get('event')} {_short(r)}"
                     for r in before[-lines:])  # fmt: skip


@attrs.frozen
class Result:
    """What an episode found, and what it takes to look into it."""

    seed: int
    seconds: float
    stop_seconds: float | None
    violations: list[Violation]
    as_run: list[str]
    counts: dict[str, int]
    log: Path
    excerpts: list[str]

    def summary(self) -> str:
        """One line."""
        stop = f"{self.stop_seconds:.3f}s" if self.stop_seconds is not None else "none"
        kinds = collections.Counter(v.kind for v in self.violations)
        found = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "no violation"
        return f"seed {self.seed}: {self.seconds:.1f}s, stop {stop}: {found}"

    def report(self) -> str:
        """Everything: violations with the log around each, the schedule as run, counts."""
        lines = [self.summary(), f"  log: {self.log}"]
        for violation, around in zip(self.violations, self.excerpts, strict=True):
            lines.append(f"  [{violation.at:7.3f}s {violation.wall[11:]}] {violation.kind}: "
                         f"{violation.message}")  # fmt: skip
            lines.append("    the daemon's log just before:")
            lines.append(around)
        lines.append("  schedule as run:")
        lines += [f"    {line}" for line in self.as_run]
        lines.append(
            "  requests: " + ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        )
        return "\n".join(lines)


async def run_episode(seed: int, directory: Path) -> Result:
    """Run episode ``seed`` in ``directory`` (created); the daemon and its workers are gone after."""
    episode = Episode(make_plan(seed), directory)
    episode.note("plan: " + "; ".join(str(s) for s in episode.plan.steps)
                 + f"; settle={episode.plan.settle}; finale {episode.plan.finale}")  # fmt: skip
    try:
        with trio.move_on_after(SESSION_BOUND + 60) as overrun:
            await episode.run()
        if overrun.cancelled_caught:
            episode.violate("episode", "the episode overran its bound (a step hung)")
    finally:
        episode.teardown()
    records = episode.daemon.records if episode.daemon is not None else []
    return Result(
        seed, episode.now(), episode.stop_seconds, episode.violations, episode.as_run,
        dict(episode.counts), directory / "daemon.log",
        [excerpt(records, v.wall) for v in episode.violations],
    )  # fmt: skip
