"""Isolation per proxy (a module's ``isolation = "proxy"``): every proxy gets a worker of its own.

Each worker is a ``WorkerCell``: a ``ModuleSupervisor`` narrowed to one proxy.
It runs the same lifecycle machine (ipad/daemon/lifecycle.py) for that one
worker, so restarts, backoff, cooldown, heartbeats, sandbox and memory cgroup
are the module's own, per worker; and its restart tracker is the proxy's own,
so a client that crash-loops its worker puts only its proxy into backoff and
cooldown. A cell invalidates only its own proxy and tells clients nothing about
the module: its state changes wake the daemon's waiters (``EventBus.notify``)
without an event.

``ProxyIsolatedSupervisor`` stands where a ``ModuleSupervisor`` stands (the
server and the runtime see the same interface) and keeps one loaded spare
cell, so a grant takes a running worker and opens its instance in one round
trip; the module's state is the spare's (can the module start at all?).
Releasing the proxy ends its cell; ``restart`` restarts every cell; ``stop``
ends them all and waits, bounded, for every worker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import attrs
import structlog
import trio

from ipad.config.check import ModulePlan
from ipad.config.model import RestartPolicy
from ipad.config.proxy_kinds import ProxyKind
from ipad.daemon.crashes import CrashRecord
from ipad.daemon.lifecycle import HALT_REASON, Effect, Log, SetState
from ipad.daemon.states import ProxyState, WorkerState
from ipad.daemon.supervisor import ModuleSupervisor, ModuleUnavailable, Shared
from ipad.daemon.worker_process import KILL_WAIT, WorkerProcess
from ipad.protocol import wire as p

if TYPE_CHECKING:
    import socket

log = structlog.get_logger("ipad")

#: Per-proxy workers listed by ``ipadctl status`` for one module; the rest are counted.
STATUS_WORKERS = 64

#: The spare's states that say the module cannot start a worker now (a grant fails at once).
_NOT_STARTING = (WorkerState.BACKOFF, WorkerState.COOLDOWN, WorkerState.FAILED,
                 WorkerState.STOPPED, WorkerState.STOPPING)  # fmt: skip


def module_state(module: WorkerState, spare: WorkerState) -> WorkerState | None:
    """A proxy-isolated module's new state when its spare's becomes ``spare``; None: unchanged.

    The module is what its spare says about starting a worker: running once
    one loaded, in backoff, cooldown or failed when none can. A spare starting
    (or exiting on its way to a restart) while the module runs is the next
    spare being made, or one replaced: the module still runs.
    """
    if spare is WorkerState.RUNNING or spare in _NOT_STARTING:
        return spare
    if module is WorkerState.RUNNING:
        return None
    return spare


class WorkerCell(ModuleSupervisor):
    """One proxy's own worker: the module's supervision for that worker only."""

    __slots__ = ("owner", "proxy_id")

    def __init__(self, owner: ProxyIsolatedSupervisor) -> None:
        super().__init__(owner.plan, owner.policy, owner.kind, owner.env, owner.shared,
                         on_stable=owner.cell_stable)  # fmt: skip
        self.owner = owner
        self.code = owner.code  # one identity cache for the module, not one per worker
        #: The proxy it serves; None while it is the module's spare.
        self.proxy_id: int | None = None

    def _carry_out(self, effect: Effect) -> None:
        """As a module's, but its log records name the proxy (``module.cooldown`` is one's)."""
        if isinstance(effect, Log) and self.proxy_id is not None:
            effect = attrs.evolve(effect, fields={**effect.fields, "proxy_id": self.proxy_id})
        super()._carry_out(effect)

    def keep_crash(self, crash: CrashRecord) -> None:
        """Into the module's ring: a cell ends with its proxy, its crashes must not."""
        self.owner.keep_crash(crash)

    def _publish(self, change: SetState[WorkerProcess]) -> None:
        """Kept from the clients: the module's state is the owner's to publish."""
        state = change.state
        self._note_state(state, change.reason)
        if state is WorkerState.RUNNING:
            self.running_since = trio.current_time()
        elif state is not WorkerState.STARTING:
            self.running_since = None
        if state not in (WorkerState.STARTING, WorkerState.STOPPED):
            self._first_state.set()
        self.owner.cell_changed(self, change)

    def _invalidate(self, worker: WorkerProcess, reason: str) -> None:
        """Only this cell's proxy turns invalid: the others' workers did not end."""
        record = self.proxies.get(self.proxy_id) if self.proxy_id is not None else None
        if record is None:
            return
        details: dict[str, object] = {"isolation": "proxy"}
        if record.state is ProxyState.INVALID:
            if record.reattached and record.worker_pid == worker.pid:  # PROXY_READY not read
                self.proxies.invalid_again(record, reason, details)
            return
        if record.state not in (ProxyState.VALID, ProxyState.PENDING):
            return
        if record.worker_pid == worker.pid or record.state is ProxyState.PENDING:
            self.proxies.set_state(record, ProxyState.INVALID, reason, details)

    def _proxy_of_instance(self, instance_id: int) -> int | None:
        """The cell's proxy: its worker serves no other."""
        del instance_id
        return self.proxy_id

    def _on_notice(self, message: p.Message) -> None:
        """The worker closed its instance on its own: the cell ends (ids are per cell).

        Its proxy closes, unless invalid: then it stays, for a reopen to give
        it a new worker (ProxyTable.instance_closed).
        """
        if isinstance(message, p.InstanceClosed) and self.proxy_id is not None:
            record = self.proxies.get(self.proxy_id)
            if record is not None and record.instance_id == message.instance_id:
                if not self.proxies.instance_closed(record, message.reason):
                    log.info("proxy.instance_dropped", module=self.name,
                             proxy_id=record.proxy_id, instance_id=message.instance_id,
                             reason=message.reason)  # fmt: skip
                self.owner.instance_closed(self.proxy_id, self)


class ProxyIsolatedSupervisor(ModuleSupervisor):
    """A module whose every proxy has a worker of its own, plus one loaded spare."""

    __slots__ = ("_cells", "_ending", "_halted", "_last", "_restarts", "_spare",
                 "_starts_seen", "_stop_why", "_stopping", "on_stable", "shared")  # fmt: skip

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
        super().__init__(plan, policy, kind, env, shared, fallback, on_stable)
        self.shared = shared
        self.on_stable = on_stable
        #: Each proxy's cell, by proxy id.
        self._cells: dict[int, WorkerCell] = {}
        #: Cells asked to end (released, or the module stops), until every worker is reaped.
        self._ending: set[WorkerCell] = set()
        self._spare: WorkerCell | None = None
        self._stopping = False
        self._stop_why = "stopped"
        #: Stopped by the operator (``ipadctl stop MODULE``) until started again.
        self._halted = False
        #: The module's published state and reason.
        self._last: tuple[WorkerState, str | None] = (WorkerState.STOPPED, None)
        self._starts_seen = 0
        self._restarts = 0

    # --- what the rest of the daemon reads ----------------------------------------------

    @property
    def state(self) -> WorkerState:
        """The module's state: whether it can give a new proxy a running worker."""
        return self._last[0]

    @property
    def reason(self) -> str | None:
        """Why it is in that state (the spare's reason)."""
        return self._last[1]

    @property
    def worker(self) -> WorkerProcess | None:
        """No one worker is the module's: see ``worker_pid_for``."""
        return None

    @property
    def ready(self) -> p.Ready | None:
        """The READY of the module's last worker to start (every one says the same)."""
        return self._ready

    @property
    def starts(self) -> int:
        """Worker starts, every cell's counted."""
        return self._starts_seen

    def stop_requested(self) -> bool:
        """Whether a stop was asked for."""
        return self._stopping

    def running_pid_for(self, proxy_id: int) -> int | None:
        """The pid of the proxy's own worker if it runs."""
        cell = self._cells.get(proxy_id)
        return cell.running_pid if cell is not None else None

    def worker_pid_for(self, proxy_id: int) -> int | None:
        """The pid of the proxy's own worker, whatever its state."""
        cell = self._cells.get(proxy_id)
        return cell.worker_pid if cell is not None else None

    def running_worker_for(self, proxy_id: int) -> WorkerProcess | None:
        """The proxy's own worker if it runs."""
        cell = self._cells.get(proxy_id)
        return cell.running_worker_for(proxy_id) if cell is not None else None

    def status(self) -> dict[str, object]:
        """The module's state for ``ipadctl status``, with each proxy's worker."""
        spare = self._spare
        cells = sorted(self._cells.items())
        workers = [
            {"proxy_id": proxy_id, "worker_pid": cell.worker_pid, "state": cell.state.value,
             "reason": cell.reason, "restarts": max(cell.starts - 1, 0),
             "consecutive_failures": cell.tracker.consecutive, **cell.status_times(),
             "code_id": cell.worker.code_id if cell.worker is not None else None}
            for proxy_id, cell in cells[:STATUS_WORKERS]
        ]  # fmt: skip
        return {
            "state": self.state.value,
            "reason": self.reason,
            "valid": self.state is WorkerState.RUNNING,
            "worker_pid": None,
            "version": self._ready.version if self._ready else self.plan.source.manifest.version,
            "starts": self._starts_seen,
            "restarts": self._restarts,
            "consecutive_failures": spare.tracker.consecutive if spare is not None else 0,
            "standby_pid": spare.running_pid if spare is not None else None,
            "standby_instances": 0,
            # The spare's: the code the next proxy's worker runs.
            "code_id": spare.worker.code_id if spare is not None and spare.worker else None,
            "standby_code_id": None,
            "code_error": self._code_error,
            "proxies": len(self.proxies.of_module(self.name)),
            "proxy_kind": self.kind.name,
            "worker": str(self.plan.worker),
            "tuning": str(self.plan.tuning),
            "sandbox": spare._sandbox_status() if spare is not None else None,
            "isolation": "proxy",
            "workers": workers,
            "workers_total": len(cells),
            "workers_ending": len(self._ending),
            **self.status_times(),
        }

    def code_changed(self) -> bool:
        """Whether the code on disk is not what the spare or any proxy's worker loaded."""
        cells = [*self._cells.values(), *([self._spare] if self._spare else [])]
        return any(cell.code_changed() for cell in cells)

    # --- the operations -------------------------------------------------------------------

    def begin(self, nursery: trio.Nursery) -> None:
        """Start supervising: launch the spare (the module's first worker)."""
        self._nursery = nursery
        if self._stopping:
            return
        if self._halted:  # a reload replaced a module the operator had stopped: it stays so
            self._set_module_state(WorkerState.STOPPED, HALT_REASON)
        else:
            self._set_module_state(WorkerState.STARTING, None)
        self._new_spare()

    def allow_standby(self) -> None:
        """Nothing to do: the spare is the module's first worker, kept from the start."""

    def restart(self) -> None:
        """``ipadctl restart``: every worker of the module restarts, ending any backoff."""
        if self._stopping:
            return
        self._halted = False  # a halted one starts (each cell's Restart resumes it)
        for cell in [*self._cells.values(), *([self._spare] if self._spare else [])]:
            cell.restart()

    def halt(self) -> None:
        """``ipadctl stop MODULE``: every proxy's worker and the spare end; none starts."""
        if self._stopping or self._halted:
            return
        self._halted = True
        for cell in [*self._cells.values(), *([self._spare] if self._spare else [])]:
            cell.halt()
        self._first_state.set()

    def resume(self) -> None:
        """``ipadctl start MODULE``: the spare and every proxy's worker start again."""
        if self._stopping:
            return
        self._halted = False
        for cell in [*self._cells.values(), *([self._spare] if self._spare else [])]:
            cell.resume()

    @property
    def halted(self) -> bool:
        """Stopped by the operator, and not started since."""
        return self._halted

    def halt_settled(self) -> bool:
        """Stopped by the operator, and every proxy's worker and the spare's gone."""
        cells = [*self._cells.values(), *([self._spare] if self._spare else [])]
        return self._halted and all(cell.halt_settled() for cell in cells)

    def request_stop(self, why: str = "stopped") -> None:
        """Stop for good: every cell ends; finished once every worker is reaped."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_why = why
        cells = [*self._cells.values(), *([self._spare] if self._spare else [])]
        self._cells.clear()
        self._spare = None
        if self._nursery is None:  # never begun: nothing runs
            self._finish()
            return
        self._set_module_state(WorkerState.STOPPING, why)
        for cell in cells:
            self._retire(cell, why)
        if not self._ending:
            self._finish()

    async def stop(self, why: str = "stopped") -> None:
        """Stop for good and wait (bounded) until every worker of the module is gone."""
        self.request_stop(why)
        with trio.move_on_after(self.policy.stop_timeout.seconds + 2 * KILL_WAIT):
            await self._finished.wait()
        if not self._finished.is_set():
            log.error("module.stop_timed_out", module=self.name,
                      workers=[c.worker_pid for c in self._ending])  # fmt: skip

    # --- cells ----------------------------------------------------------------------------

    def cell_changed(self, cell: WorkerCell, change: SetState[WorkerProcess]) -> None:
        """A cell's worker changed state: count it, follow the spare, wake who waits."""
        if change.state is WorkerState.RUNNING:
            self._starts_seen += 1
            if cell.starts > 1:
                self._restarts += 1
            if cell.ready is not None:
                self._ready = cell.ready
        if self._halted and not self._stopping:
            self._follow_halt()
        elif cell is self._spare and not self._stopping:
            self._follow_spare(change)
        if cell.proxy_id is not None and change.state is not WorkerState.STARTING:
            log.info("proxy.worker_state", module=self.name, proxy_id=cell.proxy_id,
                     state=change.state.value, reason=change.reason,
                     worker_pid=change.worker.pid if change.worker else None)  # fmt: skip
        self.events.notify()

    async def cell_stable(self, module: str) -> None:
        """A worker ran ``stable_after``: fallback proxies come home, if the module runs.

        In cooldown (its spare cannot start) a proxy's worker that runs on from
        before says nothing about the module: its proxies stay on the fallback.
        """
        if self.on_stable is not None and self.state is WorkerState.RUNNING:
            await self.on_stable(module)

    def _follow_halt(self) -> None:
        """Stopped by the operator: ``stopping`` until every worker is gone, then ``stopped``.

        Not the spare's state alone: a proxy's worker stuck in a call may outlive it.
        """
        if self.halt_settled():
            self._set_module_state(WorkerState.STOPPED, HALT_REASON)
            self._first_state.set()
        else:
            self._set_module_state(WorkerState.STOPPING, "stopping")

    def _follow_spare(self, change: SetState[WorkerProcess]) -> None:
        """The module's state from its spare's (``module_state``)."""
        state = module_state(self.state, change.state)
        if state is not None:
            self._set_module_state(state, change.reason)
        if change.state is not WorkerState.STARTING:
            self._first_state.set()

    def _set_module_state(self, state: WorkerState, reason: str | None) -> None:
        if (state, reason) == self._last:
            return
        self._note_state(state, reason)
        self._last = (state, reason)
        if state is WorkerState.RUNNING:
            self.running_since = trio.current_time()
        self.events.publish("module", self.name, state=state.value, reason=reason,
                            details={"isolation": "proxy"})  # fmt: skip

    def _new_spare(self) -> None:
        assert self._nursery is not None  # noqa: S101 - set by begin()
        cell = self._spare = WorkerCell(self)
        if self._halted:
            cell.halt()  # before its Start: it starts on resume
        cell.begin(self._nursery)

    def _retire(self, cell: WorkerCell, why: str) -> None:
        """End a cell's worker; it counts as the module's until it is reaped."""
        self._ending.add(cell)
        cell.request_stop(why)
        if self._nursery is None:
            return
        try:
            self._nursery.start_soon(self._reap, cell)
        except RuntimeError:  # the daemon's last moments: its reaper ends what is left
            self._ending.discard(cell)

    async def _reap(self, cell: WorkerCell) -> None:
        try:
            with trio.move_on_after(self.policy.stop_timeout.seconds + KILL_WAIT):
                await cell.wait_finished()
        finally:
            self._ending.discard(cell)
            if self._stopping and not self._ending:
                self._finish()
            self.events.notify()

    def _finish(self) -> None:
        if self._finished.is_set():
            return
        if self._nursery is not None:
            self._set_module_state(WorkerState.STOPPED, self._stop_why)
        self._first_state.set()
        self._finished.set()

    async def _take_spare(self) -> WorkerCell:
        """The running spare, for a new proxy (a new spare starts at once); waits for one."""
        deadline = trio.current_time() + self.start_timeout
        replaced = False
        while True:
            spare = self._spare
            if self._stopping or spare is None:
                raise ModuleUnavailable(f"module is stopping: {self._stop_why}")
            if spare.state is WorkerState.RUNNING and not replaced and self._stale(spare):
                # Loaded before an edit: a new proxy gets the code on disk. Once per grant:
                # a module that rewrites its files as it loads would be replaced forever.
                replaced = True
                self._spare = None
                self._retire(spare, "its code changed on disk")
                self._new_spare()
                continue
            if spare.state is WorkerState.RUNNING:
                self._spare = None
                self._new_spare()
                return spare
            if spare.state in _NOT_STARTING and spare.settled:
                raise ModuleUnavailable(spare.reason or f"module is {spare.state.value}")
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise ModuleUnavailable(f"no worker was ready within {self.policy.start_timeout}")

            def changed(spare: WorkerCell = spare) -> bool:
                settled = spare.state is WorkerState.RUNNING or spare.state in _NOT_STARTING
                return self._stopping or self._spare is not spare or settled

            await self.events.wait_until(changed, remaining)

    def _stale(self, spare: WorkerCell) -> bool:
        """Whether the running spare loaded other code than the disk holds (stat-cheap)."""
        identity = self.identify_code()
        worker = spare.worker
        loaded = worker.code_id if worker is not None else None
        if loaded == (identity.code_id if identity is not None else None):
            return False
        log.info("worker.standby_stale", module=self.name, standby_code=loaded,
                 code_id=identity.code_id if identity else None, isolation="proxy")  # fmt: skip
        return True

    async def open_instance(self, proxy_id: int | None = None) -> tuple[int, socket.socket]:
        """An instance for ``proxy_id`` in its own worker: the spare's, or its cell's again."""
        if proxy_id is None:
            raise ModuleUnavailable("isolation = 'proxy' opens instances per proxy only")
        if self._stopping:
            raise ModuleUnavailable(f"module is stopping: {self._stop_why}")
        cell = self._cells.get(proxy_id)
        if cell is not None and (cell.finished or cell.state is WorkerState.FAILED):
            # restart = "never" (or a refused load): a new worker, as a new proxy would get.
            del self._cells[proxy_id]
            self._retire(cell, "replaced")
            cell = None
        if cell is None:
            cell = await self._take_spare()
            cell.proxy_id = proxy_id
            self._cells[proxy_id] = cell
            log.debug("proxy.worker_assigned", module=self.name, proxy_id=proxy_id,
                      worker_pid=cell.worker_pid)  # fmt: skip
        try:
            instance = await cell.open_instance()
        except BaseException:
            record = self.proxies.get(proxy_id)
            if record is None or record.instance_id is None or record.state is ProxyState.CLOSED:
                self._drop(proxy_id, cell)  # a new proxy's grant failed: its worker goes
            raise
        record = self.proxies.get(proxy_id)
        gone = record is None or record.state is ProxyState.CLOSED
        if gone or self._cells.get(proxy_id) is not cell:
            instance[1].close()
            self._drop(proxy_id, cell)
            raise ModuleUnavailable("the proxy was released while its worker opened it")
        return instance

    def instance_closed(self, proxy_id: int, cell: WorkerCell) -> None:
        """The client closed its channel (before RELEASE_PROXY, or instead of it): the cell ends."""
        self._drop(proxy_id, cell)

    def _drop(self, proxy_id: int, cell: WorkerCell) -> None:
        """End ``cell`` if it still serves ``proxy_id``."""
        if self._cells.get(proxy_id) is cell:
            del self._cells[proxy_id]
            self._retire(cell, "released")

    async def close_instance(self, instance_id: int, proxy_id: int | None = None) -> None:
        """The proxy is released: its worker ends. Never waits."""
        del instance_id  # the worker holds no other instance
        cell = self._cells.pop(proxy_id, None) if proxy_id is not None else None
        if cell is not None:
            self._retire(cell, "released")
