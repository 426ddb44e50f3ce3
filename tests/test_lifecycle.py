"""The module lifecycle machine, without processes: every state's answer to every event."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ipad.config.duration import Duration
from ipad.config.model import RestartMode, RestartPolicy
from ipad.daemon.backoff import RestartTracker
from ipad.daemon.lifecycle import (
    HALT_REASON,
    TABLE,
    AllowStandby,
    CancelLaunch,
    CancelTimer,
    Cause,
    Effect,
    Event,
    Exited,
    ExitStatus,
    FillStandby,
    Finished,
    Halt,
    Hung,
    Invalidate,
    KillWorker,
    Launched,
    LaunchFailed,
    LaunchWorker,
    Lifecycle,
    LoadFailed,
    Log,
    NotifyStable,
    Promote,
    Ready,
    RecordCrash,
    Restart,
    Resume,
    SetState,
    Start,
    StartTimer,
    Stop,
    StopWorker,
    Sweep,
    Timer,
    TimerFired,
    Unwatch,
    Watch,
)
from ipad.daemon.states import WORKER_TRANSITIONS, WorkerState

KILLED = ExitStatus(signal=9)
CLEAN = ExitStatus(code=0)

EVENT_KINDS = [Start, Launched, LaunchFailed, Ready, LoadFailed, Exited, Hung, TimerFired,
               Restart, Stop, AllowStandby, Halt, Resume]  # fmt: skip


def policy(**changes: Any) -> RestartPolicy:
    """A restart policy with ``changes``; durations given as seconds."""
    plain = ("multiplier", "jitter", "max_failures")
    values: dict[str, Any] = {
        k: Duration(v)
        if isinstance(v, int | float) and k not in plain and not isinstance(v, bool)
        else v
        for k, v in changes.items()
    }
    return attrs.evolve(RestartPolicy(), **values)


class World:
    """What the supervisor would do with the machine's actions, kept as plain records."""

    def __init__(self, machine: Lifecycle[int]) -> None:
        self.m = machine
        self.now = 0.0
        self.ids = itertools.count(1)
        #: Processes that exist: launched, not yet exited.
        self.alive: set[int] = set()
        #: Launch jobs in flight (by standby), before they produced a process.
        self.launching: dict[bool, bool] = {}
        #: Workers whose LOAD awaits an answer (value: standby).
        self.loading: dict[int, bool] = {}
        #: Workers the machine asked to end (value: killed at once).
        self.ended: dict[int, bool] = {}
        self.timers: set[Timer] = set()
        self.watched: set[int] = set()
        self.invalidated: list[tuple[int, str]] = []
        self.states: list[tuple[WorkerState, str | None]] = []
        self.logs: list[Log] = []
        self.finished = 0
        self.stable = 0
        #: Crash reports asked for: (worker, kind, reason).
        self.crashes: list[tuple[int, str, str]] = []

    def feed(self, event: Event) -> list[Effect]:
        """Hand ``event`` to the machine, carry out its effects, check every published move."""
        before = self.m.state
        effects = self.m.handle(event, self.now)
        for effect in effects:
            self.apply(effect)
        moved = [e for e in effects if isinstance(e, SetState)]
        state = before
        for change in moved:  # every published move is one the state table allows
            assert change.state in WORKER_TRANSITIONS[state], (state, change.state)
            state = change.state
        assert state is self.m.state
        return effects

    def apply(self, effect: Effect) -> None:  # noqa: PLR0912 - one arm per action
        """Carry out one effect on the records, checking it makes sense."""
        match effect:
            case LaunchWorker(standby=standby):
                assert not self.m.stop_why, "launched while stopping"
                assert not self.m.halted, "launched while stopped by the operator"
                assert not self.launching.get(standby), "two launches of one kind at once"
                self.launching[standby] = True
            case CancelLaunch():
                pass  # the launch or LOAD may still answer: the world decides
            case StopWorker(worker=w) | KillWorker(worker=w):
                assert w in self.alive, f"asked to end {w}, which is not alive"
                self.ended[w] = isinstance(effect, KillWorker) or self.ended.get(w, False)
            case Promote(worker=w):
                assert w in self.alive
            case Watch(worker=w):
                self.watched.add(w)
            case Unwatch(worker=w):
                self.watched.discard(w)
            case StartTimer(timer=t):
                self.timers.add(t)
            case CancelTimer(timer=t):
                self.timers.discard(t)
            case Invalidate(worker=w, reason=reason):
                self.invalidated.append((w, reason))
            case SetState(state=state, reason=reason):
                self.states.append((state, reason))
            case Log():
                self.logs.append(effect)
            case Finished():
                self.finished += 1
            case FillStandby(worker=w):
                assert w is self.m.standby
            case NotifyStable():
                self.stable += 1
            case Sweep(worker=w):
                assert w not in self.alive
            case RecordCrash(worker=w, kind=kind, reason=reason):
                assert w not in self.alive
                self.crashes.append((w, kind, reason))

    # --- the world's side of each event ---------------------------------------------

    def launched(self, standby: bool = False) -> int:
        """The launch in flight produced a process."""
        worker = next(self.ids)
        self.launching[standby] = False
        self.alive.add(worker)
        self.loading[worker] = standby
        self.feed(Launched(worker, standby))
        return worker

    def launch_failed(self, standby: bool = False, reason: str = "cannot fork") -> None:
        """The launch in flight produced no process."""
        self.launching[standby] = False
        self.feed(LaunchFailed(reason, standby))

    def ready(self, worker: int) -> None:
        """The worker answered LOAD with READY."""
        del self.loading[worker]
        self.feed(Ready(worker))

    def load_failed(
        self, worker: int, reason: str = "no such module", *, final: bool = False
    ) -> None:
        """The worker answered LOAD with an ERROR (``final``: its code was refused)."""
        del self.loading[worker]
        self.feed(LoadFailed(worker, reason, final=final))

    def exit(
        self, worker: int, status: ExitStatus = KILLED, cause: Cause | None = None,
        memory_max: int | None = None,
    ) -> None:  # fmt: skip
        """The worker's process ended and was reaped."""
        self.alive.discard(worker)
        self.loading.pop(worker, None)
        self.ended.pop(worker, None)
        self.watched.discard(worker)
        self.feed(Exited(worker, status, cause, memory_max))

    def fire(self, timer: Timer) -> None:
        """A timer ran out."""
        self.timers.discard(timer)
        self.feed(TimerFired(timer))

    def running(self, *, standby: bool = False) -> int:
        """From a new machine: start, run; with ``standby`` a loaded standby too."""
        self.feed(Start())
        worker = self.launched()
        self.ready(worker)
        if standby:
            self.feed(AllowStandby())
            self.ready(self.launched(standby=True))
        return worker

    def drain(self) -> None:
        """Let every launch answer and every worker asked to end exit, until nothing moves."""
        for _ in range(20):
            for standby, flying in list(self.launching.items()):
                if flying:
                    self.launch_failed(standby, "cancelled")
            for worker in list(self.loading):
                if worker in self.ended:
                    self.loading.pop(worker)
            for worker in list(self.ended):
                self.exit(worker, CLEAN)
            if not any(self.launching.values()) and not self.ended:
                return
        raise AssertionError("the machine keeps launching")

    def states_named(self) -> list[WorkerState]:
        """Every state published, in order."""
        return [state for state, _ in self.states]

    def logged(self, event: str) -> list[Log]:
        """The log records named ``event``."""
        return [record for record in self.logs if record.event == event]


def state(w: World) -> WorkerState:
    """The machine's state (read through a call: each read is fresh to the type checker)."""
    return w.m.state


def finished(w: World) -> int:
    """How many times the machine said it finished (read through a call, as ``state``)."""
    return w.finished


def world(**changes: Any) -> World:
    rules = policy(**changes)
    return World(Lifecycle("awb", rules, RestartTracker(rules, rand=lambda: 0.5)))


# --- every state, every event -------------------------------------------------------------


#: How to reach each state from a new machine (``standby``: with a loaded standby too).
def _reach(where: str) -> World:  # noqa: PLR0912, PLR0915 - one arm per state
    """A new machine brought to the state named ``where``."""
    w = world(max_failures=2, restart=RestartMode.ON_FAILURE)
    match where:
        case "stopped":
            pass
        case "starting-launching":
            w.feed(Start())
        case "starting-loading":
            w.feed(Start())
            w.launched()
        case "running":
            w.running()
        case "running-standby-loading":
            w.running()
            w.feed(AllowStandby())
            w.launched(standby=True)
        case "running-standby":
            w.running(standby=True)
        case "exited":
            w.exit(w.running(), CLEAN)
        case "backoff":
            w.exit(w.running())
            w.exit(w.launched())
        case "cooldown":
            w.running(standby=True)
            w.feed(TimerFired(Timer.STABLE))
            while state(w) is not WorkerState.COOLDOWN:
                active = w.m.active
                if active is None:
                    if state(w) is WorkerState.BACKOFF:
                        w.fire(Timer.RESTART)
                    active = w.launched()
                w.exit(active)
            if w.m.standby is None and not w.launching.get(True):
                pass
        case "failed":
            w = world(restart=RestartMode.NEVER)
            w.exit(w.running())
        case "stopping":
            w.running(standby=True)
            w.feed(Stop())
        case "stopped-finished":
            w.running()
            w.feed(Stop())
            w.drain()
        case "halting":
            w.running(standby=True)
            w.feed(Halt())
        case "halted":
            w.running(standby=True)
            w.feed(Halt())
            w.drain()
        case "resuming":
            w.running(standby=True)
            w.feed(Halt())
            w.feed(Resume())
    return w


STATES = ["stopped", "starting-launching", "starting-loading", "running",
          "running-standby-loading", "running-standby", "exited", "backoff", "cooldown",
          "failed", "stopping", "stopped-finished", "halting", "halted", "resuming"]  # fmt: skip


def _events_for(w: World) -> list[tuple[str, Callable[[], object]]]:
    """Every event the world could deliver to the machine as it is now."""
    m = w.m
    out: list[tuple[str, Callable[[], object]]] = [
        ("start", lambda: w.feed(Start())),
        ("restart", lambda: w.feed(Restart())),
        ("stop", lambda: w.feed(Stop("stopped"))),
        ("allow-standby", lambda: w.feed(AllowStandby())),
        ("halt", lambda: w.feed(Halt())),
        ("resume", lambda: w.feed(Resume())),
        ("timer-restart", lambda: w.fire(Timer.RESTART)),
        ("timer-stable", lambda: w.fire(Timer.STABLE)),
    ]
    for standby, flying in w.launching.items():
        if flying:
            out.append((f"launched-{standby}", functools.partial(w.launched, standby)))
            out.append((f"launch-failed-{standby}", functools.partial(w.launch_failed, standby)))
    for worker in sorted(w.loading):
        out.append((f"ready-{worker}", functools.partial(w.ready, worker)))
        out.append((f"load-failed-{worker}", functools.partial(w.load_failed, worker)))
    for worker in sorted(w.alive):
        out.append((f"exit-{worker}", functools.partial(w.exit, worker)))
        out.append((f"hung-{worker}", functools.partial(w.feed, Hung(worker, "board"))))
    assert m is w.m
    return out


def _check_accounting(w: World) -> None:
    """Every live process is known to the machine, and it knows no dead one."""
    assert set(w.m.workers()) == w.alive


def test_the_table_answers_every_event_in_every_state() -> None:
    """No state lacks an answer to any kind of event."""
    for state in WorkerState:
        assert set(TABLE[state]) == set(EVENT_KINDS), state


@pytest.mark.parametrize("where", STATES)
def test_every_event_in_every_state_keeps_the_books(where: str) -> None:
    """From each reachable state, each deliverable event moves legally and loses no worker.

    After it, a stop and the ends it asks for always finish the module, whatever came first.
    """
    names = [name for name, _ in _events_for(_reach(where))]
    for name in names:
        w = _reach(where)
        dict(_events_for(w))[name]()
        _check_accounting(w)
        w.feed(Stop())
        w.drain()
        assert state(w) is WorkerState.STOPPED, (where, name)
        assert w.finished == 1, (where, name)
        assert not w.alive, (where, name)


# --- behaviour ------------------------------------------------------------------------------


def test_a_crash_promotes_the_standby_at_once() -> None:
    """A crash promotes the loaded standby in the same step, and a new standby is launched."""
    w = world()
    active = w.running(standby=True)
    standby = w.m.standby
    w.exit(active)
    assert state(w) is WorkerState.RUNNING
    assert w.m.active == standby
    assert w.invalidated == [(active, "worker exited with signal SIGKILL")]
    assert w.states_named()[-3:] == [WorkerState.EXITED, WorkerState.STARTING, WorkerState.RUNNING]
    assert w.launching[True]  # and a new standby is on its way


def test_failures_back_off_then_cool_down_and_restart_ends_it() -> None:
    """Quick failures back off, too many cool down, and a restart starts at once."""
    w = world(max_failures=2, initial_delay=0.5, cooldown_interval=30.0)
    w.exit(w.running())  # the first restart after a healthy run is immediate
    w.exit(w.launched())
    assert state(w) is WorkerState.BACKOFF
    assert Timer.RESTART in w.timers
    w.fire(Timer.RESTART)
    w.exit(w.launched())
    assert state(w) is WorkerState.COOLDOWN
    assert w.logged("module.cooldown")[0].fields["retry_in"] == 30.0
    w.feed(Restart())
    assert state(w) is WorkerState.STARTING
    assert Timer.RESTART not in w.timers
    w.ready(w.launched())
    assert state(w) is WorkerState.RUNNING


def test_stop_in_cooldown_ends_the_standby_and_finishes() -> None:
    """The bug behind SIGTERM never finishing: a cooldown's standby is stopped and waited for."""
    w = _reach("cooldown")
    assert state(w) is WorkerState.COOLDOWN
    w.feed(Stop())
    assert not w.finished or not w.alive
    w.drain()
    assert w.finished == 1
    assert not w.alive
    assert state(w) is WorkerState.STOPPED


def test_a_restart_asked_while_launching_does_not_excuse_the_next_crash() -> None:
    """A restart during a launch is that launch; the next crash still counts as a failure."""
    w = world(max_failures=1)
    w.exit(w.running())  # failure 1, restarted at once
    assert state(w) is WorkerState.STARTING
    w.feed(Restart())
    w.ready(w.launched())
    w.exit(w.m.active)  # type: ignore[arg-type]
    assert w.m.tracker.consecutive == 1  # counted: the restart reset it, this crash counts


def test_a_hung_worker_is_killed_and_its_end_says_so() -> None:
    """A hang kills the worker at once; its clients read that it hung."""
    w = world()
    active = w.running()
    w.feed(Hung(active, "ping"))
    assert w.ended[active] is True  # killed at once
    w.exit(active)
    assert w.invalidated[-1][1] == "worker hung: no heartbeat reply within 3s"


def test_a_crash_in_a_call_is_recorded_and_its_reason_names_the_call() -> None:
    """A signal death during a call: one crash report, and the reason names the method."""
    w = world()
    active = w.running(standby=True)
    w.alive.discard(active)
    w.feed(Exited(active, ExitStatus(signal=11), in_flight="process()"))
    assert w.crashes == [(active, "signal SIGSEGV",
                          "worker exited with signal SIGSEGV in process()")]  # fmt: skip
    assert w.invalidated == [(active, "worker exited with signal SIGSEGV in process()")]


def test_a_hang_is_recorded_as_hung_with_the_call_it_ran() -> None:
    """A hung worker's report is of kind hung, its reason names the call the board claimed."""
    w = world()
    active = w.running()
    w.feed(Hung(active, "call", in_flight="spin()"))
    w.exit(active)
    limit = w.m.policy.call_timeout
    reason = f"worker hung: a call ran longer than its call_timeout of {limit} in spin()"
    assert w.crashes == [(active, "hung", reason)]


@pytest.mark.parametrize("how", ["restart", "stop", "clean"])
def test_an_asked_for_or_clean_end_is_no_crash(how: str) -> None:
    """Restart, stop and an exit with status 0 record no crash, whatever ran."""
    w = world()
    active = w.running(standby=True)
    status = ExitStatus(code=0) if how == "clean" else KILLED
    if how == "restart":
        w.feed(Restart())
    elif how == "stop":
        w.feed(Stop())
    w.alive.discard(active)
    w.feed(Exited(active, status, in_flight="process()"))
    assert w.crashes == []
    assert "process()" not in w.invalidated[-1][1]


def test_a_standby_that_dies_on_its_own_is_recorded() -> None:
    """A standby's own death is a crash too: its report says it was the standby."""
    w = world()
    w.running(standby=True)
    standby = w.m.standby
    assert standby is not None
    w.exit(standby, ExitStatus(signal=6))
    assert w.crashes == [(standby, "signal SIGABRT", "standby exited with signal SIGABRT")]


def test_a_load_error_ends_the_start_as_a_failure() -> None:
    """An ERROR answering LOAD ends the worker and counts as a failed start."""
    w = world()
    w.feed(Start())
    worker = w.launched()
    w.load_failed(worker, "no module named foo")
    assert worker in w.ended
    w.exit(worker, ExitStatus(code=1))
    reason = "failed to start: no module named foo (exit status 1)"
    assert (WorkerState.EXITED, reason) in w.states
    assert w.logged("worker.start_failed")


def test_refused_code_fails_the_module_at_once_and_stops_standbys() -> None:
    """Code refused against its signature: no retry, no new standby, until a restart is asked."""
    w = world()
    active = w.running(standby=True)
    w.exit(active)  # the standby is promoted; a new one is launched
    successor = w.launched(standby=True)
    w.load_failed(successor, "code refused: x.py: changed since it was signed", final=True)
    w.exit(successor, ExitStatus(code=3))
    assert not w.launching.get(True)  # no standby after a refused one
    w.now = 1000.0  # a healthy run: the next crash restarts at once
    w.exit(w.m.active)  # type: ignore[arg-type]
    fresh = w.launched()
    w.load_failed(fresh, "code refused: x.py: changed since it was signed", final=True)
    w.exit(fresh, ExitStatus(code=3))
    assert state(w) is WorkerState.FAILED
    assert "not restarted (its code is refused" in (w.m.reason or "")
    assert not w.launching.get(False)  # refused once: no backoff, no retry
    w.feed(Restart())  # the operator tries again: standbys are allowed again too
    w.ready(w.launched())
    assert state(w) is WorkerState.RUNNING
    assert w.launching[True]


def test_a_stop_during_a_launch_waits_for_what_the_launch_produced() -> None:
    """A stop during a launch still ends the process the launch produced before finishing."""
    w = world()
    w.feed(Start())
    w.feed(Stop())
    assert state(w) is WorkerState.STOPPING
    worker = w.launched()  # the fork answered before the cancellation took
    assert worker in w.ended
    assert finished(w) == 0
    w.exit(worker)
    assert finished(w) == 1


def test_stop_reasons_name_what_happened_to_the_module() -> None:
    """A reload's stop says what it did to the module, in its exit and its final state."""
    w = world()
    active = w.running()
    w.feed(Stop("removed from the configuration"))
    w.exit(active, CLEAN)
    assert w.states[-2:] == [
        (WorkerState.EXITED, "module awb removed from the configuration (exit status 0)"),
        (WorkerState.STOPPED, "removed from the configuration"),
    ]


def test_seccomp_and_oom_exits_say_so() -> None:
    """Exits the supervisor recognised as seccomp or OOM kills say so."""
    w = world()
    w.exit(w.running(), ExitStatus(signal=31), Cause.SECCOMP)
    assert w.invalidated[-1][1].startswith("seccomp: killed for a forbidden system call")
    w.ready(w.launched())
    assert w.m.active is not None
    w.exit(w.m.active, KILLED, Cause.OOM, memory_max=1 << 20)
    assert w.invalidated[-1][1].startswith("oom: over its memory limit (1048576 bytes)")


def test_a_clean_exit_under_on_failure_is_not_restarted() -> None:
    """A clean exit under on-failure stays exited until the operator restarts it."""
    w = world(restart=RestartMode.ON_FAILURE)
    w.exit(w.running(), CLEAN)
    assert state(w) is WorkerState.EXITED
    assert "not restarted" in str(w.m.reason)
    w.feed(Restart())
    assert state(w) is WorkerState.STARTING


def test_stable_runs_notify_once_per_run() -> None:
    """A run that lasts stable_after says so (its fallback's proxies come home)."""
    w = world()
    w.running()
    w.fire(Timer.STABLE)
    assert w.stable == 1
    assert w.logged("module.stable")


@pytest.mark.parametrize("where", STATES)
def test_halt_then_resume_in_every_state_ends_running_or_stopped(where: str) -> None:
    """From each state, a halt stops every worker (STOPPED, no launch); a resume runs it again.

    Unless it was stopping for good: then it stays stopped and finishes.
    """
    w = _reach(where)
    stopping = w.m.stopping
    w.feed(Halt())
    w.drain()
    assert not w.alive
    assert state(w) is WorkerState.STOPPED, where
    assert not any(w.launching.values())
    assert Timer.RESTART not in w.timers
    if not stopping:
        assert w.m.reason == HALT_REASON
        assert w.m.halted
    w.feed(TimerFired(Timer.RESTART))  # a stale timer starts nothing
    w.feed(Start())
    assert not any(w.launching.values())
    w.feed(Resume())
    if stopping:  # stopping for good: nothing starts again
        assert not any(w.launching.values())
        return
    assert state(w) is WorkerState.STARTING  # halted before its Start too: the resume starts it
    w.ready(w.launched())
    assert state(w) is WorkerState.RUNNING
    w.feed(Stop())
    w.drain()
    assert finished(w) == 1


def test_halt_invalidates_with_the_operators_reason_and_does_not_restart() -> None:
    """A halted module's proxies read "stopped by operator"; the exit counts as no failure."""
    w = world(restart=RestartMode.ALWAYS)
    active = w.running(standby=True)
    w.feed(Halt())
    assert state(w) is WorkerState.STOPPING
    w.exit(active, ExitStatus(signal=15))
    assert w.invalidated == [(active, "module awb stopped by operator (signal SIGTERM)")]
    assert state(w) is WorkerState.STOPPING  # its standby still to go
    w.drain()
    assert w.states[-1] == (WorkerState.STOPPED, HALT_REASON)
    assert not any(w.launching.values())
    assert w.m.tracker.consecutive == 0
    assert w.logged("module.stop_requested")


def test_halt_during_an_operators_restart_reads_stopped_by_operator() -> None:
    """Stopped while its restart still ends the worker: its proxies read the stop, not "restarting"."""
    w = world()
    active = w.running()
    w.feed(Restart())
    w.feed(Halt())
    w.exit(active, ExitStatus(signal=15))
    assert w.invalidated == [(active, "module awb stopped by operator (signal SIGTERM)")]
    w.drain()
    assert w.states[-1] == (WorkerState.STOPPED, HALT_REASON)
    assert not any(w.launching.values())


def test_resume_while_the_halt_still_ends_workers_starts_once_they_are_gone() -> None:
    """Started again before its workers ended, the module starts the moment the last one goes."""
    w = world()
    active = w.running(standby=True)
    standby = w.m.standby
    w.feed(Halt())
    w.feed(Resume())
    assert not any(w.launching.values())  # no second worker beside the ending one
    w.exit(active)
    assert not any(w.launching.values())
    assert standby is not None
    w.exit(standby, CLEAN)
    assert state(w) is WorkerState.STARTING
    assert w.launching[False]
    assert WorkerState.STOPPED not in w.states_named()[-3:]


def test_restart_starts_a_halted_module_and_stop_finishes_it() -> None:
    """`restart` of a halted module starts it (as systemctl's); a daemon stop finishes a halt."""
    w = world()
    w.running()
    w.feed(Halt())
    w.drain()
    w.feed(Restart())
    assert state(w) is WorkerState.STARTING
    w.ready(w.launched())
    w.feed(Halt())
    w.feed(Stop())  # the daemon stops while the halt ends the worker
    w.drain()
    assert finished(w) == 1
    assert state(w) is WorkerState.STOPPED


def test_a_halt_and_resume_before_the_start_leave_the_start_to_start() -> None:
    """Halted and resumed before its supervisor began (a reload's window): Start starts it once."""
    w = world()
    w.feed(Halt())
    assert (state(w), w.m.reason) == (WorkerState.STOPPED, HALT_REASON)
    w.feed(Resume())
    assert not any(w.launching.values())  # nothing launched before the supervisor runs
    w.feed(Start())
    assert w.launching[False]
    w.ready(w.launched())
    assert state(w) is WorkerState.RUNNING


def test_resume_of_a_module_in_cooldown_starts_it_now() -> None:
    """`start` of a module waiting out a cooldown or backoff starts it at once."""
    w = _reach("cooldown")
    w.feed(Resume())
    assert state(w) is WorkerState.STARTING
    assert Timer.RESTART not in w.timers


# --- random interleavings -----------------------------------------------------------------


class LifecycleModel(RuleBasedStateMachine):
    """Random events against a simulated world: books balance, stops finish, nothing leaks."""

    def __init__(self) -> None:
        super().__init__()
        self.w = world(max_failures=3, initial_delay=0.01, cooldown_interval=1.0,
                       stable_after=2.0)  # fmt: skip
        self.w.feed(Start())
        self.stopped = False

    @rule(standby=st.booleans())
    def launch_succeeds(self, standby: bool) -> None:
        """A launch in flight produces a process."""
        if self.w.launching.get(standby):
            self.w.launched(standby)

    @rule(standby=st.booleans())
    def launch_fails(self, standby: bool) -> None:
        """A launch in flight fails."""
        if self.w.launching.get(standby):
            self.w.launch_failed(standby)

    @rule(data=st.data())
    def load_answers(self, data: st.DataObject) -> None:
        """A loading worker answers READY or an ERROR."""
        if self.w.loading:
            worker = data.draw(st.sampled_from(sorted(self.w.loading)))
            if data.draw(st.booleans()):
                self.w.ready(worker)
            else:
                self.w.load_failed(worker)

    @rule(data=st.data(), clean=st.booleans())
    def a_worker_exits(self, data: st.DataObject, clean: bool) -> None:
        """Any live process ends, asked to or not."""
        if self.w.alive:
            worker = data.draw(st.sampled_from(sorted(self.w.alive)))
            self.w.exit(worker, CLEAN if clean else KILLED)

    @rule(data=st.data())
    def a_worker_hangs(self, data: st.DataObject) -> None:
        """A watched worker goes silent."""
        if self.w.watched:
            self.w.feed(Hung(data.draw(st.sampled_from(sorted(self.w.watched))), "board"))

    @rule(timer=st.sampled_from(Timer), dt=st.floats(0, 5))
    def time_passes(self, timer: Timer, dt: float) -> None:
        """Time moves on; the timer fires if it was set."""
        self.w.now += dt
        if timer in self.w.timers:
            self.w.fire(timer)

    @rule()
    def operator_restarts(self) -> None:
        """``ipadctl restart``."""
        self.w.feed(Restart())

    @rule()
    def operator_halts(self) -> None:
        """``ipadctl stop MODULE``."""
        self.w.feed(Halt())

    @rule()
    def operator_resumes(self) -> None:
        """``ipadctl start MODULE``."""
        self.w.feed(Resume())

    @rule()
    def standbys_allowed(self) -> None:
        """The daemon allows standbys."""
        self.w.feed(AllowStandby())

    @precondition(lambda self: not self.stopped)
    @rule(why=st.sampled_from(["stopped", "removed from the configuration"]))
    def stop(self, why: str) -> None:
        """The daemon stops, or a reload removes or changes the module."""
        self.stopped = True
        self.w.feed(Stop(why))

    @invariant()
    def books_balance(self) -> None:
        """Every live process is known to the machine."""
        _check_accounting(self.w)

    @invariant()
    def states_are_coherent(self) -> None:
        """What each state promises holds."""
        m = self.w.m
        if m.state is WorkerState.RUNNING:
            assert m.active is not None
            assert m.active_ready
            assert m.active in self.w.watched or m.active in m.ending
        if m.state in (WorkerState.BACKOFF, WorkerState.COOLDOWN):
            assert Timer.RESTART in self.w.timers
        if m.stop_why is not None or m.halted:
            assert all(worker in self.w.ended for worker in self.w.alive)
        if m.halted and not m.halting and not m.stopping:
            assert m.state is WorkerState.STOPPED
            assert not self.w.alive
        assert self.w.finished <= 1

    def teardown(self) -> None:
        """Whatever happened, a stop and the ends it asks for finish the module."""
        self.w.feed(Stop())
        self.w.drain()
        assert self.w.m.state is WorkerState.STOPPED
        assert self.w.finished == 1
        assert not self.w.alive


TestLifecycleModel = LifecycleModel.TestCase
TestLifecycleModel.settings = settings(
    max_examples=600, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
