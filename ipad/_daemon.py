"""The daemon's top level: own the socket, run until told to stop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import structlog
import trio

from . import _protocol as p
from ._cgroup import WorkerCgroups
from ._check import CheckedConfig, ModulePlan, check_config
from ._config import DaemonSettings
from ._events import EventBus
from ._heartbeat import Heartbeats
from ._launcher import Launcher
from ._listener import open_listener
from ._paths import install_dir, install_module_dir, socket_path
from ._problems import ConfigError
from ._proxies import ProxyTable
from ._registry import REGISTRY
from ._resolve import WorkerNotFound, resolve_worker
from ._sandbox_plan import memory_support
from ._server import AdminError, Daemon, serve_clients
from ._service import ServiceNotifier, module_health, status_line
from ._spawn import StartedProcess
from ._states import ProxyState
from ._supervisor import ModuleSupervisor, Shared, worker_env
from ._systemd import Notifier

log = structlog.get_logger("ipad")


#: ``[daemon]`` keys a reload cannot apply: the socket is bound, the fork server chosen.
AT_RESTART_ONLY = ("socket", "socket_group", "forkserver")

#: The Python worker host shipped with ipad: workers it runs can be forked by the fork server.
WORKER_HOST = "ipad-worker"

#: Why a reload stops a module, as its proxies' reason reads ("module removed …").
REMOVED = "removed from the configuration"
CHANGED = "changed in the configuration: restarting"


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
        self.cgroups = WorkerCgroups.create()
        forkable = (
            forkable_argv(checked.plans.values()) if checked.config.daemon.forkserver else None
        )
        preloads = trusted_preloads(
            checked.plans.values(), checked.config.daemon.trusted_module_dirs
        )
        self.heartbeats = Heartbeats()
        self.launcher = Launcher(forkable, self.cgroups, preloads, early=early_forkserver)
        self._protected = False
        self._prepare_sandboxes(checked.plans.values())
        #: What every module's supervisor uses of ours.
        self.shared = Shared(self.proxies, self.launcher, self.heartbeats)
        self.supervisors: dict[str, ModuleSupervisor] = {}
        self.stop_requested = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reload_lock = trio.Lock()
        self.daemon = Daemon(
            self.supervisors,
            self.proxies,
            self.events,
            lambda: modules_info(self.checked),
            str(path),
            controller=self,
            extra_status=self._status,
        )
        self.daemon.limits = checked.config.clients
        self.daemon.policy = checked.access.policy
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

    def summary(self) -> str:
        """The module and proxy counts systemd shows as the service's status."""
        health = []
        for sup in self.supervisors.values():
            exited = sup.worker.exit_status if sup.worker is not None else None
            clean = exited is not None and exited.clean
            restart = sup.policy.restart
            health.append(module_health(sup.state, exited_cleanly=clean, restart=restart))
        return status_line(health, len(self.proxies))

    def _supervisor(self, checked: CheckedConfig, name: str) -> ModuleSupervisor:
        settings = checked.config.modules[name]
        return ModuleSupervisor(
            checked.plans[name],
            checked.config.restart_policy(name),
            REGISTRY.create(settings.proxy),
            worker_env(settings.env),
            self.shared,
            fallback=settings.fallback,
            on_stable=self._module_stable,
        )

    async def start_modules(self, nursery: trio.Nursery, names: Iterable[str]) -> None:
        """Start modules at once; return when each is running or has failed to start."""

        async def start_one(name: str) -> None:
            supervisor = self._supervisor(self.checked, name)
            self.supervisors[name] = supervisor
            await nursery.start(supervisor.run)

        async with trio.open_nursery() as starters:
            for name in names:
                starters.start_soon(start_one, name)

    async def run(self, listener: socket.socket, task_status: trio.TaskStatus[Path]) -> None:
        """Start everything, serve until asked to stop, then stop everything."""
        try:
            await self._run(listener, task_status)
        finally:
            if self.cgroups is not None:
                self.cgroups.close()
            self.launcher.close()

    async def _run(self, listener: socket.socket, task_status: trio.TaskStatus[Path]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.service.starting(len(self.checked.plans))
            nursery.start_soon(self.service.follow, self.events, self.summary)
            await nursery.start(self.launcher.run)
            await nursery.start(self.heartbeats.run)
            await self.start_modules(nursery, self.checked.plans)
            await nursery.start(serve_clients, listener, self.daemon)
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
            await self.stop_requested.wait()
            await self.service.stopping(self.summary())
            await self._shutdown()
            nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        """Tell every client, then stop every worker in parallel."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for session in list(self.daemon.sessions):
                    nursery.start_soon(session.say_goodbye, "daemon stopping")
            async with trio.open_nursery() as nursery:
                for supervisor in self.supervisors.values():
                    nursery.start_soon(supervisor.stop)

    async def _module_stable(self, module: str) -> None:
        """A module runs stably again: move the proxies its fallback served back to it."""
        for record in self.proxies.of_fallback(module):
            serving = self.supervisors.get(record.served_by)
            self.proxies.set_state(record, ProxyState.INVALID, f"returning to {module}")
            log.info("proxy.returning", proxy_id=record.proxy_id, module=module,
                     served_by=record.served_by)  # fmt: skip
            if serving is not None and record.instance_id is not None:
                await serving.close_instance(record.instance_id)

    # --- admin operations --------------------------------------------------------

    async def admin(self, command: str, module: str | None) -> dict[str, Any]:
        """Run an operator's command (restart MODULE, reload, stop)."""
        if command == "restart":
            return await self.restart(module)
        if command == "reload":
            return await self.reload()
        if command == "stop":
            log.info("daemon.stopping", requested_by="admin")
            self.stop_requested.set()
            return {"stopping": True}
        raise AdminError(p.ErrorCode.UNKNOWN_COMMAND, f"unknown command {command!r}",
                         {"commands": ["restart", "reload", "stop"]})  # fmt: skip

    async def restart(self, module: str | None) -> dict[str, Any]:
        """Restart one module's worker now, ending any backoff or cooldown."""
        supervisor = self.supervisors.get(module or "")
        if supervisor is None:
            known = ", ".join(sorted(self.supervisors)) or "none"
            raise AdminError(p.ErrorCode.UNKNOWN_MODULE, f"no module {module!r}; modules: {known}")
        await supervisor.restart()
        with trio.move_on_after(supervisor.policy.start_timeout.seconds):
            await supervisor.wait_running()
        return {"module": module, "state": supervisor.state.value, "reason": supervisor.reason}

    async def reload(self) -> dict[str, Any]:
        """Re-read the configuration: start added modules, stop removed ones, restart changed ones.

        An invalid new configuration changes nothing: the old one keeps running.
        """
        async with self._reload_lock:
            await self.service.reloading(self.summary())
            try:
                return await self._reload()
            finally:
                await self.service.ready(self.summary())  # done, or failed: the old config runs

    async def _update_forkserver(self, new: CheckedConfig, changed: list[str]) -> None:
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
            wanted = self.checked.config.daemon.forkserver  # the running choice: kept
            forkable = forkable_argv(new.plans.values()) if wanted else None
            if forkable is not None:
                self.launcher.preloads = preloads
                await self.launcher.enable_forking(forkable)
            return
        # Only a module found anew (its manifest or directory changed) may bring new code.
        old = self.checked.plans
        found_anew = [
            new.plans[name] for name in changed if old[name].source != new.plans[name].source
        ]
        stale = trusted_preloads(found_anew, trusted)
        if preloads != self.launcher.preloads or stale:
            log.info("forkserver.renewing", reason="preloaded code changed" if stale
                     else "other trusted modules", modules=stale)  # fmt: skip
            await self.launcher.renew(preloads)

    async def _reload(self) -> dict[str, Any]:
        log.info("daemon.reloading", config=str(self.checked.path))
        try:
            new = check_config(self.checked.path)
        except ConfigError as exc:
            problems = [str(problem) for problem in exc.problems]
            log.error("daemon.reload_failed", problems=problems)
            message = "the new configuration is invalid; the old one keeps running"
            details = {"problems": problems}
            raise AdminError(p.ErrorCode.INVALID_CONFIG, message, details) from None
        old = self.checked
        removed = sorted(set(old.plans) - set(new.plans))
        added = sorted(set(new.plans) - set(old.plans))
        changed = sorted(
            name
            for name in set(old.plans) & set(new.plans)
            if old.plans[name] != new.plans[name]
            or old.config.modules[name] != new.config.modules[name]
            or old.config.restart_policy(name) != new.config.restart_policy(name)
        )
        fixed = [key for key in AT_RESTART_ONLY
                 if getattr(old.config.daemon, key) != getattr(new.config.daemon, key)]  # fmt: skip
        if fixed:
            log.warning("daemon.reload_needs_restart", keys=[f"daemon.{key}" for key in fixed],
                        reason="these take effect when the daemon restarts")  # fmt: skip
        if self.relog is not None:
            self.relog(new.config.daemon)
        # New connections and requests are judged by the new policy and limits from now on.
        self.daemon.limits = new.config.clients
        self.daemon.policy = new.access.policy
        await self.daemon.revoke_denied()
        async with trio.open_nursery() as stopping:
            for name in removed:
                stopping.start_soon(self.supervisors[name].stop, REMOVED)
            for name in changed:
                stopping.start_soon(self.supervisors[name].stop, CHANGED)
        for name in [*removed, *changed]:
            del self.supervisors[name]
        await self._update_forkserver(new, changed)
        self._prepare_sandboxes(new.plans[name] for name in [*added, *changed])
        self.checked = new
        assert self._nursery is not None  # noqa: S101 - set by run()
        await self.start_modules(self._nursery, [*added, *changed])
        for name in [*added, *changed]:
            self.supervisors[name].allow_standby()
        result = {"added": added, "removed": removed, "changed": changed,
                  "unchanged": sorted(set(new.plans) - set(added) - set(changed))}  # fmt: skip
        log.info("daemon.reloaded", **result)
        return result


async def run_daemon(
    checked: CheckedConfig,
    early_forkserver: StartedProcess | None = None,
    relog: Callable[[DaemonSettings], None] | None = None,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start every module, serve clients until SIGTERM or SIGINT, then stop everything.

    SIGHUP reloads the configuration. ``early_forkserver`` is the fork server
    the caller started before reading the configuration (ipad/_zygote.py), if any;
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
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
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
            with contextlib.suppress(AdminError):
                await runtime.reload()
        elif runtime.stop_requested.is_set():
            log.info("daemon.already_stopping", signal=name)
        else:
            log.info("daemon.stopping", signal=name)
            runtime.stop_requested.set()
