"""One module's supervision: start its worker, open instances on it, watch it end."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections.abc import Mapping

import structlog
import trio

from . import _protocol as p
from ._check import ModulePlan
from ._config import RestartPolicy
from ._proxies import ProxyTable
from ._registry import ProxyKind
from ._states import ProxyState, WorkerState, advance_worker
from ._worker import ExitStatus, WorkerCrashed, WorkerProcess, spawn_worker

log = structlog.get_logger("ipad")


class ModuleUnavailable(Exception):
    """The module's worker is not running, so no instance can be opened; says why."""


class ModuleSupervisor:
    """Runs one module's worker and keeps its state and its proxies' validity true."""

    def __init__(
        self,
        plan: ModulePlan,
        policy: RestartPolicy,
        kind: ProxyKind,
        env: Mapping[str, str],
        proxies: ProxyTable,
    ) -> None:
        self.plan = plan
        self.name = plan.name
        self.policy = policy
        self.kind = kind
        self.env = dict(env)
        self.events = proxies.events
        self.proxies = proxies
        self.state = WorkerState.STOPPED
        self.reason: str | None = None
        self.worker: WorkerProcess | None = None
        self.ready: p.Ready | None = None
        self.starts = 0
        self._instance_ids = itertools.count(1)

    # --- state ----------------------------------------------------------------

    def _set_state(self, state: WorkerState, reason: str | None = None, **fields: object) -> None:
        self.state = advance_worker(self.state, state)
        self.reason = reason
        pid = self.worker.pid if self.worker is not None else None
        self.events.publish(
            "module", self.name, state=state.value, reason=reason, worker_pid=pid, details=fields
        )

    def status(self) -> dict[str, object]:
        """The module's state for ``ipadctl status``."""
        return {
            "state": self.state.value,
            "reason": self.reason,
            "worker_pid": self.worker.pid
            if self.worker and self.state is WorkerState.RUNNING
            else None,
            "version": self.ready.version if self.ready else self.plan.source.manifest.version,
            "starts": self.starts,
            "restarts": max(self.starts - 1, 0),
            "valid": self.state is WorkerState.RUNNING,
            "proxies": len(self.proxies.of_module(self.name)),
            "proxy_kind": self.kind.name,
            "worker": str(self.plan.worker),
            "tuning": str(self.plan.tuning),
        }

    # --- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the worker and watch it; ``started`` once it is running or has failed to start."""
        async with trio.open_nursery() as nursery:
            worker = await self._start(nursery)
            task_status.started()
            if worker is None:
                return
            status = await worker.wait_exit()
            self._on_exit(worker, status)

    async def _start(self, nursery: trio.Nursery) -> WorkerProcess | None:
        self._set_state(WorkerState.STARTING)
        self.starts += 1
        argv = self.kind.worker_argv(self.plan.worker)
        try:
            worker = spawn_worker(self.name, argv, self.env, self._on_notice)
        except OSError as exc:
            self._set_state(WorkerState.FAILED, f"cannot start {argv[0]}: {exc.strerror}")
            log.error("worker.spawn_failed", module=self.name, error=str(exc))
            return None
        self.worker = worker
        nursery.start_soon(worker.watch)
        nursery.start_soon(worker.read_control)
        manifest = self.plan.source.manifest
        load = p.Load(
            module=self.name,
            entry_point=manifest.entry_point or "",
            module_dir=str(self.plan.source.directory),
            tuning=str(self.plan.tuning),
        )
        failure: str | None = None
        exiting = False  # the worker said why it cannot run and is exiting by itself
        with trio.move_on_after(self.policy.start_timeout.seconds) as timeout:
            try:
                frame = await worker.request(load)
            except WorkerCrashed:
                failure = "exited before it was ready"
            else:
                if isinstance(frame.message, p.Ready):
                    self.ready = frame.message
                else:
                    failure = _describe_error(frame.message)
                    exiting = True
        if timeout.cancelled_caught:
            failure = f"not ready within {self.policy.start_timeout}"
        if failure is not None:
            grace = self.policy.stop_timeout.seconds
            status = await (worker.finish(grace) if exiting else worker.stop(grace))
            worker.close()
            reason = f"failed to start: {failure} ({status.describe()})"
            log.error("worker.start_failed", module=self.name, worker_pid=worker.pid,
                      reason=failure, **status.log_fields())  # fmt: skip
            self._set_state(WorkerState.FAILED, reason)
            return None
        log.info("worker.ready", module=self.name, worker_pid=worker.pid,
                 version=self.ready.version if self.ready else None)  # fmt: skip
        self._set_state(WorkerState.RUNNING)
        return worker

    def _on_exit(self, worker: WorkerProcess, status: ExitStatus) -> None:
        if self.state is WorkerState.STOPPING:
            reason = f"module stopped ({status.describe()})"
        else:
            reason = f"worker exited with {status.describe()}"
        level = log.info if self.state is WorkerState.STOPPING else log.error
        level("worker.exited", module=self.name, worker_pid=worker.pid, **status.log_fields())
        worker.close()
        for record in self.proxies.of_module(self.name):
            if record.state in (ProxyState.VALID, ProxyState.PENDING):
                self.proxies.set_state(record, ProxyState.INVALID, reason)
        if self.state is WorkerState.STOPPING:
            self._set_state(WorkerState.STOPPED, "stopped")
        else:
            self._set_state(WorkerState.EXITED, reason, **status.log_fields())

    async def stop(self) -> None:
        """Stop the worker gracefully: SHUTDOWN, then SIGTERM, then SIGKILL after the grace."""
        worker = self.worker
        if worker is None or self.state not in (WorkerState.RUNNING, WorkerState.STARTING):
            return
        self._set_state(WorkerState.STOPPING, "stopping")
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.policy.stop_timeout.seconds):
                with contextlib.suppress(OSError, trio.ClosedResourceError):
                    await worker.control.send(p.Shutdown())
                await worker.wait_exit()
            await worker.stop(self.policy.stop_timeout.seconds)

    # --- instances -------------------------------------------------------------

    def _on_notice(self, message: p.Message) -> None:
        """A one-way message from the worker: an instance it closed on its own."""
        if isinstance(message, p.InstanceClosed):
            for record in self.proxies.of_module(self.name):
                if record.instance_id == message.instance_id:
                    self.proxies.set_state(record, ProxyState.CLOSED, message.reason)

    async def open_instance(self) -> tuple[int, socket.socket]:
        """Create a module instance; return its id and the client's end of its channel."""
        worker = self.worker
        if worker is None or self.state is not WorkerState.RUNNING:
            raise ModuleUnavailable(self.reason or f"module is {self.state.value}")
        instance_id = next(self._instance_ids)
        client_end, worker_end = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            try:
                frame = await worker.request(p.OpenInstance(instance_id), [worker_end.fileno()])
            finally:
                worker_end.close()
        except BaseException:
            client_end.close()
            raise
        if not isinstance(frame.message, p.InstanceOpened):
            client_end.close()
            raise ModuleUnavailable(_describe_error(frame.message))
        return instance_id, client_end

    async def close_instance(self, instance_id: int) -> None:
        """Free an instance; a worker that is gone has freed it already."""
        worker = self.worker
        if worker is None or self.state is not WorkerState.RUNNING:
            return
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await worker.control.send(p.CloseInstance(instance_id))


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
