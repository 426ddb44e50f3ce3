"""One module's lifecycle as a table: state x event -> next state and the actions to take.

No I/O, no clock, no trio: as h11 keeps an HTTP connection's state, this
keeps a module's. The supervisor (ipad/daemon/supervisor.py) feeds it what
happened -- a worker launched, ready or exited, a timer, an operator's stop
or restart -- with the time, and carries out the actions that come back:
launch, stop or kill a worker, publish a state, invalidate proxies, set a
timer. Every state answers every event (``TABLE``); tests/test_lifecycle.py
walks them all and drives random interleavings with hypothesis.

Workers are opaque, hashable tokens here (the supervisor's WorkerProcess,
a number in the tests). Every worker the machine learns of stays in exactly
one of ``active``, ``standby`` or ``ending`` until its exit is fed back:
none is ever forgotten while it may still run, and a stop is finished only
once every one of them has exited and no launch is in flight.
"""

from __future__ import annotations

import enum
import signal
import sys
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import attrs

from ipad.config.model import RestartPolicy
from ipad.daemon.backoff import Action, RestartTracker, backoff
from ipad.daemon.states import WorkerState, advance_worker

W = TypeVar("W", bound=Hashable)


@attrs.frozen
class ExitStatus:
    """How a worker ended: an exit code or a signal, as waitid reported it."""

    code: int | None = None
    signal: int | None = None

    @property
    def clean(self) -> bool:
        """Exited with status 0."""
        return self.code == 0

    def describe(self) -> str:
        """``exit status 3`` or ``signal SIGKILL``, for reasons and logs."""
        if self.signal is not None:
            return f"signal {_signal_name(self.signal)}"
        return f"exit status {self.code}"

    def log_fields(self) -> dict[str, object]:
        """``exit_status`` or ``signal`` for a log record."""
        if self.signal is not None:
            return {"signal": _signal_name(self.signal)}
        return {"exit_status": self.code}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class Timer(enum.Enum):
    """The timers a module keeps; at most one of each runs."""

    #: The wait before the next start: a backoff or the cooldown interval.
    RESTART = "restart"
    #: ``stable_after`` into a run: the module counts as stable (fallback proxies come home).
    STABLE = "stable"
    #: The wait before the next standby after one ended on its own: a standby that dies
    #: in every LOAD would otherwise have the daemon fork one after another, flat out.
    STANDBY = "standby"


def may_promote(standby_code: str | None, disk_code: str | None) -> bool:
    """Whether a standby that loaded ``standby_code`` runs the module's code on disk now.

    Equal identities only: a standby whose code is unknown (it changed while
    it loaded) is not promoted over a known one, and neither is one that
    loaded code edited since. Both unknown (no identity is kept, or the code
    is past the hashing bounds): promoted, as before identities existed.
    """
    return standby_code == disk_code


class Cause(enum.Enum):
    """What the supervisor found out about an exit that the status alone does not say."""

    #: Killed by SIGSYS while under a seccomp filter: a forbidden system call.
    SECCOMP = "seccomp"
    #: Killed by the kernel's OOM killer within its memory limit.
    OOM = "oom"
    #: Killed by the daemon for breaking the protocol on its control socket.
    PROTOCOL = "protocol"


class Why(enum.Enum):
    """Why the machine ended a worker (its exit then reads accordingly)."""

    STOP = "stop"  # the module stops: the daemon stops, or a reload removes or changes it
    RESTART = "restart"  # the operator asked for a restart
    HUNG = "hung"  # silent past heartbeat_timeout
    NOT_READY = "not_ready"  # no READY: an ERROR instead, or start_timeout passed
    RETIRED = "retired"  # a standby that is no longer wanted


# --- events --------------------------------------------------------------------------


@attrs.frozen
class Start:
    """Begin supervising: the first start."""


@attrs.frozen
class Launched(Generic[W]):
    """A launch asked for by LaunchWorker produced a process; its LOAD is on its way."""

    worker: W
    standby: bool = False


@attrs.frozen
class LaunchFailed:
    """A launch produced no process (spawn or fork failed, or it was cancelled)."""

    reason: str
    standby: bool = False


@attrs.frozen
class Ready(Generic[W]):
    """The worker answered LOAD with READY."""

    worker: W
    #: The identity of the code it loaded (ipad/config/code_identity.py); None: unknown.
    code_id: str | None = None


@attrs.frozen
class LoadFailed(Generic[W]):
    """The worker answered LOAD with an ERROR (``exiting``: it exits by itself), or timed out."""

    worker: W
    reason: str
    exiting: bool = False
    #: Its code was refused (not what was signed): no retry can succeed before a reload.
    final: bool = False


@attrs.frozen
class Exited(Generic[W]):
    """The worker's process ended and was reaped."""

    worker: W
    status: ExitStatus
    cause: Cause | None = None
    #: For an OOM kill: the limit it ran under, in bytes.
    memory_max: int | None = None
    #: For a protocol violation: what it did.
    detail: str | None = None
    #: The module code its heartbeat board claims ran as it died (``process()``), if any.
    in_flight: str | None = None


@attrs.frozen
class Hung(Generic[W]):
    """The heartbeat saw no sign of life within ``heartbeat_timeout``."""

    worker: W
    #: ``board`` (its counter did not move), ``ping`` (no reply) or ``call`` (a call ran
    #: past ``call_timeout``, however its beats moved).
    heartbeat: str
    #: The module code its heartbeat board claims runs (``process()``), if any.
    in_flight: str | None = None


@attrs.frozen
class TimerFired:
    """A timer set with StartTimer ran out."""

    timer: Timer


@attrs.frozen
class Restart:
    """``ipadctl restart``: start afresh now, ending any backoff or cooldown."""


@attrs.frozen
class Stop:
    """Stop for good: the daemon stops, or a reload removes or changes the module."""

    #: How its clients are told: "stopped", "removed from the configuration", ...
    why: str = "stopped"


@attrs.frozen
class Halt:
    """``ipadctl stop MODULE``: end its workers and start none until Resume (or Restart)."""


@attrs.frozen
class Resume:
    """``ipadctl start MODULE``: start a halted module again (or at once, from a wait)."""


@attrs.frozen
class AllowStandby:
    """Every module has started: standbys may be prepared from now on."""


Event = (
    Start | Launched[Any] | LaunchFailed | Ready[Any] | LoadFailed[Any] | Exited[Any] | Hung[Any]
    | TimerFired | Restart | Stop | AllowStandby | Halt | Resume
)  # fmt: skip

#: The reason of a module the operator stopped (``ipadctl stop MODULE``), and of its proxies.
HALT_REASON = "stopped by operator"

# --- actions -------------------------------------------------------------------------


@attrs.frozen
class SetState(Generic[W]):
    """Publish the module's new state; ``worker`` is the one it is about, if any."""

    state: WorkerState
    reason: str | None = None
    worker: W | None = None
    details: dict[str, object] = attrs.field(factory=dict)


@attrs.frozen
class Log:
    """A log record (``level`` is a structlog method name)."""

    level: str
    event: str
    fields: dict[str, object] = attrs.field(factory=dict)
    #: The worker the record is about: its pid goes in as ``worker_pid``.
    worker: Any = None
    #: Where the machine decided on it: (file name, line, function), for CODE_FILE and kin.
    origin: tuple[str, int, str] | None = None


@attrs.frozen
class LaunchWorker:
    """Start a worker and LOAD it; feed back Launched or LaunchFailed, then Ready or LoadFailed.

    A standby is launched once the module's clients have recovered and loads
    with a slow heartbeat until it is promoted.
    """

    standby: bool = False


@attrs.frozen
class CancelLaunch:
    """Give up the launch (or its LOAD) in flight; what it started is still fed back."""

    standby: bool = False


@attrs.frozen
class Promote(Generic[W]):
    """The loaded standby becomes the active worker (it beats at the module's pace from now)."""

    worker: W


@attrs.frozen
class Watch(Generic[W]):
    """Watch the worker's heartbeat."""

    worker: W


@attrs.frozen
class Unwatch(Generic[W]):
    """Stop watching the worker's heartbeat."""

    worker: W


@attrs.frozen
class StopWorker(Generic[W]):
    """End the worker within ``stop_timeout``: SHUTDOWN if ``polite``, SIGTERM, then SIGKILL.

    ``exiting``: it said it is on its way out; give it the time before any signal.
    """

    worker: W
    polite: bool = False
    exiting: bool = False


@attrs.frozen
class KillWorker(Generic[W]):
    """SIGKILL the worker now (it hung)."""

    worker: W


@attrs.frozen
class Invalidate(Generic[W]):
    """Turn invalid every proxy whose instance lived in the worker, with ``reason``."""

    worker: W
    reason: str


@attrs.frozen
class StartTimer:
    """Feed back TimerFired(timer) after ``delay`` seconds, replacing one that runs."""

    timer: Timer
    delay: float


@attrs.frozen
class CancelTimer:
    """Forget the timer, if it runs."""

    timer: Timer


@attrs.frozen
class Sweep(Generic[W]):
    """Clear what an exited worker left: its cgroup (its process group is killed by the reaper)."""

    worker: W


@attrs.frozen
class FillStandby(Generic[W]):
    """The standby is loaded: open a spare instance on it for each proxy of the module."""

    worker: W


@attrs.frozen
class NotifyStable:
    """The module ran ``stable_after``: proxies its fallback served come home."""


@attrs.frozen
class Finished:
    """Stopped, every worker gone, nothing in flight: the supervisor is done."""


@attrs.frozen
class RecordCrash(Generic[W]):
    """A worker failed: keep a crash report (docs/operations.md, "Crash reports")."""

    worker: W
    #: What killed it, short: ``signal SIGSEGV``, ``exit status 1``, ``hung``, ``oom``...
    kind: str
    #: The reason its proxies turned invalid with.
    reason: str


Effect = (
    SetState[Any] | Log | LaunchWorker | CancelLaunch | Promote[Any] | Watch[Any] | Unwatch[Any]
    | StopWorker[Any] | KillWorker[Any] | Invalidate[Any] | StartTimer | CancelTimer | Sweep[Any]
    | FillStandby[Any] | NotifyStable | Finished | RecordCrash[Any]
)  # fmt: skip


@attrs.define
class _Ending:
    """A worker the machine is ending, and why."""

    why: Why
    #: Hung: how it was silent; not ready: what failed; stop: how clients are told.
    text: str = ""
    #: Not ready, and no retry can succeed (its code was refused): the module fails.
    final: bool = False


def _crash_kind(event: Exited[Any], ending: _Ending | None) -> str:
    """A failed worker's end in a word or two, for its crash report."""
    if ending is not None and ending.why is Why.HUNG:
        return "hung"
    if event.cause is not None:
        return event.cause.value
    return event.status.describe()


class Lifecycle(Generic[W]):
    """One module's state and workers; ``handle`` says what to do about each event."""

    __slots__ = (
        "_now",
        "_out",
        "active",
        "active_ready",
        "active_ready_at",
        "begun",
        "code",
        "code_refused",
        "ending",
        "finished",
        "halted",
        "halting",
        "launching",
        "name",
        "policy",
        "reason",
        "standby",
        "standby_allowed",
        "standby_code",
        "standby_failures",
        "standby_launching",
        "standby_ready",
        "standby_ready_at",
        "standby_waiting",
        "starts",
        "state",
        "stop_why",
        "tracker",
    )

    def __init__(
        self, name: str, policy: RestartPolicy, tracker: RestartTracker | None = None
    ) -> None:
        self.name = name
        self.policy = policy
        self.tracker = tracker if tracker is not None else RestartTracker(policy)
        self.state = WorkerState.STOPPED
        self.reason: str | None = None
        #: The worker of the current start or run (None while launching, or between runs).
        self.active: W | None = None
        #: A second worker, launched ahead of time and promoted when the active one ends.
        self.standby: W | None = None
        self.standby_ready = False
        #: The identity of the code the standby loaded (Ready.code_id), and of the module's
        #: code on disk as the supervisor last saw it (set before each event that may start
        #: a worker): a standby is promoted only while they agree (``may_promote``).
        self.standby_code: str | None = None
        self.code: str | None = None
        #: Launches in flight that have not produced a process yet.
        self.launching = False
        self.standby_launching = False
        #: Workers being ended, and why; each stays here until its exit is fed back.
        self.ending: dict[W, _Ending] = {}
        #: Set by Stop: how the module's clients are told (None: not stopping).
        self.stop_why: str | None = None
        self.standby_allowed = False
        #: Standbys in a row that ended on their own (reset by a promotion, a restart, or
        #: one that stayed loaded ``stable_after``), and whether the next one waits for
        #: its backoff (Timer.STANDBY); when the last one said READY.
        self.standby_failures = 0
        self.standby_waiting = False
        self.standby_ready_at: float | None = None
        #: A worker's code was refused: no standby is loaded until a restart is asked for.
        self.code_refused = False
        #: Whether the active worker said READY (its end then reads as a run's, not a start's).
        self.active_ready = False
        #: When the active worker said READY (or was promoted): how long it served.
        self.active_ready_at: float | None = None
        self.finished = False
        #: The operator stopped it (Halt): nothing starts until Resume or Restart.
        self.halted = False
        #: A Halt's workers are still ending: once they are gone it is stopped (or, resumed
        #: meanwhile, starts).
        self.halting = False
        #: Start came (the supervisor runs): before it, a Resume only lifts the halt.
        self.begun = False
        self.starts = 0
        self._out: list[Effect] = []

    # --- the machine's one entry point ---------------------------------------------

    def handle(self, event: Event, now: float) -> list[Effect]:
        """The actions ``event`` calls for, in order; the state moves as it is handled."""
        self._out = []
        self._now = now
        TABLE[self.state][type(event)](self, event)
        out, self._out = self._out, []
        return out

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for (the module never starts again)."""
        return self.stop_why is not None

    def workers(self) -> list[W]:
        """Every worker the machine knows and that has not exited yet."""
        found = [w for w in (self.active, self.standby) if w is not None]
        return found + [w for w in self.ending if w not in found]

    # --- helpers ----------------------------------------------------------------------

    def _emit(self, *effects: Effect) -> None:
        self._out.extend(effects)

    def _set(self, state: WorkerState, reason: str | None = None, worker: W | None = None,
             **details: object) -> None:  # fmt: skip
        self.state = advance_worker(self.state, state)
        self.reason = reason
        self._emit(SetState(state, reason, worker, dict(details)))

    def _log(self, level: str, event: str, worker: W | None = None, **fields: object) -> None:
        caller = sys._getframe(1)  # the record's call site, as logging would find it
        code = caller.f_code
        origin = (code.co_filename, caller.f_lineno, code.co_name)
        self._emit(Log(level, event, {"module": self.name, **fields}, worker, origin))

    def _end(self, worker: W, why: Why, text: str = "", *, polite: bool = False,
             exiting: bool = False, kill: bool = False, final: bool = False) -> None:  # fmt: skip
        """Start ending ``worker`` (once: a later reason does not restart its stop)."""
        if worker in self.ending:
            return
        self.ending[worker] = _Ending(why, text, final)
        if worker is self.active:
            self._emit(Unwatch(worker))
        self._emit(KillWorker(worker) if kill else StopWorker(worker, polite, exiting))

    def _idle(self) -> bool:
        """No worker left and no launch in flight."""
        return not (self.active is not None or self.standby is not None or self.ending
                    or self.launching or self.standby_launching)  # fmt: skip

    def _settle(self) -> None:
        """After a worker or launch is gone: finish a stop, or settle a halt, once idle."""
        self._finish_if_idle()
        if not self.halting or self.stopping or not self._idle():
            return
        self.halting = False
        if self.halted:
            self._set(WorkerState.STOPPED, HALT_REASON)
        else:  # started again while its halt still ended workers
            self._start()

    def _finish_if_idle(self) -> None:
        if self.stopping and not self.finished and self._idle():
            self.finished = True
            if self.state is WorkerState.STOPPED:  # stopped before it ever started
                self.reason = self.stop_why
            else:
                self._set(WorkerState.STOPPED, self.stop_why)
            self._emit(Finished())

    def _want_standby(self) -> bool:
        return (self.policy.standby and self.standby_allowed and not self.stopping
                and not self.halted and not self.halting and not self.code_refused
                and not self.standby_waiting
                and self.state is WorkerState.RUNNING and self.standby is None
                and not self.standby_launching)  # fmt: skip

    def _maybe_standby(self) -> None:
        if self._want_standby():
            self.standby_launching = True
            self._emit(LaunchWorker(standby=True))

    def _start(self) -> None:
        """A new start: promote a loaded standby at once, else launch a worker."""
        self._set(WorkerState.STARTING)
        self.starts += 1
        self.active_ready = False
        self.tracker.started(self._now)
        standby = self.standby
        if standby is not None and self.standby_ready and not may_promote(self.standby_code,
                                                                          self.code):  # fmt: skip
            # It loaded other code than the disk holds now: a fresh worker loads that.
            self.standby, self.standby_ready = None, False
            self._log("info", "worker.standby_stale", standby, standby_code=self.standby_code,
                      code_id=self.code)  # fmt: skip
            self._end(standby, Why.RETIRED, polite=True)
        elif standby is not None and self.standby_ready:
            self.standby, self.standby_ready, self.active = None, False, standby
            self.standby_failures = 0  # its module loads: the next standby starts afresh
            self._emit(Promote(standby))
            self._log("info", "worker.ready", standby, standby=True)
            self._running(standby)
            return
        self.launching = True
        self._emit(LaunchWorker())

    def _standby_failed(self, worker: W) -> None:
        """A standby ended on its own: the next one waits, longer after each in a row.

        The restart policy's backoff (``initial_delay`` times ``multiplier`` per
        failure, up to ``max_delay``): forks, loads and log lines stay bounded
        however its module makes every standby die.
        """
        ready_at = self.standby_ready_at
        if ready_at is not None and self._now - ready_at >= self.policy.stable_after.seconds:
            self.standby_failures = 0  # it served as a standby long enough: a new fault
        self.standby_failures += 1
        delay = backoff(self.policy, self.standby_failures)
        self._log("warning", "worker.standby_exited", worker, retry_in=round(delay, 4),
                  consecutive_failures=self.standby_failures)  # fmt: skip
        self.standby_waiting = True
        self._emit(StartTimer(Timer.STANDBY, delay))

    def _running(self, worker: W) -> None:
        self.active_ready, self.active_ready_at = True, self._now
        self._set(WorkerState.RUNNING, None, worker)
        self._emit(Watch(worker), StartTimer(Timer.STABLE, self.policy.stable_after.seconds))
        self._maybe_standby()

    def _served(self, event: Exited[W], ending: _Ending | None) -> bool:
        """Whether the active worker that ended served: ready ``served_after``, then died.

        Only a death of its own counts (a crash, a signal from outside, an OOM
        kill): one the machine ended (hung, not ready) or killed for breaking
        the protocol or a seccomp filter did not serve, however long it ran.
        A run of ``stable_after`` served, whatever ``served_after`` says.
        """
        ready_at = self.active_ready_at
        enough = min(self.policy.served_after.seconds, self.policy.stable_after.seconds)
        return (self.active_ready and ready_at is not None and ending is None
                and event.cause not in (Cause.SECCOMP, Cause.PROTOCOL)
                and self._now - ready_at >= enough)  # fmt: skip

    def _after_end(self, reason: str, failure: str | None, *, requested: bool,
                   refused: bool = False, served: bool = False) -> None:  # fmt: skip
        """The active worker ended (or never came): restart now, later, or not at all."""
        decision = self.tracker.ended(self._now, failed=failure is not None, requested=requested,
                                      served=served)  # fmt: skip
        promote = self.policy.promote_at_once and self.standby is not None and self.standby_ready
        if refused and failure:  # its code was refused: the same code would be refused again
            self._set(WorkerState.FAILED, f"{reason}; not restarted (its code is refused: "
                      "sign it anew and reload, or restore it and restart the module)")  # fmt: skip
        elif decision.action is Action.STOP:
            final = WorkerState.FAILED if failure else WorkerState.EXITED
            text = f"{reason}; not restarted ({decision.reason})"
            if self.state is not final:
                self._set(final, text)
            else:
                self.reason = text
        elif decision.action is Action.COOLDOWN:
            self._set(WorkerState.COOLDOWN, f"{reason}; {decision.reason}",
                      retry_in=decision.delay)  # fmt: skip
            self._log("error", "module.cooldown", reason=reason, retry_in=decision.delay,
                      failures=decision.reason)  # fmt: skip
            self._emit(StartTimer(Timer.RESTART, decision.delay))
        elif decision.delay > 0 and promote:  # the standby started already: no start to pace
            self._log("info", "module.backoff_skipped", delay=round(decision.delay, 4),
                      consecutive_failures=self.tracker.consecutive, standby=True)  # fmt: skip
            self._start()
        elif decision.delay > 0:
            self._set(WorkerState.BACKOFF, reason, delay=round(decision.delay, 4))
            self._log("info", "module.backoff", delay=round(decision.delay, 4),
                      consecutive_failures=self.tracker.consecutive)  # fmt: skip
            self._emit(StartTimer(Timer.RESTART, decision.delay))
        else:
            self._start()

    def _exit_reason(self, event: Exited[W], ending: _Ending | None) -> tuple[str, str | None]:
        """The active worker's end as its clients read it, and the failure it counts as (logged)."""
        status = event.status
        said = status.describe()
        fields: dict[str, object] = dict(status.log_fields())
        name, level, failed = "worker.exited", "error", True
        if self.stopping or (ending is not None and ending.why in (Why.STOP, Why.RESTART)):
            asked = self.stop_why if self.stop_why is not None else "restarting"
            if self.stop_why is None and ending is not None and ending.why is Why.STOP:
                asked = ending.text or HALT_REASON
            level, failed = "info", False
            if self.active_ready:
                reason = f"module {self.name} {asked} ({said})"
            else:
                fields["ready"] = False
                reason = f"module {self.name} {asked} before its worker was ready ({said})"
        elif ending is not None and ending.why is Why.HUNG:
            fields["cause"] = "hung"
            reason = ending.text
        elif event.cause is Cause.PROTOCOL:
            fields.update(cause="protocol", violation=event.detail)
            reason = f"protocol: killed for breaking the protocol: {event.detail} ({said})"
        elif not self.active_ready:
            failure = ending.text if ending is not None else "exited before it was ready"
            name, fields["reason"] = "worker.start_failed", failure
            reason = f"failed to start: {failure} ({said})"
        elif event.cause is Cause.SECCOMP:
            fields["cause"] = "seccomp"
            reason = f"seccomp: killed for a forbidden system call (an escape attempt?) ({said})"
        elif event.cause is Cause.OOM:
            fields.update(cause="oom", memory_max=event.memory_max)
            reason = (f"oom: over its memory limit ({event.memory_max} bytes), "
                      f"killed by the kernel ({said})")  # fmt: skip
        else:
            reason = f"worker exited with {said}"
            if status.clean:
                level, failed = "info", False
        if failed and event.in_flight and not (ending is not None and ending.why is Why.HUNG):
            fields["method"] = event.in_flight
            reason = f"{reason} in {event.in_flight}"
        self._log(level, name, event.worker, **fields)
        return reason, reason if failed else None

    # --- the answers, by event --------------------------------------------------------

    def _on_start(self, _: Start) -> None:
        self.begun = True
        if not self.stopping and not self.halted:  # a supervisor runs once: stopped is for good
            self._start()

    def _ignore(self, _: object) -> None:
        """Nothing to do in this state: the event is stale, or already answered."""

    def _on_launched(self, event: Launched[W]) -> None:
        worker = event.worker
        if event.standby:
            self.standby_launching = False
            if self.stopping or self.halting or self.standby is not None:
                self.ending[worker] = _Ending(Why.RETIRED)
                self._emit(StopWorker(worker))
            else:
                self.standby, self.standby_ready = worker, False
            return
        self.launching = False
        if self.stopping or self.state is not WorkerState.STARTING or self.active is not None:
            self.ending[worker] = _Ending(Why.STOP, self.stop_why or HALT_REASON)
            self._emit(StopWorker(worker))
            return
        self.active = worker

    def _on_launch_failed(self, event: LaunchFailed) -> None:
        if event.standby:
            self.standby_launching = False
            if not self.stopping and not self.halting:
                self._log("warning", "worker.standby_failed", error=event.reason)
            self._settle()
            return
        self.launching = False
        if self.stopping or self.halting:
            self._settle()
            return
        if self.state is not WorkerState.STARTING or self.active is not None:
            return  # a launch abandoned by a restart: the new start runs already
        self._log("error", "worker.spawn_failed", error=event.reason)
        self._set(WorkerState.EXITED, event.reason)
        self._after_end(event.reason, event.reason, requested=False)

    def _on_ready(self, event: Ready[W]) -> None:
        worker = event.worker
        if worker is self.standby and not self.standby_ready:
            self.standby_ready, self.standby_ready_at = True, self._now
            self.standby_code = event.code_id
            self._log("info", "worker.standby_ready", worker)
            if self.state is WorkerState.BACKOFF and self.policy.promote_at_once:
                # Loaded while a start waits out its backoff: it is that start, now.
                self._log("info", "module.backoff_skipped", standby=True,
                          consecutive_failures=self.tracker.consecutive)  # fmt: skip
                self._emit(CancelTimer(Timer.RESTART))
                self._start()
                return
            self._emit(FillStandby(worker))
            return
        if worker is not self.active or worker in self.ending or self.stopping:
            return  # ready as it is being ended: never announced running
        if self.state is WorkerState.STARTING:
            self._log("info", "worker.ready", worker)
            self._running(worker)

    def _on_load_failed(self, event: LoadFailed[W]) -> None:
        worker = event.worker
        self.code_refused = self.code_refused or event.final
        if worker is self.standby and not self.standby_ready:
            self.standby = None
            self._log("warning", "worker.standby_failed", worker, error=event.reason)
            self._end(worker, Why.RETIRED, exiting=event.exiting)
            return
        if worker is self.active and self.state is WorkerState.STARTING:
            self._end(worker, Why.NOT_READY, event.reason, exiting=event.exiting,
                      final=event.final)  # fmt: skip

    def _on_exited(self, event: Exited[W]) -> None:
        worker = event.worker
        self._emit(Sweep(worker))
        ending = self.ending.pop(worker, None)
        if worker is self.standby:
            self.standby, self.standby_ready = None, False
            if ending is None and not self.stopping and not self.halting:
                self._emit(RecordCrash(worker, _crash_kind(event, None), "standby exited with "
                                       f"{event.status.describe()}"))  # fmt: skip
                self._standby_failed(worker)
            self._maybe_standby()
            self._settle()
            return
        if worker is not self.active:
            self._settle()  # one the machine was ending already (a retired standby)
            return
        self.active = None
        if ending is None:
            self._emit(Unwatch(worker))
        self._emit(CancelTimer(Timer.STABLE))
        requested = ending is not None and ending.why is Why.RESTART
        reason, failure = self._exit_reason(event, ending)
        if failure is not None:
            self._emit(RecordCrash(worker, _crash_kind(event, ending), reason))
        self._emit(Invalidate(worker, reason))
        self._set(WorkerState.EXITED, reason, worker, **event.status.log_fields())
        if self.stopping:
            self._finish_if_idle()
            if not self.finished:  # a standby still to go: it is still stopping
                self._set(WorkerState.STOPPING, "stopping")
            return
        if self.halting:  # the operator stopped it: no restart
            if not self._idle():  # a standby still to go
                self._set(WorkerState.STOPPING, "stopping")
            self._settle()
            return
        self._after_end(reason, failure, requested=requested,
                        refused=ending is not None and ending.final,
                        served=self._served(event, ending))  # fmt: skip

    def _on_hung(self, event: Hung[W]) -> None:
        worker = event.worker
        if worker is not self.active or worker in self.ending:
            return
        if event.heartbeat == "call":
            limit = self.policy.call_timeout
            text = f"worker hung: a call ran longer than its call_timeout of {limit}"
            if event.in_flight:
                text = f"{text} in {event.in_flight}"
            self._log("error", "worker.hung", worker, heartbeat="call", reason="call_timeout",
                      timeout=limit.seconds)  # fmt: skip
            self._end(worker, Why.HUNG, text, kill=True)
            return
        silence = ("its heartbeat counter did not move" if event.heartbeat == "board"
                   else "no heartbeat reply")  # fmt: skip
        text = f"worker hung: {silence} within {self.policy.heartbeat_timeout}"
        if event.in_flight:
            text = f"{text} in {event.in_flight}"
        self._log("error", "worker.hung", worker, heartbeat=event.heartbeat,
                  timeout=self.policy.heartbeat_timeout.seconds)  # fmt: skip
        self._end(worker, Why.HUNG, text, kill=True)

    def _on_timer(self, event: TimerFired) -> None:
        if event.timer is Timer.STANDBY:
            self.standby_waiting = False
            self._maybe_standby()
            return
        if event.timer is Timer.STABLE:
            if self.state is WorkerState.RUNNING and self.active is not None:
                self._log("info", "module.stable", self.active)
                self._emit(NotifyStable())
            return
        if self.state in (WorkerState.BACKOFF, WorkerState.COOLDOWN):
            self._start()

    def _on_restart(self, _: Restart) -> None:
        if self.stopping:
            return  # stopping for good: nothing starts again
        if self.halted or self.halting:  # stopped by the operator: a restart starts it
            self._on_resume(Resume())
            return
        if self.state is WorkerState.STOPPED:
            return  # not started yet: its Start comes
        self.tracker.reset()
        self.code_refused = False  # the operator asks for another try: standbys too
        self.standby_failures, self.standby_waiting = 0, False
        self._emit(CancelTimer(Timer.STANDBY))
        active = self.active
        if self.state is WorkerState.RUNNING and active is not None:
            self._log("info", "module.restart_requested", active)
            self._end(active, Why.RESTART, polite=True)
        elif self.state is WorkerState.STARTING:
            if active is not None:  # loading: start over with a fresh worker
                self._log("info", "module.restart_requested", active)
                self._emit(CancelLaunch())
                self._end(active, Why.RESTART)
            # else: the launch in flight is the fresh start the operator asked for
        else:  # backoff, cooldown, failed, exited and not restarted: start now
            self._emit(CancelTimer(Timer.RESTART))
            self._start()

    def _on_stop(self, event: Stop) -> None:
        if self.stopping:
            return  # stopping already: the first stop's reason stands
        self.stop_why = event.why
        self._end_workers(event.why)
        if self._idle():
            self._finish_if_idle()
        elif self.state is not WorkerState.STOPPING:  # not halting already
            self._set(WorkerState.STOPPING, "stopping")

    def _end_workers(self, text: str, *, over_restart: bool = False) -> None:
        """What Stop and Halt share: no timer or launch goes on, every worker ends.

        The active worker ends as stopped, with ``text`` for its clients; with
        ``over_restart`` a restart already ending it turns into this stop.
        """
        self._emit(CancelTimer(Timer.RESTART), CancelTimer(Timer.STABLE),
                   CancelTimer(Timer.STANDBY))  # fmt: skip
        if self.launching:
            self._emit(CancelLaunch())
        if self.standby_launching:
            self._emit(CancelLaunch(standby=True))
        running = self.state is WorkerState.RUNNING
        if self.active is not None:
            if self.state is WorkerState.STARTING:
                self._emit(CancelLaunch())  # its LOAD
            ending = self.ending.get(self.active)
            if over_restart and ending is not None and ending.why is Why.RESTART:
                ending.why, ending.text = Why.STOP, text
            self._end(self.active, Why.STOP, text, polite=running)
        if self.standby is not None:
            standby, self.standby, self.standby_ready = self.standby, None, False
            self._end(standby, Why.RETIRED, polite=True)

    def _on_halt(self, _: Halt) -> None:
        """The operator stops the module: its workers end, its proxies turn invalid, none starts.

        As a Stop, but not for good: Resume (or Restart) starts it again, and
        a Stop meanwhile (the daemon stops) takes over.
        """
        if self.stopping or self.halted:
            return
        self.halted = self.halting = True
        self._log("info", "module.stop_requested", reason=HALT_REASON)
        self.standby_waiting = False
        self._end_workers(HALT_REASON, over_restart=True)
        if not self._idle():
            if self.state is not WorkerState.STOPPING:
                self._set(WorkerState.STOPPING, "stopping")
            return
        self.halting = False
        if self.state is WorkerState.STOPPED:  # not started yet: it will not be
            self.reason = HALT_REASON
        else:
            self._set(WorkerState.STOPPED, HALT_REASON)

    def _on_resume(self, _: Resume) -> None:
        """The operator starts the module: a halted one starts; one waiting starts now.

        Started while its halt still ends workers, it starts once they are gone.
        """
        if self.stopping or (self.halting and not self.halted):
            return  # stopping for good; or started already, once its workers are gone
        if not self.halted:
            if self.state in (WorkerState.BACKOFF, WorkerState.COOLDOWN, WorkerState.FAILED,
                              WorkerState.EXITED):  # fmt: skip
                self._on_restart(Restart())  # as `systemctl start` of a failed unit
            return  # running or starting already; or not started yet (its Start comes)
        self.halted = False
        self._log("info", "module.start_requested")
        self.tracker.reset()
        self.code_refused = False
        self.standby_failures = 0
        if not self.halting and self.begun:  # not begun: its Start starts it
            self._start()

    def _on_allow_standby(self, _: AllowStandby) -> None:
        self.standby_allowed = True
        self._maybe_standby()


_Handler = Callable[[Lifecycle[Any], Any], None]

#: Every state's answer to every event. Events a state has no use for are ignored on
#: purpose (a stale timer, a worker the machine ended already): none is unanswered.
_COMMON: dict[type, _Handler] = {
    Launched: Lifecycle._on_launched,
    LaunchFailed: Lifecycle._on_launch_failed,
    Ready: Lifecycle._on_ready,
    LoadFailed: Lifecycle._on_load_failed,
    Exited: Lifecycle._on_exited,
    Hung: Lifecycle._on_hung,
    TimerFired: Lifecycle._on_timer,
    Restart: Lifecycle._on_restart,
    Stop: Lifecycle._on_stop,
    AllowStandby: Lifecycle._on_allow_standby,
    Start: Lifecycle._ignore,
    Halt: Lifecycle._on_halt,
    Resume: Lifecycle._on_resume,
}

TABLE: dict[WorkerState, dict[type, _Handler]] = {state: dict(_COMMON) for state in WorkerState}
# Not started yet: only Start starts it; a stop ends it before it began.
TABLE[WorkerState.STOPPED] = {**dict.fromkeys(_COMMON, Lifecycle._ignore),
                              Start: Lifecycle._on_start, Stop: Lifecycle._on_stop,
                              AllowStandby: Lifecycle._on_allow_standby,
                              # Stopped by the operator: started again by Resume or Restart.
                              Halt: Lifecycle._on_halt, Resume: Lifecycle._on_resume,
                              Restart: Lifecycle._on_restart,
                              # A stopped module still hears of the workers it was ending.
                              Exited: Lifecycle._on_exited, Launched: Lifecycle._on_launched,
                              LaunchFailed: Lifecycle._on_launch_failed}  # fmt: skip
# Stopping: the ends it waits for still come in. Stopping for good, a restart or a second
# stop changes nothing; stopping for the operator (Halt), a Stop takes over and a Restart or
# Resume has it start once they are in (each handler tells the two apart).
TABLE[WorkerState.STOPPING] = dict(_COMMON)
