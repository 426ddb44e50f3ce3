"""The daemon's top level: own the socket, run until told to stop.

What it owns, and in which order it lets go: the reactor and timers (one
task each for every worker's descriptors and every module's timers) outlive
everything else; inside them the launcher and the fork server; inside that
the modules' supervision, then the client listener. A stop asks each layer
to finish within its bound, innermost first; whatever cancelled the daemon,
the reaper (ipad/daemon/children.py) kills and reaps every child that is left.

Admin operations (restart, reload) run one at a time in a task of the
daemon's own (``AdminQueue``): the client that asked only waits for the
answer, and may leave without cutting the operation short.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import msgspec
import structlog
import trio

from ipad.config.check import CheckedConfig, ModulePlan, check_config
from ipad.config.model import DaemonSettings, Isolation
from ipad.config.paths import install_dir, install_module_dir, socket_path
from ipad.config.problems import ConfigError
from ipad.config.proxy_kinds import REGISTRY
from ipad.config.resolve import WorkerNotFound, resolve_worker
from ipad.config.sandbox_plan import memory_support
from ipad.daemon.cgroup import WorkerCgroups, clear_stale
from ipad.daemon.children import Children
from ipad.daemon.crashes import crashes_reply
from ipad.daemon.events import EventBus
from ipad.daemon.heartbeat import Heartbeats
from ipad.daemon.isolation import ProxyIsolatedSupervisor
from ipad.daemon.launcher import Launcher
from ipad.daemon.lifecycle import HALT_REASON
from ipad.daemon.listener import open_listener
from ipad.daemon.metrics import DaemonFacts, families, render
from ipad.daemon.metrics_file import MetricsFile
from ipad.daemon.operator import start_module, stop_module
from ipad.daemon.proxy_table import ProxyTable
from ipad.daemon.reactor import Reactor, Timers
from ipad.daemon.server import AdminError, ClientServer, serve_clients
from ipad.daemon.service import ServiceNotifier, module_health, status_line
from ipad.daemon.spawn import StartedProcess
from ipad.daemon.states import ProxyState, WorkerState
from ipad.daemon.supervisor import ModuleSupervisor, Shared, worker_env
from ipad.daemon.systemd import Notifier
from ipad.daemon.worker_process import KILL_WAIT
from ipad.protocol import wire as p

log = structlog.get_logger("ipad")


#: Room left in an ADMIN_DONE for what wraps the metrics text.
METRICS_REPLY_MARGIN = 1024

#: ``[daemon]`` keys a reload cannot apply: the socket is bound, the fork server chosen.
AT_RESTART_ONLY = ("socket", "socket_group", "forkserver")

#: The Python worker host shipped with ipad: workers it runs can be forked by the fork server.
WORKER_HOST = "ipad-worker"

#: Why a reload stops a module, as its proxies' reason reads ("module removed …").
REMOVED = "removed from the configuration"
CHANGED = "changed in the configuration: restarting"

#: Beyond each module's own stop bound, how long the daemon's stop waits for the
#: launcher and the last clean-up before it lets the reaper kill what is left.
STOP_MARGIN = 2.0

#: The signals the daemon handles: SIGTERM and SIGINT stop it, SIGHUP reloads.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Admin requests that may wait their turn; more are refused (one client's flood of
#: reloads must not queue up work for minutes).
ADMIN_QUEUE = 16


def forkable_argv(plans: Iterable[ModulePlan]) -> list[str] | None:
    """The argv of workers the fork server can fork, if any module runs the shipped host."""
    try:
        host = resolve_worker(WORKER_HOST, install=install_dir(), environ={})
    except WorkerNotFound:
        return None
    if not any(plan.worker == host for plan in plans):
        return None
    return REGISTRY.create("isolated").worker_argv(host)


def trusted_preloads(plans: Iterable[ModulePlan], trusted: Iterable[Path] = ()) -> list[str]:
    """``DIR:package.module`` of enabled modules whose code the fork server may import.

    Only modules from ipad's own install directory, or from a directory the
    operator lists in ``trusted_module_dirs``, qualify: other module code is
    never imported into the process all workers fork from.
    """
    dirs = {install_module_dir().resolve(), *(Path(d).resolve() for d in trusted)}
    # Manifests share a few directories: resolve each once (a realpath walk is ~0.1 ms).
    resolved: dict[Path, Path] = {}
    specs: set[str] = set()
    for plan in plans:
        entry = plan.source.manifest.entry_point
        if plan.signed is not None:
            continue  # signed code is imported by its worker, from verified bytes only
        found = plan.source.directory
        directory = resolved.get(found)
        if directory is None:
            directory = resolved[found] = found.resolve()
        if entry and directory in dirs:
            specs.add(f"{directory}:{entry.partition(':')[0]}")
    return sorted(specs)


def modules_info(checked: CheckedConfig) -> dict[str, dict[str, Any]]:
    """What ``ipadctl modules`` shows: every discovered module and its manifest."""
    info: dict[str, dict[str, Any]] = {}
    for name, source in checked.discovery.modules.items():
        manifest = source.manifest
        settings = checked.config.modules.get(name)
        info[name] = {
            "version": manifest.version,
            "api_version": manifest.api_version,
            "manifest": str(source.path),
            "worker": manifest.worker,
            "entry_point": manifest.entry_point,
            "description": manifest.description,
            "pipeline": {
                "handlers": list(manifest.pipeline.handlers),
                "min_version": manifest.pipeline.min_version,
                "max_version": manifest.pipeline.max_version,
            },
            "configured": settings is not None,
            "enabled": settings is not None and settings.enabled,
        }
    return info


#: prctl(2): whether the process may be traced, and its memory read, by others of its user.
PR_SET_DUMPABLE = 4


def protect_daemon() -> None:
    """Make the daemon undumpable, so no process of its user can trace it or read its memory.

    A worker of an unprivileged daemon runs as the daemon's user: its PID
    namespace and seccomp filter already keep it from the daemon; this holds
    even against one that got past both.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("daemon.dumpable", error=os.strerror(ctypes.get_errno()))


def report_unavailable(plans: Iterable[ModulePlan]) -> None:
    """Say which optional sandbox measures this host lacks, for which of these modules."""
    missing: dict[tuple[str, str], list[str]] = {}
    for plan in plans:
        for gap in plan.unavailable:
            missing.setdefault((gap.measure, gap.reason), []).append(plan.name)
    for (measure, reason), modules in sorted(missing.items()):
        log.warning("sandbox.measure_unavailable", measure=measure, reason=reason,
                    modules=sorted(modules))  # fmt: skip


@attrs.frozen
class ReloadPlan:
    """What a reload will do, worked out before anything changes."""

    new: CheckedConfig
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    #: ``[daemon]`` keys that differ but wait for a restart of the daemon.
    fixed: tuple[str, ...]
    #: Changed modules whose code differs: signed code with new digests (or signed or
    #: unsigned anew), or code on disk other than its workers loaded (``with_code_changed``).
    #: They restart onto the new code like any changed module.
    code_changed: tuple[str, ...] = ()
    #: Modules whose plan differs only in the directories their sandbox hides (another
    #: module directory was added, removed or moved): not restarted, their next worker
    #: starts with the new plan.
    refreshed: tuple[str, ...] = ()

    @classmethod
    def between(cls, old: CheckedConfig, new: CheckedConfig) -> ReloadPlan:
        """The plan that takes the daemon from ``old`` to ``new``."""
        differing = sorted(
            name
            for name in set(old.plans) & set(new.plans)
            if old.plans[name] != new.plans[name]
            or old.config.modules[name] != new.config.modules[name]
            or old.config.restart_policy(name) != new.config.restart_policy(name)
        )
        refreshed = [
            name for name in differing
            if _same_but_hidden(old.plans[name], new.plans[name])
            and old.config.modules[name] == new.config.modules[name]
            and old.config.restart_policy(name) == new.config.restart_policy(name)
        ]  # fmt: skip
        changed = [name for name in differing if name not in refreshed]
        fixed = [key for key in AT_RESTART_ONLY
                 if getattr(old.config.daemon, key) != getattr(new.config.daemon, key)]  # fmt: skip
        code = [name for name in changed if old.plans[name].signed != new.plans[name].signed]
        return cls(new, tuple(sorted(set(new.plans) - set(old.plans))),
                   tuple(sorted(set(old.plans) - set(new.plans))), tuple(changed),
                   tuple(fixed), tuple(code), tuple(refreshed))  # fmt: skip

    def with_code_changed(self, names: Iterable[str]) -> ReloadPlan:
        """The plan also restarting ``names`` (unchanged modules whose code changed on disk)."""
        more = [name for name in names if name not in self.changed and name in self.new.plans]
        if not more:
            return self
        return attrs.evolve(
            self, changed=tuple(sorted({*self.changed, *more})),
            code_changed=tuple(sorted({*self.code_changed, *more})),
            refreshed=tuple(n for n in self.refreshed if n not in more),
        )  # fmt: skip

    @property
    def starting(self) -> tuple[str, ...]:
        """The modules the reload starts: the added, and the changed anew."""
        return (*self.added, *self.changed)

    def result(self) -> dict[str, Any]:
        """What ``ipadctl reload`` prints."""
        unchanged = sorted(set(self.new.plans) - set(self.added) - set(self.changed))
        return {"added": list(self.added), "removed": list(self.removed),
                "changed": list(self.changed), "code_changed": list(self.code_changed),
                "unchanged": unchanged}  # fmt: skip


def _same_but_hidden(old: ModulePlan, new: ModulePlan) -> bool:
    """Whether two plans differ at most in the directories their sandboxes hide."""
    if old.sandbox is None or new.sandbox is None:
        return old == new
    blank = msgspec.structs.replace(new.sandbox, hidden=old.sandbox.hidden)
    return attrs.evolve(new, sandbox=blank) == old


class _Pending:
    """One admin request: what it asked, and its answer once the daemon has one."""

    def __init__(self, command: str, module: str | None) -> None:
        self.command = command
        self.module = module
        self.done = trio.Event()
        self.result: dict[str, Any] | None = None
        self.error: AdminError | None = None

    def answer(self, result: dict[str, Any] | None, error: AdminError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class AdminQueue:
    """Restart and reload, run one at a time by the daemon's own task.

    The client that asked waits for the answer and may leave: what it asked
    for is carried out all the same. A stop refuses what still waits and
    cuts short the waiting of the one under way (never its change of state).
    """

    def __init__(self, run: Callable[[str, str | None], Awaitable[dict[str, Any]]]) -> None:
        self._run = run
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._wake = trio.Event()
        self._closed: str | None = None
        self._current: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()

    async def submit(self, command: str, module: str | None) -> dict[str, Any]:
        """Queue ``command`` and wait for its answer (AdminError if it failed or was refused)."""
        pending = self.enqueue(command, module)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None  # noqa: S101 - set together with done
        return pending.result

    def enqueue(self, command: str, module: str | None) -> _Pending:
        """Queue ``command`` without waiting (SIGHUP's reload)."""
        pending = _Pending(command, module)
        if self._closed is not None:
            pending.answer(None, AdminError(p.ErrorCode.STOPPING, self._closed))
        elif len(self._waiting) >= ADMIN_QUEUE:
            waiting = f"{len(self._waiting)} admin operations wait already; try again later"
            details = {"limit": "admin_queue", "value": ADMIN_QUEUE}
            pending.answer(None, AdminError(p.ErrorCode.LIMIT_EXCEEDED, waiting, details))
        else:
            self._waiting.append(pending)
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self._wake.set()
        return pending

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry out requests in order, until cancelled."""
        task_status.started()
        while True:
            if not self._waiting:
                self._idle.set()
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            pending = self._waiting.popleft()
            with trio.CancelScope() as self._current:
                try:
                    pending.answer(await self._run(pending.command, pending.module))
                except AdminError as exc:
                    pending.answer(None, exc)
                except Exception as exc:
                    log.exception("admin.failed", command=pending.command, module=pending.module)
                    pending.answer(None, AdminError(p.ErrorCode.INTERNAL,
                                                    f"internal error: {exc!r}"))  # fmt: skip
            self._current = None
            if not pending.done.is_set():
                pending.answer(
                    None,
                    AdminError(
                        p.ErrorCode.STOPPING, f"{pending.command} cut short: {self._closed}"
                    ),
                )

    async def close(self, reason: str, timeout: float) -> None:
        """Refuse what waits, cut short the wait of what runs; let it finish within ``timeout``."""
        self._closed = reason
        while self._waiting:
            self._waiting.popleft().answer(None, AdminError(p.ErrorCode.STOPPING, reason))
        if self._current is not None:
            self._current.cancel()
        else:
            self._idle.set()  # nothing under way (or the queue never ran: a stop during the start)
        with trio.move_on_after(timeout):
            await self._idle.wait()


class DaemonRuntime:
    """The running daemon: its configuration, supervisors, and the operations on them."""

    def __init__(
        self,
        checked: CheckedConfig,
        path: Path,
        service: ServiceNotifier | None = None,
        early_forkserver: StartedProcess | None = None,
        relog: Callable[[DaemonSettings], None] | None = None,
    ) -> None:
        self.checked = checked
        #: Applies a configuration's log level and format (the command line's win).
        self.relog = relog
        self.socket_path = path
        #: systemd's notification channel (a no-op outside systemd).
        self.service = service if service is not None else ServiceNotifier(Notifier(None))
        self.events = EventBus()
        self.proxies = ProxyTable(self.events)
        self.reactor = Reactor()
        self.timers = Timers()
        #: The one reaper of every worker, standby and fork server.
        self.children = Children(self.reactor, strays=True)
        self.cgroups = WorkerCgroups.create()
        forkable = (
            forkable_argv(checked.plans.values()) if checked.config.daemon.forkserver else None
        )
        preloads = trusted_preloads(
            checked.plans.values(), checked.config.daemon.trusted_module_dirs
        )
        self.heartbeats = Heartbeats()
        self.launcher = Launcher(
            forkable, self.children, self.timers, self.cgroups, preloads, early=early_forkserver
        )
        self._protected = False
        self._prepare_sandboxes(checked.plans.values())
        #: What every module's supervisor uses of ours.
        self.shared = Shared(self.proxies, self.launcher, self.heartbeats, self.timers)
        self.supervisors: dict[str, ModuleSupervisor] = {}
        #: Supervisors a reload took out of ``supervisors``, until they have stopped.
        self.retiring: set[ModuleSupervisor] = set()
        self.stop_requested = trio.Event()
        #: Where the modules' jobs run: it outlives every supervisor (set by run()).
        self._supervision: trio.Nursery | None = None
        self._launcher_done = trio.Event()
        #: Set once every client session has ended (their proxies released).
        self._clients_done = trio.Event()
        #: Cancelled by a stop that comes while the modules first start.
        self._starting: trio.CancelScope | None = None
        self.admin_queue = AdminQueue(self._admin_operation)
        self.clients = ClientServer(
            self.supervisors,
            self.proxies,
            self.events,
            lambda: modules_info(self.checked),
            str(path),
            controller=self,
            extra_status=self._status,
        )
        self.clients.limits = checked.config.clients
        self.clients.policy = checked.access.policy
        #: ``daemon.metrics_file``'s writer, which reads the settings in force at each write.
        self.metrics_file = MetricsFile(self._metrics_settings,
                                        lambda: self.metrics_text(openmetrics=False))  # fmt: skip
        for group in checked.access.missing_defaults:
            log.info("access.default_group_missing", group=group,
                     reason="no such group: it grants nothing (access.admin_groups)")  # fmt: skip

    def _prepare_sandboxes(self, plans: Iterable[ModulePlan]) -> None:
        """Set up what sandboxed modules need of the daemon, at start or at the reload adding them.

        Said once per module: the optional measures this host lacks. Done once
        per daemon: making it undumpable, and the memory controller for limits.
        """
        plans = list(plans)
        report_unavailable(plans)
        sandboxes = [plan.sandbox for plan in plans if plan.sandbox is not None]
        if sandboxes and not self._protected:
            protect_daemon()
            self._protected = True
        if any(spec.memory_max is not None for spec in sandboxes):
            self.launcher.enable_memory(memory_support())

    def _status(self) -> dict[str, Any]:
        return {
            "config": str(self.checked.path),
            "forkserver_pid": self.launcher.forkserver.pid if self.launcher.forkserver else None,
            "workers_forked": self.launcher.forks,
            "workers_spawned": self.launcher.spawns,
            "cgroup": str(self.cgroups.base) if self.cgroups else None,
        }

    def metrics_text(self, *, openmetrics: bool = True, module: str | None = None) -> str:
        """Every metric (or the daemon's and one module's) as text (ipad/daemon/metrics.py)."""
        supervisors = self.supervisors if module is None else {module: self.supervisors[module]}
        facts = DaemonFacts(len(self.clients.sessions), self.clients.refusals,
                            self.events.dropped, self.events.cut_off)  # fmt: skip
        found = families(supervisors, self.shared.metrics, facts, trio.current_time())
        return render(found, openmetrics=openmetrics)

    def _metrics_settings(self) -> tuple[Path | None, float]:
        daemon = self.checked.config.daemon
        return daemon.metrics_file, daemon.metrics_interval.seconds

    def _metrics_reply(self, module: str | None) -> dict[str, Any]:
        """ADMIN ``metrics``: the OpenMetrics text, if it fits one reply."""
        if module is not None and module not in self.supervisors:
            known = ", ".join(sorted(self.supervisors)) or "none"
            raise AdminError(p.ErrorCode.UNKNOWN_MODULE, f"no module {module!r}; modules: {known}")
        text = self.metrics_text(module=module)
        if len(text.encode()) > p.MAX_PAYLOAD - METRICS_REPLY_MARGIN:
            raise AdminError(p.ErrorCode.LIMIT_EXCEEDED,
                             "the metrics do not fit one reply: name a module, or read "
                             "daemon.metrics_file", {"bytes": len(text.encode())})  # fmt: skip
        return {"format": "openmetrics", "text": text}

    def summary(self) -> str:
        """The module and proxy counts systemd shows as the service's status."""
        health = []
        for sup in self.supervisors.values():
            clean = sup.last_exit is not None and sup.last_exit.clean
            restart = sup.policy.restart
            health.append(module_health(sup.state, exited_cleanly=clean, restart=restart))
        return status_line(health, len(self.proxies))

    def _supervisor(self, checked: CheckedConfig, name: str) -> ModuleSupervisor:
        settings = checked.config.modules[name]
        proxy = settings.isolation is Isolation.PROXY
        return (ProxyIsolatedSupervisor if proxy else ModuleSupervisor)(
            checked.plans[name],
            checked.config.restart_policy(name),
            REGISTRY.create(settings.proxy),
            worker_env(settings.env),
            self.shared,
            fallback=settings.fallback,
            on_stable=self._module_stable,
        )

    async def start_modules(self, names: Iterable[str]) -> None:
        """Start modules at once; return when each is running or has failed to start."""
        assert self._supervision is not None  # noqa: S101 - set by run()
        started = []
        for name in names:
            supervisor = self.supervisors[name] = self._supervisor(self.checked, name)
            supervisor.begin(self._supervision)
            started.append(supervisor)
        for supervisor in started:
            await supervisor.wait_first_state()

    async def run(self, listener: socket.socket, task_status: trio.TaskStatus[Path]) -> None:
        """Start everything, serve until asked to stop, then stop everything.

        Whatever ends this -- a stop, a bug, a cancellation from outside --
        every child is killed and reaped and the cgroups removed before it returns.
        """
        try:
            await self.service.starting(len(self.checked.plans))
            async with trio.open_nursery() as services:
                await services.start(self.reactor.run)
                await services.start(self.timers.run)
                if self.cgroups is not None:
                    services.start_soon(trio.to_thread.run_sync, clear_stale, self.cgroups.parent)
                await self._run(listener, task_status)
                services.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.children.close()
                with trio.move_on_after(STOP_MARGIN):
                    if self.cgroups is not None:
                        await self.cgroups.aclose()
                self.launcher.close()
                self.reactor.close()

    async def _run(self, listener: socket.socket, task_status: trio.TaskStatus[Path]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.service.follow, self.events, self.summary)
            launcher = trio.CancelScope()
            await nursery.start(self._run_launcher, launcher)
            await nursery.start(self.heartbeats.run)
            async with trio.open_nursery() as supervision:
                self._supervision = supervision
                # Clients are served from the start (ipadctl status, stop); a proxy asked
                # for meanwhile waits for its module's first start to come to a result.
                clients = trio.CancelScope()
                await supervision.start(self._serve_clients, listener, clients)
                with trio.CancelScope() as self._starting:
                    await self.start_modules(self.checked.plans)
                self._starting = None
                if not self.stop_requested.is_set():
                    await supervision.start(self.admin_queue.run)
                    await self._started(task_status)
                    supervision.start_soon(self.metrics_file.run)  # every module in it
                    await self.stop_requested.wait()
                await self._shutdown(clients)
                supervision.cancel_scope.cancel()
            with trio.CancelScope(shield=True):  # the fork server, within its grace
                launcher.cancel()
                with trio.move_on_after(STOP_MARGIN):
                    await self._launcher_done.wait()
            nursery.cancel_scope.cancel()

    async def _started(self, task_status: trio.TaskStatus[Path]) -> None:
        """Say the daemon started: log, READY=1, ``task_status``; then allow the standbys."""
        states = {name: sup.state.value for name, sup in self.supervisors.items()}
        log.info("daemon.started", socket=str(self.socket_path), pid=os.getpid(),
                 modules=states, config=str(self.checked.path),
                 forkserver=self.launcher.forkserver is not None,
                 systemd=self.service.enabled)  # fmt: skip
        await self.service.ready(self.summary())
        task_status.started(self.socket_path)
        # Every module has reached its final state and clients are served: only
        # now the standbys, which would otherwise compete with the actives' start.
        for supervisor in self.supervisors.values():
            supervisor.allow_standby()

    async def _run_launcher(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            with scope:
                await self.launcher.run(task_status=task_status)
        finally:
            self._launcher_done.set()

    async def _serve_clients(
        self,
        listener: socket.socket,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            with scope:
                await serve_clients(listener, self.clients, task_status=task_status)
        finally:
            self._clients_done.set()

    async def _shutdown(self, clients: trio.CancelScope) -> None:
        """Finish the admin operation under way, tell every client, stop every module.

        Shielded but bounded: each step has its own deadline, and the slowest
        module's ``stop_timeout`` (plus the kernel's time to reap) bounds the whole.
        """
        with trio.CancelScope(shield=True):
            # A reload under way completes its RELOADING=1 with READY=1 before STOPPING=1.
            await self.admin_queue.close("the daemon is stopping", STOP_MARGIN)
            await self.service.stopping(self.summary())
            sessions = list(self.clients.sessions)
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    nursery.start_soon(session.say_goodbye, "daemon stopping")
                for supervisor in [*self.supervisors.values(), *self.retiring]:
                    nursery.start_soon(supervisor.stop)
            clients.cancel()
            with trio.move_on_after(STOP_MARGIN):  # sessions release their proxies, then end
                await self._clients_done.wait()

    async def _module_stable(self, module: str) -> None:
        """A module runs stably again: move the proxies its fallback served back to it."""
        for record in self.proxies.of_fallback(module):
            serving = self.supervisors.get(record.served_by)
            self.proxies.set_state(record, ProxyState.INVALID, f"returning to {module}")
            log.info("proxy.returning", proxy_id=record.proxy_id, module=module,
                     served_by=record.served_by)  # fmt: skip
            if serving is not None and record.instance_id is not None:
                await serving.close_instance(record.instance_id, record.proxy_id)

    # --- admin operations --------------------------------------------------------

    async def admin(self, command: str, module: str | None) -> dict[str, Any]:
        """Run an operator's command (restart MODULE, reload, stop) on the daemon's behalf."""
        if command == "stop" and module is None:
            self.request_stop(requested_by="admin")
            return {"stopping": True}
        if command == "crashes":
            return self.crashes(module)
        if command == "metrics":  # read-only: not queued behind a reload
            return self._metrics_reply(module)
        if command == "stop":  # one module: at once, not behind a start or reload under way
            return await stop_module(self.supervisors, self.events, module)
        if command == "start":
            return await start_module(self.supervisors, self.events, module)
        if command not in ("restart", "reload"):
            raise AdminError(p.ErrorCode.UNKNOWN_COMMAND, f"unknown command {command!r}",
                             {"commands": ["restart", "reload", "stop", "start", "crashes",
                                           "metrics"]})  # fmt: skip
        return await self.admin_queue.submit(command, module)

    def crashes(self, module: str | None) -> dict[str, Any]:
        """Recent crash reports of ``module``, or of every module (ipad/daemon/crashes.py)."""
        if module is not None and module not in self.supervisors:
            known = ", ".join(sorted(self.supervisors)) or "none"
            raise AdminError(p.ErrorCode.UNKNOWN_MODULE, f"no module {module!r}; modules: {known}")
        names = [module] if module is not None else list(self.supervisors)
        return crashes_reply({name: self.supervisors[name].crashes for name in names})

    def request_stop(self, **by: str) -> None:
        """Stop the daemon; ``by`` says who asked (``signal=`` or ``requested_by=``)."""
        if self.stop_requested.is_set():
            log.info("daemon.already_stopping", **by)
            return
        log.info("daemon.stopping", **by)
        self.stop_requested.set()
        if self._starting is not None:  # the daemon's own start: no need to see it through
            self._starting.cancel()

    async def _admin_operation(self, command: str, module: str | None) -> dict[str, Any]:
        if command == "restart":
            return await self.restart(module)
        return await self.reload()

    async def restart(self, module: str | None) -> dict[str, Any]:
        """Restart one module's worker now, ending any backoff or cooldown.

        Answers once the new start has come to a result, within the old
        worker's stop and the new one's start timeout.
        """
        supervisor = self.supervisors.get(module or "")
        if supervisor is None:
            known = ", ".join(sorted(self.supervisors)) or "none"
            raise AdminError(p.ErrorCode.UNKNOWN_MODULE, f"no module {module!r}; modules: {known}")
        before = supervisor.starts
        log.info("module.restart_asked", module=module)
        supervisor.restart()
        policy = supervisor.policy

        def settled() -> bool:
            started_anew = (
                supervisor.starts > before and supervisor.state is not WorkerState.STARTING
            )
            return started_anew or supervisor.stop_requested() or supervisor.halted

        await self.events.wait_until(settled, policy.stop_timeout.seconds +
                                     policy.start_timeout.seconds)  # fmt: skip
        # Stopped by the operator meanwhile: it says so, not "stopping" while its workers end.
        reason = HALT_REASON if supervisor.halted else supervisor.reason
        return {"module": module, "state": supervisor.state.value, "reason": reason}

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration: start added modules, stop removed ones, restart changed ones.

        An invalid new configuration changes nothing: the old one keeps running.
        RELOADING=1 is always followed by READY=1, whatever ends the reload.
        """
        await self.service.reloading(self.summary())
        try:
            return await self._reload()
        finally:
            with trio.CancelScope(shield=True):  # bounded: NOTIFY_TIMEOUT
                await self.service.ready(self.summary())  # done, or failed: the old config runs

    async def _update_forkserver(self, new: CheckedConfig, changed: Iterable[str],
                                 old: CheckedConfig, code: Iterable[str] = ()) -> None:  # fmt: skip
        """The fork server the new configuration needs: a first one, or one with fresh code.

        A start without any module the fork server can fork ran none: the reload
        that brings the first starts it (unless ``forkserver = false``). Trusted
        modules' code is imported into the fork server once; a module whose
        manifest changed (say, a new version) or another set of trusted modules
        needs a fork server that imports them afresh.
        """
        trusted = new.config.daemon.trusted_module_dirs
        preloads = trusted_preloads(new.plans.values(), trusted)
        if self.launcher.forkable is None:
            wanted = old.config.daemon.forkserver  # the running choice: kept
            forkable = forkable_argv(new.plans.values()) if wanted else None
            if forkable is not None:
                self.launcher.preloads = preloads
                await self.launcher.enable_forking(forkable)
            return
        # Only a module found anew (its manifest or directory changed), or whose code
        # changed on disk, may bring new code.
        found_anew = [
            new.plans[name] for name in changed
            if old.plans[name].source != new.plans[name].source or name in code
        ]  # fmt: skip
        stale = trusted_preloads(found_anew, trusted)
        if preloads != self.launcher.preloads or stale:
            log.info("forkserver.renewing", reason="preloaded code changed" if stale
                     else "other trusted modules", modules=stale)  # fmt: skip
            await self.launcher.renew(preloads)

    async def _reload(self) -> dict[str, Any]:
        """Check, plan, prepare; then switch to the new configuration in one step, and carry it out.

        Everything that can fail comes before the switch, which has no await in
        it: the old configuration stays in force, or the new one is, never a
        mix. What follows the switch (stopping, starting) is the daemon's to
        finish, wherever this is cut short.
        """
        old = self.checked
        log.info("daemon.reloading", config=str(old.path))
        try:
            new = await trio.to_thread.run_sync(check_config, old.path, abandon_on_cancel=True)
        except ConfigError as exc:
            problems = [str(problem) for problem in exc.problems]
            log.error("daemon.reload_failed", problems=problems)
            message = "the new configuration is invalid; the old one keeps running"
            details = {"problems": problems}
            raise AdminError(p.ErrorCode.INVALID_CONFIG, message, details) from None
        plan = ReloadPlan.between(old, new)
        unchanged = [name for name in set(old.plans) & set(new.plans)
                     if name not in plan.changed and name in self.supervisors]  # fmt: skip
        plan = plan.with_code_changed(
            sorted(name for name in unchanged if self.supervisors[name].code_changed())
        )
        if plan.code_changed:
            log.info("daemon.code_changed", modules=list(plan.code_changed))
        if plan.fixed:
            log.warning("daemon.reload_needs_restart", keys=[f"daemon.{k}" for k in plan.fixed],
                        reason="these take effect when the daemon restarts")  # fmt: skip
        try:
            self._prepare_sandboxes(new.plans[name] for name in plan.starting)
        except OSError as exc:
            log.error("daemon.reload_failed", error=str(exc))
            raise AdminError(p.ErrorCode.INTERNAL, f"cannot prepare the sandboxes: {exc}; "
                             "the old configuration keeps running") from None  # fmt: skip
        predecessors = self._switch(plan)
        # From here on the new configuration is in force.
        await self.clients.revoke_denied()
        try:
            await self._update_forkserver(new, plan.changed, old, set(plan.code_changed))
        except Exception:
            log.exception("forkserver.update_failed")  # workers are spawned meanwhile
        assert self._supervision is not None  # noqa: S101 - set by run()
        starting = [self.supervisors[name] for name in plan.starting]
        for supervisor in starting:
            self._supervision.start_soon(self._begin_after, supervisor, predecessors.get(
                supervisor.name))  # fmt: skip
        bound = max((s.policy.stop_timeout.seconds + s.policy.start_timeout.seconds
                     for s in starting), default=0.0)  # fmt: skip
        await self.events.wait_until(lambda: all(s.settled for s in starting), bound)
        result = plan.result()
        log.info("daemon.reloaded", **result)
        return result

    def _switch(self, plan: ReloadPlan) -> dict[str, ModuleSupervisor]:
        """Put the new configuration in force, with no await: the old one's stopping modules."""
        if self.relog is not None:
            self.relog(plan.new.config.daemon)
        # New connections and requests are judged by the new policy and limits from now on.
        self.clients.limits = plan.new.config.clients
        self.clients.policy = plan.new.access.policy
        self.checked = plan.new
        self.metrics_file.reconfigure()
        predecessors: dict[str, ModuleSupervisor] = {}
        for name, why in [*((n, REMOVED) for n in plan.removed),
                          *((n, CHANGED) for n in plan.changed)]:  # fmt: skip
            old = self.supervisors.pop(name)
            self.retiring.add(old)
            old.request_stop(why)
            predecessors[name] = old
            assert self._supervision is not None  # noqa: S101 - set by run()
            self._supervision.start_soon(self._retire, old)
        for name in plan.starting:
            self.supervisors[name] = self._supervisor(plan.new, name)
        for name in plan.refreshed:  # only the directories its sandbox hides differ
            self.supervisors[name].plan = plan.new.plans[name]
        return predecessors

    async def _retire(self, supervisor: ModuleSupervisor) -> None:
        """Forget a supervisor a reload replaced, once it has stopped (or at the daemon's stop)."""
        try:
            await supervisor.wait_finished()
        finally:
            self.retiring.discard(supervisor)

    async def _begin_after(
        self, supervisor: ModuleSupervisor, predecessor: ModuleSupervisor | None
    ) -> None:
        """Start a module the reload brings once the one it replaces has stopped.

        Both at once could hold the same device; the old one's stop is bounded.
        """
        if predecessor is not None:
            with trio.move_on_after(predecessor.policy.stop_timeout.seconds + KILL_WAIT):
                await predecessor.wait_finished()
        if self.stop_requested.is_set() or self.supervisors.get(supervisor.name) is not supervisor:
            supervisor.request_stop()  # never to run: it finishes at once
            return
        if predecessor is not None and predecessor.halted:
            supervisor.halt()  # the operator stopped it: a reload does not start it
        assert self._supervision is not None  # noqa: S101 - set by run()
        supervisor.begin(self._supervision)
        await supervisor.wait_first_state()
        supervisor.allow_standby()


async def run_daemon(
    checked: CheckedConfig,
    early_forkserver: StartedProcess | None = None,
    relog: Callable[[DaemonSettings], None] | None = None,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start every module, serve clients until SIGTERM or SIGINT, then stop everything.

    SIGHUP reloads the configuration. ``early_forkserver`` is the fork server
    the caller started before reading the configuration (ipad/daemon/start_forkserver.py), if any;
    ``relog`` applies a reloaded configuration's log settings.
    ``task_status`` reports the socket path
    once every module has reached a first state (running, or failed with its
    reason) and clients are served.
    """
    service = ServiceNotifier.from_environment()
    try:
        configured = socket_path(checked.config.daemon.socket)
        listener, path, activated = open_listener(configured, checked.access.socket_gid)
        runtime = DaemonRuntime(checked, path, service, early_forkserver, relog)
        # What trio restores when its receiver closes, and what it then hands the signals
        # still pending to: ignored. A second SIGTERM (systemd, an impatient operator)
        # must not kill a daemon in its last milliseconds, before daemon.stopped and 0.
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        try:
            with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_handle_signals, runtime, signals)
                    nursery.start_soon(service.keep_watchdog)
                    await runtime.run(listener, task_status)
                    nursery.cancel_scope.cancel()
        finally:
            listener.close()
            if not activated:  # an inherited socket's path belongs to its socket unit
                path.unlink(missing_ok=True)
    finally:
        service.close()
    log.info("daemon.stopped")


async def _handle_signals(runtime: DaemonRuntime, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            runtime.admin_queue.enqueue("reload", None)  # answered to nobody: logged
        else:
            runtime.request_stop(signal=name)
