"""One module's supervision: start its worker, watch it, restart it by policy.

The worker's exit is seen through its pidfd the moment it happens; a worker
that stops answering heartbeats is killed as hung; one that does not say
READY within its start timeout has failed to start. Each ending goes to the
RestartTracker (ipad/_backoff.py), which says when to start again: at once,
after a backoff, or at the slow cooldown interval. Nothing is given up for
good except by ``restart = "never"`` or a clean exit under ``on-failure``,
and ``ipadctl restart`` always starts over at once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import attrs
import structlog
import trio

from . import _memory_cgroup
from . import _protocol as p
from ._backoff import Action, RestartTracker
from ._cgroup import WorkerCgroups
from ._check import ModulePlan
from ._config import RestartPolicy
from ._heartbeat import Heartbeats
from ._launcher import Launcher
from ._proxies import ProxyTable
from ._registry import ProxyKind
from ._sandbox_status import measures
from ._states import ProxyState, WorkerState, advance_worker
from ._worker import ExitStatus, WorkerCrashed, WorkerProcess

log = structlog.get_logger("ipad")

#: Longest a new standby waits for the clients of a just-promoted worker to recover:
#: forking and loading it would compete with them for the CPU (two cores here).
STANDBY_DEFER = 0.1

#: How often an idle standby beats on its board: nobody watches it until it is promoted,
#: and 200 standbys waking once a second cost 1 % of a CPU between them.
STANDBY_BEAT = 3600.0

#: The signal a seccomp filter's SECCOMP_RET_KILL_PROCESS ends a process with.
SIGSYS = signal.SIGSYS

#: How long a dead worker's cgroup v1 memory cgroup may take to empty before it is left.
MEMORY_CGROUP_WAIT = 2.0


class ModuleUnavailable(Exception):
    """The module's worker is not running, so no instance can be opened; says why."""


@attrs.frozen
class Shared:
    """What every module's supervisor uses of the daemon's own."""

    proxies: ProxyTable
    launcher: Launcher
    heartbeats: Heartbeats


class ModuleSupervisor:
    """Runs one module's worker and keeps its state and its proxies' validity true."""

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
        proxies, launcher = shared.proxies, shared.launcher
        #: The daemon's one heartbeat task, which watches this module's running worker.
        self.heartbeats = shared.heartbeats
        #: The module that serves this one's proxies while it is in cooldown.
        self.fallback = fallback
        self._on_stable = on_stable
        self.plan = plan
        self.name = plan.name
        self.policy = policy
        self.kind = kind
        self.env = dict(env)
        self.events = proxies.events
        self.proxies = proxies
        self.launcher = launcher
        self.tracker = RestartTracker(policy)
        self.state = WorkerState.STOPPED
        self.reason: str | None = None
        self.worker: WorkerProcess | None = None
        self.ready: p.Ready | None = None
        self.starts = 0
        self.running_since: float | None = None
        self._instance_ids = itertools.count(1)
        self._wake = trio.Event()
        self._stopping = False
        #: What stop() was for, in the reasons its clients see: "stopped", "removed …".
        self._stopped_why = "stopped"
        self._restart_requested = False
        #: Why the active worker was killed as hung (None: it was not).
        self._hang: str | None = None
        self._running = trio.Event()
        self._finished = trio.Event()
        self._background: trio.Nursery
        #: A worker started and loaded ahead of time, promoted when the active one ends.
        self._standby: tuple[WorkerProcess, p.Ready] | None = None
        self._preparing = False
        self._balancing = False
        #: Standbys are prepared once every module has started (set by the daemon).
        self._standby_allowed = False

    # --- state ----------------------------------------------------------------

    def _set_state(self, state: WorkerState, reason: str | None = None, **fields: object) -> None:
        self.state = advance_worker(self.state, state)
        self.reason = reason
        # Starting, the worker that will run is not known yet: the one still in
        # self.worker is the one that ended.
        starting = state is WorkerState.STARTING
        pid = self.worker.pid if self.worker is not None and not starting else None
        self.events.publish(
            "module", self.name, state=state.value, reason=reason, worker_pid=pid, details=fields
        )
        if state is WorkerState.RUNNING:
            self._running.set()
        else:
            self._running = trio.Event() if self._running.is_set() else self._running

    def status(self) -> dict[str, object]:
        """The module's state for ``ipadctl status``."""
        running = self.state is WorkerState.RUNNING
        return {
            "state": self.state.value,
            "reason": self.reason,
            "valid": running,
            "worker_pid": self.worker.pid if running and self.worker else None,
            "version": self.ready.version if self.ready else self.plan.source.manifest.version,
            "starts": self.starts,
            "restarts": max(self.starts - 1, 0),
            "consecutive_failures": self.tracker.consecutive,
            "standby_pid": self._standby[0].pid if self._standby else None,
            "standby_instances": len(self._standby[0].spares) if self._standby else 0,
            "proxies": len(self.proxies.of_module(self.name)),
            "proxy_kind": self.kind.name,
            "worker": str(self.plan.worker),
            "tuning": str(self.plan.tuning),
            "sandbox": self._sandbox_status(),
        }

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

    # --- the supervision loop ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until ``stop``; ``started`` once the first start has succeeded or failed."""
        try:
            async with trio.open_nursery() as background:
                self._background = background
                await self._supervise(task_status)
        finally:
            self._finished.set()

    async def _supervise(self, task_status: trio.TaskStatus[None]) -> None:
        reported = False
        while not self.stop_requested():
            self._restart_requested = False
            self._hang = None
            worker, failure = await self._start()
            if not reported:
                task_status.started()
                reported = True
            if worker is not None:
                failure = await self._attend(worker)
            if self.stop_requested():
                break
            await self._after_ending(failure)
        with trio.CancelScope(shield=True):
            await self._drop_standby()
        self._background.cancel_scope.cancel()  # a standby still being prepared, say
        if self.state is not WorkerState.STOPPED:
            self._set_state(WorkerState.STOPPED, self._stopped_why)

    async def _attend(self, worker: WorkerProcess) -> str | None:
        """Watch a running worker until it ends; record the end; return its failure.

        The daemon's heartbeat task watches it (ipad/_heartbeat.py); the stable-run
        timer is a deadline on the wait itself. From the pidfd waking us to the
        next worker running (a standby's promotion) nothing yields to the scheduler.
        """
        policy = self.policy
        self.heartbeats.watch(worker, policy.heartbeat_interval.seconds,
                              policy.heartbeat_timeout.seconds, self._hung)  # fmt: skip
        try:
            with trio.move_on_after(policy.stable_after.seconds) as running:
                status = await worker.wait_exit()
            if running.cancelled_caught:
                self._stable(worker)
                status = await worker.wait_exit()
        finally:
            self.heartbeats.forget(worker)
        self._sweep(worker)
        return self._on_exit(worker, status)

    def _hung(self, worker: WorkerProcess) -> None:
        """No beat or PONG for ``heartbeat_timeout``: kill it, and say it hung."""
        if self.worker is not worker:
            return
        # Read now: closing the worker after its exit forgets the board.
        heartbeat = "board" if worker.board is not None else "ping"
        silence = (
            "its heartbeat counter did not move" if heartbeat == "board"
            else "no heartbeat reply"
        )  # fmt: skip
        self._hang = f"worker hung: {silence} within {self.policy.heartbeat_timeout}"
        log.error("worker.hung", module=self.name, worker_pid=worker.pid, heartbeat=heartbeat,
                  timeout=self.policy.heartbeat_timeout.seconds)  # fmt: skip
        worker.signal(signal.SIGKILL)

    def _stable(self, worker: WorkerProcess) -> None:
        """The worker has run for ``stable_after``: say so (fallback proxies come home)."""
        if self.worker is worker and self.state is WorkerState.RUNNING:
            log.info("module.stable", module=self.name, worker_pid=worker.pid)
            if self._on_stable is not None:
                self._background.start_soon(self._on_stable, self.name)

    def stop_requested(self) -> bool:
        """Whether ``stop`` was called (a method, so checks are not folded away)."""
        return self._stopping

    async def _after_ending(self, failure: str | None) -> None:
        """Ask the tracker what next, and wait for it (or for an operator's request)."""
        now = trio.current_time()
        decision = self.tracker.ended(
            now, failed=failure is not None, requested=self._restart_requested
        )
        reason = failure or self.reason or "exited"
        if decision.action is Action.STOP:
            final = WorkerState.FAILED if failure else WorkerState.EXITED
            if self.state is not final:
                self._set_state(final, f"{reason}; not restarted ({decision.reason})")
            await self._wait_for_request(None)
        elif decision.action is Action.COOLDOWN:
            self._set_state(WorkerState.COOLDOWN, f"{reason}; {decision.reason}")
            log.error("module.cooldown", module=self.name, reason=reason,
                      retry_in=decision.delay, failures=decision.reason)  # fmt: skip
            await self._wait_for_request(decision.delay)
        elif decision.delay > 0:
            log.info("module.backoff", module=self.name, delay=round(decision.delay, 4),
                     consecutive_failures=self.tracker.consecutive)  # fmt: skip
            await self._wait_for_request(decision.delay)

    async def _wait_for_request(self, timeout: float | None) -> None:
        """Sleep ``timeout`` seconds (None: until asked), ending early on restart or stop."""
        self._wake = trio.Event()
        if timeout is None:
            await self._wake.wait()
        else:
            with trio.move_on_after(timeout):
                await self._wake.wait()

    async def _start(self) -> tuple[WorkerProcess | None, str | None]:
        """Start a worker and wait for READY: the worker, or the reason it failed."""
        self._set_state(WorkerState.STARTING)
        self.starts += 1
        self.tracker.started(trio.current_time())
        standby, self._standby = self._standby, None
        if standby is not None and standby[0].exit_status is None:
            worker, self.ready = standby
            self.worker = worker
            log.info("worker.ready", module=self.name, worker_pid=worker.pid,
                     version=self.ready.version, standby=True)  # fmt: skip
            self.running_since = trio.current_time()
            self._set_state(WorkerState.RUNNING)
            self._prepare_standby()
            if worker.board is not None:  # from the standby's slow beat to the module's
                with contextlib.suppress(OSError, trio.ClosedResourceError):  # it died: seen
                    await worker.control.send(p.Heartbeat(self.policy.heartbeat_interval.seconds))
            return worker, None
        argv = self.kind.worker_argv(self.plan.worker)
        try:
            worker = await self.launcher.launch(
                self.name, argv, self.env, self._on_notice, self.plan.sandbox
            )
        except OSError as exc:
            reason = f"cannot start {argv[0]}: {exc.strerror or exc}"
            log.error("worker.spawn_failed", module=self.name, error=str(exc))
            self._set_state(WorkerState.EXITED, reason)
            return None, reason
        self.worker = worker
        self._background.start_soon(worker.watch)
        self._background.start_soon(worker.read_control)
        failure = await self._load(worker)
        if failure is None and self.stop_requested():
            return worker, None  # ready as we stop: it is being stopped, never announced running
        if failure is None:
            log.info("worker.ready", module=self.name, worker_pid=worker.pid,
                     version=self.ready.version if self.ready else None)  # fmt: skip
            self.running_since = trio.current_time()
            self._set_state(WorkerState.RUNNING)
            self._prepare_standby()
            return worker, None
        return None, failure

    def allow_standby(self) -> None:
        """Every module has started (the daemon says): standbys may be prepared from now on."""
        self._standby_allowed = True
        if self.state is WorkerState.RUNNING:
            self._prepare_standby()

    def _prepare_standby(self) -> None:
        """Start getting a standby ready in the background, if the policy wants one.

        Not before ``allow_standby``: at start-up, 200 modules' standbys would
        otherwise be 200 tasks waiting, spawned while the actives start.
        """
        if not self._standby_allowed:
            return
        if self.policy.standby and not self._preparing and self._standby is None:
            self._preparing = True
            self._background.start_soon(self._make_standby)

    async def _make_standby(self) -> None:
        """Launch and LOAD a second worker, then keep it idle until it is promoted."""
        try:
            await self.events.wait_until(self._proxies_settled, STANDBY_DEFER)
            if self.stop_requested() or self.state is not WorkerState.RUNNING:
                return
            argv = self.kind.worker_argv(self.plan.worker)
            try:
                worker = await self.launcher.launch(
                    self.name, argv, self.env, self._on_notice, self.plan.sandbox
                )
            except OSError as exc:
                log.warning("worker.standby_failed", module=self.name, error=str(exc))
                return
            self._background.start_soon(worker.watch)
            self._background.start_soon(worker.read_control)
            with trio.move_on_after(self.policy.start_timeout.seconds):
                try:
                    frame = await worker.load(self._load_message(standby=True))
                except WorkerCrashed:
                    frame = None
                if frame is not None and isinstance(frame.message, p.Ready):
                    self._standby = (worker, frame.message)
                    log.info("worker.standby_ready", module=self.name, worker_pid=worker.pid)
                    self._background.start_soon(self._watch_standby, worker)
                    self._balance_spares()
                    return
            log.warning("worker.standby_failed", module=self.name, worker_pid=worker.pid)
            await worker.stop(self.policy.stop_timeout.seconds)
            self._sweep(worker)
        finally:
            self._preparing = False

    def _proxies_settled(self) -> bool:
        """No proxy of this module is waiting to recover."""
        return all(r.state is not ProxyState.INVALID for r in self.proxies.of_module(self.name))

    async def _watch_standby(self, worker: WorkerProcess) -> None:
        """A standby that dies while idle is cleaned up and replaced."""
        await worker.wait_exit()
        if self._standby is not None and self._standby[0] is worker:
            self._standby = None
            log.warning("worker.standby_exited", module=self.name, worker_pid=worker.pid)
            self._sweep(worker)
            worker.close()
            if self.state is WorkerState.RUNNING and not self.stop_requested():
                self._prepare_standby()

    async def _drop_standby(self) -> None:
        """Stop the standby (the module stops, or its configuration changed)."""
        standby, self._standby = self._standby, None
        if standby is not None:
            worker = standby[0]
            await self._stop_worker(worker)
            self._sweep(worker)
            worker.close()

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
        )

    async def _load(self, worker: WorkerProcess) -> str | None:
        """Send LOAD; return None once READY, else why the start failed (worker reaped)."""
        load = self._load_message()
        failure: str | None = None
        exiting = False  # the worker said why it cannot run and is exiting by itself
        with trio.move_on_after(self.policy.start_timeout.seconds) as timeout:
            try:
                frame = await worker.load(load)
            except WorkerCrashed:
                failure = "exited before it was ready"
            else:
                if isinstance(frame.message, p.Ready):
                    self.ready = frame.message
                    return None
                failure = _describe_error(frame.message)
                exiting = True
        if timeout.cancelled_caught:
            failure = f"not ready within {self.policy.start_timeout}"
        grace = self.policy.stop_timeout.seconds
        status = await (worker.finish(grace) if exiting else worker.stop(grace))
        self._sweep(worker)
        worker.close()
        asked = self._asked_end()
        if asked is not None:
            reason = f"module {self.name} {asked} before its worker was ready ({status.describe()})"
            log.info("worker.exited", module=self.name, worker_pid=worker.pid, ready=False,
                     **status.log_fields())  # fmt: skip
        else:
            reason = f"failed to start: {failure} ({status.describe()})"
            log.error("worker.start_failed", module=self.name, worker_pid=worker.pid,
                      reason=failure, **status.log_fields())  # fmt: skip
        self._set_state(WorkerState.EXITED, reason)
        return reason

    def _asked_end(self) -> str | None:
        """Why a worker ending now was asked to ("stopped", "restarting", …); None: it was not."""
        if self._stopping:
            return self._stopped_why
        return "restarting" if self._restart_requested else None

    def _on_exit(self, worker: WorkerProcess, status: ExitStatus) -> str | None:
        """Record how the worker ended; return the failure, or None for a clean or asked-for end."""
        self.running_since = None
        worker.close()
        asked = self._asked_end()
        if asked is not None:
            failure = None
            reason = f"module {self.name} {asked} ({status.describe()})"
            log.info("worker.exited", module=self.name, worker_pid=worker.pid,
                     **status.log_fields())  # fmt: skip
        elif self._hang is not None:
            failure = reason = self._hang
            log.error("worker.exited", module=self.name, worker_pid=worker.pid, cause="hung",
                      **status.log_fields())  # fmt: skip
        elif worker.sandbox is not None and worker.sandbox.seccomp and status.signal == SIGSYS:
            failure = reason = (
                "seccomp: killed for a forbidden system call (an escape attempt?) "
                f"({status.describe()})"
            )
            log.error("worker.exited", module=self.name, worker_pid=worker.pid, cause="seccomp",
                      **status.log_fields())  # fmt: skip
        elif _killed_for_memory(worker, status):
            limit = worker.sandbox.memory_max if worker.sandbox else None
            failure = reason = (
                f"oom: over its memory limit ({limit} bytes), killed by the kernel "
                f"({status.describe()})"
            )
            log.error("worker.exited", module=self.name, worker_pid=worker.pid, cause="oom",
                      memory_max=limit, **status.log_fields())  # fmt: skip
        else:
            reason = f"worker exited with {status.describe()}"
            failure = None if status.clean else reason
            level = log.info if status.clean else log.error
            level("worker.exited", module=self.name, worker_pid=worker.pid, **status.log_fields())
        for record in self.proxies.of_module(self.name):
            if record.state in (ProxyState.VALID, ProxyState.PENDING):
                self.proxies.set_state(record, ProxyState.INVALID, reason)
        self._set_state(WorkerState.EXITED, reason, **status.log_fields())
        return failure

    def _sweep(self, worker: WorkerProcess) -> None:
        """Kill whatever the worker left behind: its process group now, its cgroup next.

        Writing ``cgroup.kill`` costs a few hundred microseconds, so it runs in
        a task of its own once the module's clients have recovered (at most
        ``STANDBY_DEFER`` later): in the same scheduler pass as their new
        channels it would hold them up. Removing the emptied cgroup follows it.
        """
        worker.signal(signal.SIGKILL)
        v1_memory = worker.memory_cgroup if worker.memory_cgroup != worker.cgroup else None
        if worker.cgroup is not None:
            self._background.start_soon(self._clear_cgroup_later, worker.cgroup)
            worker.cgroup = None
        if v1_memory is not None:  # cgroup v1's memory cgroup, apart from the worker's own
            self._background.start_soon(_clear_v1_memory, v1_memory)

    async def _clear_cgroup_later(self, path: Path) -> None:
        """``_clear_cgroup`` once no proxy of this module waits to recover; at once if cancelled.

        Only what escaped the process group (a setsid() grandchild) is still
        alive in there, for those few milliseconds.
        """
        try:
            await self.events.wait_until(self._proxies_settled, STANDBY_DEFER)
        finally:
            with trio.CancelScope(shield=True):
                await _clear_cgroup(path)

    # --- operator requests --------------------------------------------------------

    async def stop(self, why: str = "stopped") -> None:
        """Stop for good: SHUTDOWN, then SIGTERM, then SIGKILL after the grace period.

        ``why`` goes into the reason its proxies turn invalid with: a client
        can tell a module removed by a reload from one stopped with the daemon.
        """
        self._stopped_why = why
        self._stopping = True
        self._wake.set()
        worker = self.worker
        if worker is None or self.state not in (WorkerState.RUNNING, WorkerState.STARTING):
            return
        self._set_state(WorkerState.STOPPING, "stopping")
        await self._stop_worker(worker)
        with trio.CancelScope(shield=True):
            await self._finished.wait()  # the loop has recorded the exit and ended

    async def restart(self) -> None:
        """``ipadctl restart``: restart now, ending any backoff or cooldown."""
        self.tracker.reset()
        self._restart_requested = True
        self._wake.set()
        worker = self.worker
        if worker is not None and self.state in (WorkerState.RUNNING, WorkerState.STARTING):
            log.info("module.restart_requested", module=self.name, worker_pid=worker.pid)
            await self._stop_worker(worker)

    async def _stop_worker(self, worker: WorkerProcess) -> None:
        grace = self.policy.stop_timeout.seconds
        with trio.CancelScope(shield=True):
            with trio.move_on_after(grace):
                with contextlib.suppress(OSError, trio.ClosedResourceError):
                    await worker.control.send(p.Shutdown())
                await worker.wait_exit()
            await worker.stop(grace)

    async def wait_running(self) -> None:
        """Return once the module's worker is running."""
        await self._running.wait()

    # --- instances -------------------------------------------------------------

    def _on_notice(self, message: p.Message) -> None:
        """A one-way message from the worker: an instance it closed on its own."""
        if isinstance(message, p.InstanceClosed):
            for record in self.proxies.of_module(self.name):
                if record.instance_id == message.instance_id:
                    self.proxies.close(record, message.reason)
                    self._balance_spares()

    async def open_instance(self) -> tuple[int, socket.socket]:
        """Create a module instance; return its id and the client's end of its channel.

        An instance opened ahead of time (on a standby, now promoted) is handed
        out at once; every instance handed out gets a twin on the standby, so
        after the next crash a reopen needs no round trip to the new worker.
        """
        worker = self.worker
        if worker is None or self.state is not WorkerState.RUNNING:
            raise ModuleUnavailable(self.reason or f"module is {self.state.value}")
        spare = bool(worker.spares)
        instance = worker.spares.pop() if spare else await self._open_on(worker)
        log.debug("instance.opened", module=self.name, worker_pid=worker.pid,
                  instance_id=instance[0], spare=spare)  # fmt: skip
        self._balance_spares()
        return instance

    async def _open_on(self, worker: WorkerProcess) -> tuple[int, socket.socket]:
        """OPEN_INSTANCE on ``worker``: the instance id and the client's end of its channel."""
        instance_id = next(self._instance_ids)
        client_end, worker_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            try:
                frame = await worker.request(p.OpenInstance(instance_id), [worker_end.fileno()])
            finally:
                worker_end.close()
        except (WorkerCrashed, OSError, trio.ClosedResourceError) as exc:
            client_end.close()
            raise ModuleUnavailable(f"worker went away: {exc}") from None
        except BaseException:
            client_end.close()
            raise
        if not isinstance(frame.message, p.InstanceOpened):
            client_end.close()
            raise ModuleUnavailable(_describe_error(frame.message))
        return instance_id, client_end

    def _balance_spares(self) -> None:
        """In the background, give the standby one spare instance per proxy this worker serves."""
        if self._standby is not None and not self._balancing:
            self._balancing = True
            self._background.start_soon(self._keep_spares)

    async def _keep_spares(self) -> None:
        try:
            while self._standby is not None:
                standby = self._standby[0]
                # Proxies that hold an instance: one still waiting for its own (and perhaps
                # closed before it gets one: its client left) needs no twin yet.
                wanted = sum(r.instance_id is not None for r in self.proxies.of_module(self.name))
                if len(standby.spares) > wanted:
                    instance_id, client_end = standby.spares.pop()
                    client_end.close()
                    with contextlib.suppress(OSError, trio.ClosedResourceError):
                        await standby.control.send(p.CloseInstance(instance_id))
                elif len(standby.spares) < wanted:
                    try:
                        spare = await self._open_on(standby)
                    except ModuleUnavailable as exc:
                        log.warning("worker.spare_failed", module=self.name,
                                    worker_pid=standby.pid, error=str(exc))  # fmt: skip
                        return
                    standby.spares.append(spare)  # kept even if promoted meanwhile
                else:
                    return
        finally:
            self._balancing = False

    async def close_instance(self, instance_id: int) -> None:
        """Free an instance; a worker that is gone has freed it already."""
        self._balance_spares()  # its twin on the standby goes too, whatever state we are in
        worker = self.worker
        if worker is None or self.state is not WorkerState.RUNNING:
            return
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await worker.control.send(p.CloseInstance(instance_id))


async def _clear_cgroup(path: Path) -> None:
    """Kill everything in a worker's cgroup and remove it, even while the module stops."""
    WorkerCgroups.kill(path)
    with trio.CancelScope(shield=True):
        await WorkerCgroups.remove(path)


async def _clear_v1_memory(path: Path) -> None:
    """Remove a worker's cgroup v1 memory cgroup once what ran in it is gone."""
    with trio.CancelScope(shield=True), trio.move_on_after(MEMORY_CGROUP_WAIT):
        while not _memory_cgroup.clear(path):
            await trio.sleep(0.005)


def _killed_for_memory(worker: WorkerProcess, status: ExitStatus) -> bool:
    """Whether the kernel's OOM killer ended the worker (counted in its memory cgroup)."""
    if status.signal != signal.SIGKILL or worker.memory_cgroup is None:
        return False
    return _memory_cgroup.oom_kills(worker.memory_cgroup) > 0


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
