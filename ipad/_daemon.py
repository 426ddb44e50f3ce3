"""The daemon's top level: own the socket, run until told to stop."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import structlog
import trio

from ._check import CheckedConfig
from ._events import EventBus
from ._paths import socket_path
from ._proxies import ProxyTable
from ._registry import REGISTRY
from ._server import Daemon, serve_clients
from ._supervisor import ModuleSupervisor, worker_env

log = structlog.get_logger("ipad")

#: How many connections may wait for accept(); beyond it the kernel refuses them.
LISTEN_BACKLOG = 128


class SocketInUse(RuntimeError):
    """Another process is serving on the configured socket, or the path is not ours to take."""


def bind_listener(path: Path) -> socket.socket:
    """Create the daemon's SEQPACKET listening socket at ``path``.

    A leftover file is replaced only if it is a socket nobody listens on, so a
    second daemon never steals a running one's clients and a typo in the
    configuration never deletes a regular file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        path.chmod(0o660)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("socket.stale_removed", path=str(path))
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUse(f"another daemon is listening on {path}")


def build_supervisors(checked: CheckedConfig, proxies: ProxyTable) -> dict[str, ModuleSupervisor]:
    """One supervisor per enabled module, with its proxy kind, policy and environment."""
    config = checked.config
    return {
        name: ModuleSupervisor(
            plan,
            config.restart_policy(name),
            REGISTRY.create(config.modules[name].proxy),
            worker_env(config.modules[name].env),
            proxies,
        )
        for name, plan in checked.plans.items()
    }


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


async def run_daemon(
    checked: CheckedConfig, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    """Start every module, serve clients until SIGTERM or SIGINT, then stop everything.

    ``task_status`` reports the socket path once every module has reached a
    final state (running, or failed with its reason) and clients are served.
    """
    path = socket_path(checked.config.daemon.socket)
    listener = bind_listener(path)
    events = EventBus()
    proxies = ProxyTable(events)
    supervisors = build_supervisors(checked, proxies)
    daemon = Daemon(supervisors, proxies, events, lambda: modules_info(checked), str(path))
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await _start_modules(nursery, supervisors.values())
                await nursery.start(serve_clients, listener, daemon)
                states = {name: sup.state.value for name, sup in supervisors.items()}
                log.info("daemon.started", socket=str(path), pid=os.getpid(),
                         modules=states, config=str(checked.path))  # fmt: skip
                task_status.started(path)
                async for signum in signals:
                    log.info("daemon.stopping", signal=signal.Signals(signum).name)
                    break
                nursery.start_soon(_while_stopping, signals)
                await _shutdown(daemon)
                nursery.cancel_scope.cancel()
    finally:
        listener.close()
        path.unlink(missing_ok=True)
    log.info("daemon.stopped")


async def _start_modules(nursery: trio.Nursery, supervisors: Iterable[ModuleSupervisor]) -> None:
    """Start every module at once; return when each is running or has failed."""

    async def start_one(supervisor: ModuleSupervisor) -> None:
        await nursery.start(supervisor.run)

    async with trio.open_nursery() as starters:
        for supervisor in supervisors:
            starters.start_soon(start_one, supervisor)


async def _while_stopping(signals: AsyncIterator[int]) -> None:
    """Consume further stop signals so they do not interrupt the orderly shutdown."""
    async for signum in signals:
        log.info("daemon.already_stopping", signal=signal.Signals(signum).name)


async def _shutdown(daemon: Daemon) -> None:
    """Tell every client, then stop every worker in parallel."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for session in list(daemon.sessions):
                nursery.start_soon(session.say_goodbye, "daemon stopping")
        async with trio.open_nursery() as nursery:
            for supervisor in daemon.supervisors.values():
                nursery.start_soon(supervisor.stop)
