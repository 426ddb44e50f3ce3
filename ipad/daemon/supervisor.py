"""One module's supervision: the lifecycle machine (ipad/daemon/lifecycle.py), carried out.

Everything that happens to the module -- a worker launched, ready, exited
(the reaper, ipad/daemon/children.py), hung (the heartbeat task), a timer (one
task for all of them), an operator's restart or stop -- is posted here as
an event. The machine answers with actions, which this carries out: most at
once (publish a state, signal a worker, invalidate proxies, set a timer),
the few that wait (launch and load a worker, stop one within its grace) as
short jobs in the daemon's supervision nursery, which post what they found
as events in turn. A module costs no task of its own while nothing happens.

Every worker belongs to the daemon's reaper from the moment its process
exists; the machine holds each until its exit comes back, so a stop ends
only once every one of them is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import attrs
import msgspec
import structlog
import trio

from ipad.config.check import ModulePlan
from ipad.config.code_identity import CodeTooLarge, CodeWatch, Identity, signed_identity
from ipad.config.manifest import PipelineSupport
from ipad.config.model import RestartPolicy
from ipad.config.proxy_kinds import ProxyKind
from ipad.daemon import memory_cgroup
from ipad.daemon.backoff import RestartTracker
from ipad.daemon.cgroup import clear_cgroup
from ipad.daemon.crashes import (
    CrashRecord,
    CrashRing,
    LastWords,
    crash_record,
    dump_before_kill,
    read_last_words,
)
from ipad.daemon.heartbeat import Heartbeats
from ipad.daemon.launcher import Launcher
from ipad.daemon.lifecycle import (
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
from ipad.daemon.log_setup import CALLSITE
from ipad.daemon.metrics import MetricsRegistry, restart_reason
from ipad.daemon.modlog import daemon_log_level
from ipad.daemon.proxy_table import ProxyTable
from ipad.daemon.reactor import Flag, TimerHandle, Timers
from ipad.daemon.sandbox_status import measures
from ipad.daemon.states import ProxyState, WorkerState
from ipad.daemon.worker_process import KILL_WAIT, WorkerCrashed, WorkerProcess
from ipad.protocol import wire as p
from ipad.protocol.fdpass import sized_socketpair

log = structlog.get_logger("ipad")

#: Longest a new standby waits for the clients of a just-promoted worker to recover:
#: forking and loading it would compete with them for the CPU (two cores here).
STANDBY_DEFER = 0.1

#: How often an idle standby beats on its board: nobody watches it until it is promoted,
#: and 200 standbys waking once a second cost 1 % of a CPU between them.
STANDBY_BEAT = 3600.0

#: The signal a seccomp filter's SECCOMP_RET_KILL_PROCESS ends a process with.
SIGSYS = signal.SIGSYS

#: Standbys launched at once, daemon-wide. They are background work: 200 modules' standbys
#: launched together competed with each other for the CPU, and their transient memory
#: (each launch's frames and messages) left the daemon 3.5 KiB per module bigger for good.
STANDBY_LAUNCHES = 2 * (os.cpu_count() or 1)

#: How long a dead worker's cgroup v1 memory cgroup may take to empty before it is left.
MEMORY_CGROUP_WAIT = 2.0

#: Exited workers whose board contents wait for their crash to be recorded (or not).
LAST_WORDS_KEPT = 4

#: States a module enters because its worker failed: their reason is its last failure.
FAILURE_STATES = frozenset(
    {WorkerState.EXITED, WorkerState.BACKOFF, WorkerState.COOLDOWN, WorkerState.FAILED}
)


class ModuleUnavailable(Exception):
    """The module's worker is not running, so no instance can be opened; says why."""


class WorkerGone(ModuleUnavailable):
    """The worker ended while it was asked to open an instance (crashed, or killed as hung)."""


@attrs.frozen
class Shared:
    """What every module's supervisor uses of the daemon's own."""

    proxies: ProxyTable
    launcher: Launcher
    heartbeats: Heartbeats
    timers: Timers
    #: How many standbys may be launched at once, daemon-wide (``STANDBY_LAUNCHES``).
    standbys: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(STANDBY_LAUNCHES)
    )
    #: Every module's metrics, kept across supervisors (ipad/daemon/metrics.py).
    metrics: MetricsRegistry = attrs.field(factory=MetricsRegistry)


class ModuleSupervisor:
    """Runs one module's worker and keeps its state and its proxies' validity true."""

    __slots__ = (
        "_balancing",
        "_code_error",
        "_down_since",
        "_finished",
        "_first_state",
        "_handling",
        "_instance_ids",
        "_last_code",
        "_last_words",
        "_launches",
        "_loading",
        "_nursery",
        "_on_stable",
        "_preload_spec",
        "_queue",
        "_ready",
        "_timers",
        "code",
        "crashes",
        "env",
        "events",
        "fallback",
        "heartbeats",
        "kind",
        "last_exit",
        "last_failure",
        "launcher",
        "machine",
        "metrics",
        "name",
        "plan",
        "policy",
        "proxies",
        "running_since",
        "standbys",
        "state_since",
        "timers",
        "tracker",
    )

    def __init__(
        self,
        plan: ModulePlan,
        policy: RestartPolicy,
        kind: ProxyKind,
        env: Mapping[str, str],
        shared: Shared,
        fallback: str | None = None,
        on_stable: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        #: The daemon's one heartbeat task, which watches this module's running worker.
        self.heartbeats = shared.heartbeats
        self.timers = shared.timers
        self.standbys = shared.standbys
        #: The module that serves this one's proxies while it is in cooldown.
        self.fallback = fallback
        self._on_stable = on_stable
        self.plan = plan
        self.name = plan.name
        self.policy = policy
        self.kind = kind
        self.env = dict(env)
        self.events = shared.proxies.events
        self.proxies = shared.proxies
        self.launcher = shared.launcher
        self.tracker = RestartTracker(policy)
        self.machine: Lifecycle[WorkerProcess] = Lifecycle(plan.name, policy, self.tracker)
        #: How the last active worker ended (for systemd's status line).
        self.last_exit: ExitStatus | None = None
        self.running_since: float | None = None
        #: The state last published and when (trio clock) it began, for its status.
        self.state_since: tuple[WorkerState, float] | None = None
        #: The last failure's reason and wall-clock time: kept through a recovery, so
        #: ``ipadctl status`` can say what went wrong after the module runs again.
        self.last_failure: tuple[str, float] | None = None
        self._instance_ids = itertools.count(1)
        self._queue: list[Event] = []
        self._handling = False
        #: The daemon's nursery, where this module's jobs run (set by ``begin``).
        self._nursery: trio.Nursery | None = None
        #: Cancel scopes of the launches in flight, by standby.
        self._launches: dict[bool, trio.CancelScope] = {}
        self._timers: dict[Timer, TimerHandle] = {}
        self._first_state = Flag()
        self._finished = Flag()
        self._balancing = False
        #: Workers whose LOAD is under way, and their exit if it came meanwhile.
        self._loading: dict[WorkerProcess, Exited[WorkerProcess] | None] = {}
        #: The last READY a worker of this module sent (``_same_ready``).
        self._ready: p.Ready | None = None
        #: The module's code on disk: its identity, hashed anew only when its files moved.
        self.code = CodeWatch(plan.source)
        #: The code identity of the module's last worker (launched, ready or promoted), in a
        #: 1-tuple; None: no worker yet.
        self._last_code: tuple[str | None] | None = None
        #: Why the code has no identity (past the hashing bounds), once logged.
        self._code_error: str | None = None
        entry = plan.source.manifest.entry_point or ""
        #: How the fork server names this module's code if it preloads it.
        self._preload_spec = f"{plan.source.directory.resolve()}:{entry.partition(':')[0]}"
        #: Recent crash reports (ipad/daemon/crashes.py), for ``ipadctl crashes``; made at
        #: the first crash (most modules never crash, and an empty ring costs 0.6 KiB).
        self.crashes: CrashRing | None = None
        #: What exited workers left on their boards, until their crash is recorded (a few).
        self._last_words: dict[WorkerProcess, LastWords | None] | None = None
        self.metrics = shared.metrics.module(plan.name)
        #: When the worker last ended for a restart, until one runs again (its recovery time).
        self._down_since: float | None = None

    # --- what the rest of the daemon reads --------------------------------------------

    @property
    def state(self) -> WorkerState:
        """The module's state (the machine's)."""
        return self.machine.state

    @property
    def reason(self) -> str | None:
        """Why it is in that state, where there is more to say."""
        return self.machine.reason

    @property
    def worker(self) -> WorkerProcess | None:
        """The active worker: starting, running or being ended."""
        return self.machine.active

    @property
    def worker_pid(self) -> int | None:
        """The active worker's pid, if there is one."""
        worker = self.machine.active
        return worker.pid if worker is not None else None

    @property
    def running_pid(self) -> int | None:
        """The pid of the worker serving now: None unless the module is running."""
        return self.worker_pid if self.state is WorkerState.RUNNING else None

    @property
    def pipelines(self) -> PipelineSupport:
        """Which pipelines and versions the module's manifest says it serves."""
        return self.plan.source.manifest.pipeline

    @property
    def start_timeout(self) -> float:
        """How long a start may take, in seconds: also how long a client waits for one."""
        return self.policy.start_timeout.seconds

    @property
    def call_timeout(self) -> float:
        """Every call's deadline (seconds) unless the caller gives one: PROXY_GRANTED says it."""
        return self.policy.call_timeout.seconds

    @property
    def cooldown_interval(self) -> float:
        """How long a module that failed too often waits before it is tried again, in seconds."""
        return self.policy.cooldown_interval.seconds

    @property
    def ready(self) -> p.Ready | None:
        """What the active worker said when it became ready."""
        worker = self.machine.active
        return worker.ready if worker is not None else None

    @property
    def last_ready(self) -> p.Ready | None:
        """What the last worker that became ready said, even if none runs now (DESCRIBE)."""
        return self._ready

    @property
    def starts(self) -> int:
        """How many starts there were (a standby's promotion is one)."""
        return self.machine.starts

    @property
    def settled(self) -> bool:
        """Its first start came to a result (running, or failed), or it stopped."""
        return self._first_state.is_set()

    @property
    def finished(self) -> bool:
        """Stopped for good, every worker gone."""
        return self._finished.is_set()

    def stop_requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.machine.stopping

    def status(self) -> dict[str, object]:
        """The module's state for ``ipadctl status``."""
        running = self.state is WorkerState.RUNNING
        machine = self.machine
        standby = machine.standby if machine.standby_ready else None
        return {
            "state": self.state.value,
            "reason": self.reason,
            "valid": running,
            "worker_pid": self.worker.pid if running and self.worker else None,
            "version": self.ready.version if self.ready else self.plan.source.manifest.version,
            "starts": self.starts,
            "restarts": max(self.starts - 1, 0),
            "consecutive_failures": self.tracker.consecutive,
            "standby_pid": standby.pid if standby is not None else None,
            "standby_instances": len(standby.spares) if standby is not None else 0,
            **self.code_status(running, standby),
            "proxies": len(self.proxies.of_module(self.name)),
            "proxy_kind": self.kind.name,
            "isolation": "module",
            "worker": str(self.plan.worker),
            "tuning": str(self.plan.tuning),
            "sandbox": self._sandbox_status(),
            **self.status_times(),
        }

    def code_status(self, running: bool, standby: WorkerProcess | None) -> dict[str, object]:
        """``code_id`` of the running worker and ``standby_code_id`` of the loaded standby.

        None where there is no such worker, or its code is unknown (it changed
        while it loaded, or is past the hashing bounds: ``code_error`` says).
        """
        worker = self.worker
        return {
            "code_id": worker.code_id if running and worker is not None else None,
            "standby_code_id": standby.code_id if standby is not None else None,
            "code_error": self._code_error,
        }

    def identify_code(self) -> Identity | None:
        """The identity of the module's code on disk now (stat-cheap unless it changed).

        None past the hashing bounds: logged once, and said in ``code_error``. A signed
        module's is that of its signed files, the only code its workers import.
        """
        if self.plan.signed is not None:
            return signed_identity(self.plan.source, self.plan.signed)
        try:
            identity = self.code.identify()
        except CodeTooLarge as exc:
            if self._code_error != str(exc):
                log.error("module.code_too_large", module=self.name, error=str(exc),
                          consequence="no code identity: standbys promoted unchecked")  # fmt: skip
            self._code_error = str(exc)
            return None
        self._code_error = None
        return identity

    def code_changed(self) -> bool:
        """Whether the code on disk is not what the module's worker loaded (for a reload).

        The worker running, else the last one launched; a module none of whose
        workers ever loaded has nothing to compare.
        """
        if self._last_code is None:
            return False
        identity = self.identify_code()
        return (identity.code_id if identity is not None else None,) != self._last_code

    def _sandbox_status(self) -> dict[str, object] | None:
        """The measures in force for the running worker, read from /proc (None: no sandbox)."""
        worker = self.worker
        if self.plan.sandbox is None:
            return None
        if worker is None or worker.sandbox is None or self.state is not WorkerState.RUNNING:
            return {"in_force": None}
        found = measures(worker.pid, worker.sandbox, worker.memory_cgroup)
        unavailable = {u.measure: u.reason for u in self.plan.unavailable}
        return {"in_force": found, "unavailable": unavailable}

    # --- the operations ---------------------------------------------------------------

    def begin(self, nursery: trio.Nursery) -> None:
        """Start supervising: the module's jobs run in ``nursery``, which outlives it."""
        self._nursery = nursery
        self.post(Start())

    async def wait_first_state(self) -> None:
        """Return once the first start has succeeded or failed (or the module stopped)."""
        await self._first_state.wait()

    def allow_standby(self) -> None:
        """Every module has started (the daemon says): standbys may be prepared from now on."""
        self.post(AllowStandby())

    def restart(self) -> None:
        """``ipadctl restart``: restart now, ending any backoff or cooldown."""
        self.post(Restart())

    def request_stop(self, why: str = "stopped") -> None:
        """Stop for good; ``why`` goes into the reason its proxies turn invalid with."""
        self.post(Stop(why))

    def halt(self) -> None:
        """``ipadctl stop MODULE``: its workers end, none starts until ``resume`` or ``restart``."""
        self.post(Halt())
        if self.machine.halted:
            self._first_state.set()  # stopped by the operator is where its start came to

    def resume(self) -> None:
        """``ipadctl start MODULE``: start it again (or now, from a backoff or cooldown)."""
        self.post(Resume())

    @property
    def halted(self) -> bool:
        """Stopped by the operator, and not started since."""
        return self.machine.halted

    def halt_settled(self) -> bool:
        """Stopped by the operator and every worker of it gone."""
        return self.machine.halted and not self.machine.halting

    async def stop(self, why: str = "stopped") -> None:
        """Stop for good and wait until every worker of the module is gone.

        Bounded: each worker gets ``stop_timeout``, then SIGKILL and the time
        the kernel needs to reap it.
        """
        self.request_stop(why)
        with trio.move_on_after(self.policy.stop_timeout.seconds + KILL_WAIT):
            await self._finished.wait()
        if not self._finished.is_set():
            log.error("module.stop_timed_out", module=self.name,
                      workers=[w.pid for w in self.machine.workers()])  # fmt: skip

    async def wait_finished(self) -> None:
        """Until the module stopped for good (no bound: the caller sets one)."""
        await self._finished.wait()

    # --- events in, effects out -------------------------------------------------------

    def post(self, event: Event) -> None:
        """Feed ``event`` to the machine and carry out what it says, now.

        Events posted while effects are being carried out (an effect that
        learns something at once) queue behind, in order.
        """
        may_start = isinstance(event, Start | Restart | Exited | LaunchFailed) or (
            isinstance(event, TimerFired) and event.timer is Timer.RESTART
        )
        if may_start and self.machine.standby_ready:
            # A standby may be promoted: only if it loaded the code on disk (a few stats
            # while the files are unchanged; a launch without one hashes them itself).
            identity = self.identify_code()
            self.machine.code = identity.code_id if identity is not None else None
        self._queue.append(event)
        if self._handling:
            return
        self._handling = True
        try:
            while self._queue:
                current = self._queue.pop(0)
                self._count_restart(current)
                for effect in self.machine.handle(current, trio.current_time()):
                    self._carry_out(effect)
        finally:
            self._handling = False

    def _count_restart(self, event: Event) -> None:
        """Count a restart by reason, and when the module went down (ipad/daemon/metrics.py).

        A stop, the operator's too, ends the outage: a start after it is no recovery.
        """
        if isinstance(event, Stop | Halt):
            self._down_since = None
        reason = restart_reason(self.machine, event)
        if reason is not None:
            self.metrics.restarts[reason] += 1
            if self._down_since is None:
                self._down_since = trio.current_time()

    def _note_recovery(self, state: WorkerState) -> None:
        """Running again after a restart: the metrics' crash-to-running time."""
        if state is WorkerState.RUNNING and self._down_since is not None:
            self.metrics.recovered(trio.current_time() - self._down_since)
            self._down_since = None

    def _carry_out(self, effect: Effect) -> None:  # noqa: PLR0912 - one arm per action
        match effect:
            case SetState():
                self._note_recovery(effect.state)
                self._publish(effect)
            case Log(level=level, event=event, fields=fields, worker=worker, origin=origin):
                extra: dict[str, object] = {CALLSITE: origin}
                if worker is not None:
                    extra["worker_pid"] = worker.pid
                    if event == "worker.ready":
                        extra["version"] = worker.ready.version if worker.ready else None
                getattr(log, level)(event, **fields, **extra)
            case LaunchWorker(standby=standby):
                self._job(self._launch, standby, guarded=True)
            case CancelLaunch(standby=standby):
                scope = self._launches.get(standby)
                if scope is not None:
                    scope.cancel()
            case Promote(worker=worker):
                self._last_code = (worker.code_id,)
                self._job(self._promote, worker)
            case Watch(worker=worker):
                self.metrics.track(worker, trio.current_time())
                policy = self.policy
                self.heartbeats.watch(worker, policy.heartbeat_interval.seconds,
                                      policy.heartbeat_timeout.seconds, self._hung,
                                      policy.call_timeout.seconds)  # fmt: skip
            case Unwatch(worker=worker):
                self.heartbeats.forget(worker)
            case StopWorker(worker=worker, polite=polite, exiting=exiting):
                self._job(worker.stop, self.policy.stop_timeout.seconds, polite=polite,
                          exiting=exiting)  # fmt: skip
            case KillWorker(worker=worker):
                worker.kill()
            case Invalidate(worker=worker, reason=reason):
                self._invalidate(worker, reason)
            case StartTimer(timer=timer, delay=delay):
                self._cancel_timer(timer)
                self._timers[timer] = self.timers.call_later(
                    delay, lambda: self.post(TimerFired(timer))
                )
            case CancelTimer(timer=timer):
                self._cancel_timer(timer)
            case Sweep(worker=worker):
                self._sweep(worker)
            case FillStandby():
                self._balance_spares()
            case NotifyStable():
                if self._on_stable is not None:
                    self._job(self._on_stable, self.name)
            case RecordCrash(worker=worker, kind=kind, reason=reason):
                self._record_crash(worker, kind, reason)
            case Finished():
                for timer in list(self._timers):
                    self._cancel_timer(timer)
                self._first_state.set()
                self._finished.set()

    def _note_state(self, state: WorkerState, reason: str | None) -> None:
        """Remember when the state began and, for a failure, why (``status_times``)."""
        if self.state_since is None or self.state_since[0] is not state:
            self.state_since = (state, trio.current_time())
        if state in FAILURE_STATES and reason:
            self.last_failure = (reason, time.time())

    def status_times(self) -> dict[str, object]:
        """Seconds in the state, uptime of the running worker, and the last failure."""
        now = trio.current_time()
        failure = self.last_failure
        since = self.state_since
        return {
            "state_seconds": round(now - since[1], 3) if since else None,
            "uptime": round(now - self.running_since, 3)
            if self.running_since is not None and self.state is WorkerState.RUNNING
            else None,
            "last_failure_reason": failure[0] if failure else None,
            "last_failure_at": failure[1] if failure else None,
        }

    def _publish(self, change: SetState[WorkerProcess]) -> None:
        state = change.state
        worker = change.worker
        self._note_state(state, change.reason)
        if state is WorkerState.RUNNING:
            self.running_since = trio.current_time()
        elif state is not WorkerState.STARTING:
            self.running_since = None
        if state not in (WorkerState.STARTING, WorkerState.STOPPED):
            self._first_state.set()  # before the event: who waits on the bus sees it settled
        self.events.publish(
            "module", self.name, state=state.value, reason=change.reason,
            worker_pid=worker.pid if worker is not None else None, details=change.details,
        )  # fmt: skip

    def _job(self, function: Callable[..., Awaitable[object]], *args: object,
             guarded: bool = False, **kwargs: object) -> None:  # fmt: skip
        """Run ``function`` in the daemon's nursery; a bug in it is logged, not the daemon's end.

        ``guarded``: it logs its own bugs (a launch: every module has one in flight at
        the daemon's start, and a wrapper's frame each made the daemon bigger for good).
        """
        assert self._nursery is not None  # noqa: S101 - set by begin()

        async def job() -> None:
            try:
                await function(*args, **kwargs)
            except Exception:
                log.exception("module.job_failed", module=self.name, job=function.__name__)

        try:
            if guarded and not kwargs:
                self._nursery.start_soon(function, *args)
            else:
                self._nursery.start_soon(job)
        except RuntimeError:  # the daemon's last moments: its reaper ends what is left
            log.debug("module.job_skipped", module=self.name, job=function.__name__)

    def _cancel_timer(self, timer: Timer) -> None:
        handle = self._timers.pop(timer, None)
        if handle is not None:
            handle.cancel()

    def _hung(self, worker: WorkerProcess, how: str) -> None:
        """No beat or PONG for ``heartbeat_timeout``, or a call past ``call_timeout``: killed.

        Its stacks are asked for first (SIGUSR1, a bounded wait: ipad/daemon/crashes.py).
        """
        self._job(self._dump_then_hung, worker, how)

    async def _dump_then_hung(self, worker: WorkerProcess, how: str) -> None:
        try:
            await dump_before_kill(worker)
        finally:
            words = read_last_words(worker)
            self.post(Hung(worker, how, words.in_flight if words is not None else None))

    def crash_of(self, worker_pid: int) -> CrashRecord | None:
        """The crash report of the worker ``worker_pid``, if this module keeps one."""
        if self.crashes is None:
            return None
        return next((c for c in reversed(self.crashes.records()) if c.worker_pid == worker_pid),
                    None)  # fmt: skip

    def keep_crash(self, crash: CrashRecord) -> None:
        """Keep ``crash`` in this module's ring (made at its first crash)."""
        if self.crashes is None:
            self.crashes = CrashRing()
        self.crashes.add(crash)

    def _record_crash(self, worker: WorkerProcess, kind: str, reason: str) -> None:
        """Keep and log a crash report of ``worker`` (docs/operations.md, "Crash reports")."""
        words = self._last_words.pop(worker, None) if self._last_words is not None else None
        claim = words.claim if words is not None else None
        proxy_id = None
        if claim is not None:
            for record in self.proxies.of_module(self.name):
                if record.instance_id == claim.instance_id and record.worker_pid == worker.pid:
                    proxy_id = record.proxy_id
                    break
        crash = crash_record(self.name, worker, kind, reason, words, proxy_id)
        self.keep_crash(crash)
        log.error("worker.crash_report", module=self.name, worker_pid=crash.worker_pid,
                  kind=crash.kind, exit_status=crash.exit_status, signal=crash.signal,
                  method=crash.method, proxy_id=crash.proxy_id, stack=crash.stack)  # fmt: skip

    def _exited(self, worker: WorkerProcess) -> None:
        """The reaper reaped a worker of ours: tell the machine how it ended.

        A worker whose LOAD is being answered has its exit told after that
        answer: an ERROR it sent just before it died says why it did.
        """
        worker.drain_control()
        status = worker.exit_status
        assert status is not None  # noqa: S101 - the reaper sets it first
        cause: Cause | None = None
        memory_max: int | None = None
        if worker.violation is not None:
            cause = Cause.PROTOCOL
        elif worker.sandbox is not None and worker.sandbox.seccomp and status.signal == SIGSYS:
            cause = Cause.SECCOMP
        elif _killed_for_memory(worker, status):
            cause = Cause.OOM
            memory_max = worker.sandbox.memory_max if worker.sandbox else None
        if worker is self.machine.active:
            self.last_exit = status
        words = read_last_words(worker) if not status.clean else None
        if words is not None:
            kept = self._last_words = self._last_words or {}
            kept[worker] = words
            while len(kept) > LAST_WORDS_KEPT:  # exits that were no crash: the oldest go
                del kept[next(iter(kept))]
        in_flight = words.in_flight if words is not None else None
        exited = Exited(worker, status, cause, memory_max, worker.violation, in_flight)
        if worker in self._loading:
            self._loading[worker] = exited  # posted by its launch job, after the LOAD's answer
            return
        self.post(exited)

    # --- jobs -------------------------------------------------------------------------

    async def _launch(self, standby: bool) -> None:
        """Launch a worker and LOAD it; post exactly one of Launched or LaunchFailed first."""
        scope = self._launches[standby] = trio.CancelScope()
        worker: WorkerProcess | None = None

        def started(process: WorkerProcess) -> None:
            nonlocal worker
            worker = process
            self.post(Launched(process, standby))

        outcome: Event | None = None
        returned = False
        try:
            with scope:
                if not standby:
                    outcome = await self._launch_and_load(standby, started)
                else:  # not while the clients of a just-promoted worker recover
                    await self.events.wait_until(self._proxies_settled, STANDBY_DEFER)
                    async with self.standbys:
                        outcome = await self._launch_and_load(standby, started)
                returned = True
        except Exception:
            log.exception("module.job_failed", module=self.name, job="_launch")
        finally:
            if self._launches.get(standby) is scope:
                del self._launches[standby]
            if worker is None:
                self.post(LaunchFailed(_why_not(outcome, scope), standby))
            elif isinstance(outcome, LaunchFailed):  # it exists, but its launch did not finish
                self.post(LoadFailed(worker, outcome.reason))
            elif outcome is not None:
                self.post(outcome)
            elif not returned and not scope.cancelled_caught:  # a bug: the machine ends it
                self.post(LoadFailed(worker, "internal error while loading"))
            exited = self._loading.pop(worker, None) if worker is not None else None
            if exited is not None:  # it died while its LOAD was answered: told after that
                self.post(exited)
            # else: it died during LOAD (its exit tells the machine), or the machine
            # cancelled the LOAD because it is ending the worker already

    async def _launch_and_load(
        self, standby: bool, started: Callable[[WorkerProcess], None]
    ) -> Event | None:
        """The launch's outcome: LaunchFailed, or how LOAD went (None: the worker died in it)."""
        argv = self.kind.worker_argv(self.plan.worker)
        identity = self.identify_code()  # before its code is imported: see _loaded_code
        fork = not self.launcher.preload_stale(
            self._preload_spec, identity.package_id if identity is not None else None
        )
        if not fork and identity is not None:
            log.info("worker.preload_stale", module=self.name, standby=standby,
                     code_id=identity.code_id, action="spawned; fork server renewed")  # fmt: skip
            self._job(self.launcher.renew_stale, self._preload_spec)
        # Past the hashing bounds (no identity): spawned, and no renewal, which could not
        # tell its code either (renewing at each launch would be a fork-server loop).
        if not standby:
            self._last_code = (identity.code_id if identity is not None else None,)
        try:
            worker = await self.launcher.launch(
                self.name, argv, self.env, self._on_notice, self.plan.sandbox,
                on_started=started, on_exit=self._exited,
                timeout=self.start_timeout, fork=fork,
            )  # fmt: skip
        except OSError as exc:
            return LaunchFailed(f"cannot start {argv[0]}: {exc.strerror or exc}", standby)
        self._loading[worker] = None  # its exit, if it comes now, waits for this answer
        worker.proxy_of = self._proxy_of_instance
        with self.timers.move_on_after(self.start_timeout):
            try:
                frame = await worker.load(self._load_message(standby=standby))
            except WorkerCrashed:
                return None  # its exit tells the machine
            if isinstance(frame.message, p.Ready):
                worker.ready = self._same_ready(frame.message)
                worker.code_id = self._loaded_code(worker, identity, standby)
                return Ready(worker, worker.code_id)
            # Code refused against its signature stays refused until a reload: no retries.
            final = isinstance(frame.message, p.Error) and "refused" in frame.message.details
            return LoadFailed(worker, _describe_error(frame.message), exiting=True, final=final)
        return LoadFailed(worker, f"not ready within {self.policy.start_timeout}")

    def _loaded_code(
        self, worker: WorkerProcess, identity: Identity | None, standby: bool
    ) -> str | None:
        """The identity of the code a ready worker loaded: hashed before its LOAD, if still so.

        The daemon hashes the files before the launch and stats them again at
        READY: files that moved in between (an edit during the load, a module
        that rewrites itself) leave the worker's code unknown (None), which
        is never promoted and reads as changed to a reload.
        """
        code = identity.code_id if identity is not None else None
        if (
            identity is not None
            and self.plan.signed is None
            and not self.code.unchanged_since(identity)
        ):
            log.warning("worker.code_changed_during_load", module=self.name,
                        worker_pid=worker.pid, standby=standby,
                        loaded_before=identity.code_id)  # fmt: skip
            code = None
        if not standby:
            self._last_code = (code,)
        return code

    def _same_ready(self, ready: p.Ready) -> p.Ready:
        """A worker's READY, sharing the methods list of the last one that said the same.

        Every worker of a module announces the same methods: kept once, not
        once per worker and standby, they cost a module a third as much.
        """
        last = self._ready
        if last is not None and ready.methods == last.methods:
            ready = msgspec.structs.replace(ready, methods=last.methods)
        self._ready = ready
        return ready

    async def _promote(self, worker: WorkerProcess) -> None:
        """A promoted standby beats at the module's pace from now on, not a standby's."""
        if worker.board is not None:
            # Bounded: a worker that does not read its socket is seen hung meanwhile.
            with (
                self.timers.move_on_after(self.policy.heartbeat_timeout.seconds),
                contextlib.suppress(OSError, trio.ClosedResourceError),
            ):  # it died: seen
                await worker.control.send(p.Heartbeat(self.policy.heartbeat_interval.seconds))
        self._balance_spares()

    def _load_message(self, *, standby: bool = False) -> p.Load:
        """LOAD for a new worker; a standby's beats slowly until it is promoted (HEARTBEAT)."""
        manifest = self.plan.source.manifest
        interval = self.policy.heartbeat_interval.seconds
        return p.Load(
            module=self.name,
            entry_point=manifest.entry_point or "",
            module_dir=str(self.plan.source.directory),
            tuning=str(self.plan.tuning),
            heartbeat_interval=max(interval, STANDBY_BEAT) if standby else interval,
            signed=dict(self.plan.signed) if self.plan.signed is not None else None,
            minor=p.PROTOCOL_MINOR,
            log_level=daemon_log_level(),
        )

    def _proxies_settled(self) -> bool:
        """No proxy of this module is waiting to recover."""
        return all(r.state is not ProxyState.INVALID for r in self.proxies.of_module(self.name))

    def _invalidate(self, worker: WorkerProcess, reason: str) -> None:
        """Every proxy whose instance lived in ``worker`` (or waited for one) turns invalid.

        One reopened on it while invalid is announced invalid again, with this end's reason.
        """
        for record in self.proxies.of_module(self.name):
            mine = record.worker_pid == worker.pid or record.state is ProxyState.PENDING
            if mine and record.state in (ProxyState.VALID, ProxyState.PENDING):
                self.proxies.set_state(record, ProxyState.INVALID, reason)
            elif mine and record.reattached:  # reopened on it, its PROXY_READY not read yet
                self.proxies.invalid_again(record, reason)

    def _sweep(self, worker: WorkerProcess) -> None:
        """Clear what an exited worker left: its cgroup, next; its descriptors, now.

        The reaper killed its process group. Writing ``cgroup.kill`` costs a
        few hundred microseconds, so it runs in a job once the module's clients
        have recovered (at most ``STANDBY_DEFER`` later): in the same scheduler
        pass as their new channels it would hold them up.
        """
        self.metrics.retire(worker, trio.current_time())  # before its board is closed
        worker.close()
        v1_memory = worker.memory_cgroup if worker.memory_cgroup != worker.cgroup else None
        cgroup, worker.cgroup = worker.cgroup, None
        if cgroup is not None or v1_memory is not None:
            self._job(self._clear_cgroups, cgroup, v1_memory)

    async def _clear_cgroups(self, cgroup: Path | None, v1_memory: Path | None) -> None:
        """Clear a dead worker's cgroups once no proxy of the module waits to recover."""
        try:
            await self.events.wait_until(self._proxies_settled, STANDBY_DEFER)
        finally:
            with trio.CancelScope(shield=True):
                if cgroup is not None:
                    await clear_cgroup(cgroup)
                if v1_memory is not None:  # cgroup v1's memory cgroup, apart from the worker's
                    await _clear_v1_memory(v1_memory)

    # --- instances -------------------------------------------------------------

    def _on_notice(self, message: p.Message) -> None:
        """A one-way message from the worker: an instance it held and closed on its own.

        The worker passes on only closes of instances it holds (WorkerProcess counts
        the rest, and kills a worker that floods them), so this scan is bounded.
        """
        if isinstance(message, p.InstanceClosed):
            for record in self.proxies.of_module(self.name):
                if record.instance_id == message.instance_id:
                    if not self.proxies.instance_closed(record, message.reason):
                        log.info("proxy.instance_dropped", module=self.name,
                                 proxy_id=record.proxy_id, instance_id=message.instance_id,
                                 reason=message.reason)  # fmt: skip
                    self._balance_spares()

    def _proxy_of_instance(self, instance_id: int) -> int | None:
        """The proxy whose instance this is, for a module log record (bounded by the log's rate)."""
        for record in self.proxies.of_module(self.name):
            if record.instance_id == instance_id:
                return record.proxy_id
        return None

    def running_pid_for(self, proxy_id: int) -> int | None:
        """The pid of the worker that serves ``proxy_id`` if it runs: the module's one."""
        del proxy_id
        return self.running_pid

    def worker_pid_for(self, proxy_id: int) -> int | None:
        """The pid of the worker that holds ``proxy_id``'s instance: the module's one."""
        del proxy_id
        return self.worker_pid

    def running_worker_for(self, proxy_id: int) -> WorkerProcess | None:
        """The worker that serves ``proxy_id`` if it runs: the module's one."""
        del proxy_id
        return self.worker if self.state is WorkerState.RUNNING else None

    async def open_instance(self, proxy_id: int | None = None) -> tuple[int, socket.socket]:
        """Create a module instance; return its id and the client's end of its channel.

        An instance opened ahead of time (on a standby, now promoted) is handed
        out at once; every instance handed out gets a twin on the standby, so
        after the next crash a reopen needs no round trip to the new worker.
        ``proxy_id`` matters only with isolation = "proxy" (ipad/daemon/isolation.py).
        """
        del proxy_id
        worker = self.worker
        if worker is None or self.state is not WorkerState.RUNNING:
            raise ModuleUnavailable(self.reason or f"module is {self.state.value}")
        spare = bool(worker.spares)
        try:
            instance = worker.spares.pop() if spare else await self._open_on(worker)
        except WorkerGone:
            # Ended under the request (a stuck worker killed as hung): the worker that
            # replaces it within start_timeout takes it, once; else the request fails.
            lost = worker

            def replaced() -> bool:
                running = self.state is WorkerState.RUNNING and self.worker is not lost
                return running or self.machine.stopping

            await self.events.wait_until(replaced, self.start_timeout)
            worker = self.worker
            if worker is None or worker is lost or self.state is not WorkerState.RUNNING:
                raise
            spare = bool(worker.spares)
            instance = worker.spares.pop() if spare else await self._open_on(worker)
        log.debug("instance.opened", module=self.name, worker_pid=worker.pid,
                  instance_id=instance[0], spare=spare)  # fmt: skip
        self._balance_spares()
        return instance

    async def _open_on(self, worker: WorkerProcess) -> tuple[int, socket.socket]:
        """OPEN_INSTANCE on ``worker``: the instance id and the client's end of its channel."""
        instance_id = next(self._instance_ids)
        client_end, worker_end = sized_socketpair()  # calls and results up to MAX_PACKET
        frame: p.Frame | None = None
        try:
            with self.timers.move_on_after(self.start_timeout):
                try:
                    frame = await worker.request(p.OpenInstance(instance_id), [worker_end.fileno()])
                finally:
                    worker_end.close()
        except (WorkerCrashed, OSError, trio.ClosedResourceError) as exc:
            client_end.close()
            raise WorkerGone(f"worker went away: {exc}") from None
        except BaseException:
            client_end.close()
            raise
        if frame is None:
            client_end.close()
            _close_on(worker, instance_id)  # should it open the instance late, it frees it next
            raise ModuleUnavailable(
                f"its worker did not open an instance within {self.policy.start_timeout}"
            )
        if not isinstance(frame.message, p.InstanceOpened):
            client_end.close()
            raise ModuleUnavailable(_describe_error(frame.message))
        worker.opened(instance_id)
        return instance_id, client_end

    def _loaded_standby(self) -> WorkerProcess | None:
        machine = self.machine
        return machine.standby if machine.standby_ready else None

    def _balance_spares(self) -> None:
        """In the background, give the standby one spare instance per proxy this worker serves.

        The active worker's own spares (it was the standby) are trimmed now, to
        what its proxies still waiting for a reopen may take.
        """
        self._trim_active_spares()
        if self._loaded_standby() is not None and not self._balancing and self._nursery:
            self._balancing = True
            self._job(self._keep_spares)

    def _trim_active_spares(self) -> None:
        """Close the promoted worker's spares no proxy will take.

        Only a proxy not on it yet (on the worker it replaced, or new) takes
        one; a proxy whose client left before it reopened takes none, and its
        spare's client end would stay open in the daemon while the worker runs.
        """
        worker = self.worker
        if worker is None or not worker.spares or self.state is not WorkerState.RUNNING:
            return  # one being ended has its spares closed when it is swept
        waiting = sum(r.worker_pid != worker.pid for r in self.proxies.of_module(self.name))
        while len(worker.spares) > waiting:
            _drop_spare(worker)

    async def _keep_spares(self) -> None:
        try:
            while (standby := self._loaded_standby()) is not None:
                # Proxies that hold an instance: one still waiting for its own (and perhaps
                # closed before it gets one: its client left) needs no twin yet.
                wanted = sum(r.instance_id is not None for r in self.proxies.of_module(self.name))
                if len(standby.spares) > wanted:
                    _drop_spare(standby)
                elif len(standby.spares) < wanted:
                    try:
                        spare = await self._open_on(standby)
                    except ModuleUnavailable as exc:
                        log.warning("worker.spare_failed", module=self.name,
                                    worker_pid=standby.pid, error=str(exc))  # fmt: skip
                        return
                    if standby.pidfd < 0:  # swept (closed) while its answer was on the way
                        spare[1].close()
                        return
                    standby.spares.append(spare)  # kept even if promoted meanwhile
                else:
                    return
        finally:
            self._balancing = False
            self._trim_active_spares()  # promoted meanwhile: what it opened may be surplus

    async def close_instance(self, instance_id: int, proxy_id: int | None = None) -> None:
        """Free an instance; a worker that is gone has freed it already. Never waits."""
        del proxy_id  # one worker holds every instance: the id says which
        self._balance_spares()  # its twin on the standby goes too, whatever state we are in
        worker = self.worker
        if worker is None or self.state is not WorkerState.RUNNING:
            return
        _close_on(worker, instance_id)


def _drop_spare(worker: WorkerProcess) -> None:
    """Close the newest of ``worker``'s spare instances: its client end here, the instance there."""
    instance_id, client_end = worker.spares.pop()
    client_end.close()
    _close_on(worker, instance_id)


def _close_on(worker: WorkerProcess, instance_id: int) -> None:
    """CLOSE_INSTANCE, if the worker's socket takes it now.

    A worker that does not read its control socket keeps the instance until
    it ends; a client leaving (its session's clean-up) never waits on it.
    """
    worker.closing(instance_id)
    if not worker.control.send_nowait(p.CloseInstance(instance_id)):
        worker.close_drops += 1
        if not worker.close_drops & (worker.close_drops - 1):  # the 1st, 2nd, 4th...: bounded
            log.warning("instance.close_dropped", module=worker.module, worker_pid=worker.pid,
                        instance_id=instance_id, reason="its control socket is full",
                        dropped=worker.close_drops)  # fmt: skip


async def _clear_v1_memory(path: Path) -> None:
    """Remove a worker's cgroup v1 memory cgroup once what ran in it is gone.

    v1 says nothing when a cgroup empties; its processes were in the worker's
    cgroup2 cgroup too, whose emptiness was awaited first, so this seldom retries.
    """
    delay = 0.005
    with trio.move_on_after(MEMORY_CGROUP_WAIT):
        while not memory_cgroup.clear(path):
            await trio.sleep(delay)
            delay = min(delay * 2, 0.25)


def _killed_for_memory(worker: WorkerProcess, status: ExitStatus) -> bool:
    """Whether the kernel's OOM killer ended the worker (counted in its memory cgroup)."""
    if status.signal != signal.SIGKILL or worker.memory_cgroup is None:
        return False
    return memory_cgroup.oom_kills(worker.memory_cgroup) > 0


def _why_not(outcome: Event | None, scope: trio.CancelScope) -> str:
    """Why a launch produced no process."""
    if isinstance(outcome, LaunchFailed):
        return outcome.reason
    return "cancelled" if scope.cancelled_caught else "the launch failed"


def _describe_error(message: p.Message) -> str:
    if isinstance(message, p.Error):
        return message.message
    return f"unexpected {message.TYPE.name}"


def worker_env(
    allowed: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment: only the allowed variables the daemon itself has."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in allowed if name in env}
