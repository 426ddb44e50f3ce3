"""``ipadctl stop MODULE`` and ``ipadctl start MODULE``: the operator halts and resumes a module.

A halted module is ``stopped`` with the reason ``stopped by operator``: its
workers end, its proxies turn invalid with that reason (calls fail at once,
saying so), nothing restarts it. Starting it again lets its proxies recover
as after a crash. The halt lives in the module's lifecycle
(ipad/daemon/lifecycle.py: Halt, Resume); a reload that replaces the module
keeps it halted, and a daemon restart forgets it (``enabled = false`` is the
lasting way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from ipad.daemon.events import EventBus
from ipad.daemon.server import AdminError
from ipad.daemon.states import WorkerState
from ipad.daemon.supervisor import ModuleSupervisor
from ipad.daemon.worker_process import KILL_WAIT
from ipad.protocol import wire as p

log = structlog.get_logger("ipad")


def supervisor_of(
    supervisors: Mapping[str, ModuleSupervisor], module: str | None
) -> ModuleSupervisor:
    """The module's supervisor, or AdminError(unknown_module) naming the modules there are."""
    supervisor = supervisors.get(module or "")
    if supervisor is None:
        known = ", ".join(sorted(supervisors)) or "none"
        raise AdminError(p.ErrorCode.UNKNOWN_MODULE, f"no module {module!r}; modules: {known}")
    return supervisor


def _result(supervisor: ModuleSupervisor) -> dict[str, Any]:
    return {"module": supervisor.name, "state": supervisor.state.value, "reason": supervisor.reason}


async def stop_module(
    supervisors: Mapping[str, ModuleSupervisor], events: EventBus, module: str | None
) -> dict[str, Any]:
    """Halt the module; answer once its workers are gone (bounded by its stop_timeout)."""
    supervisor = supervisor_of(supervisors, module)
    log.info("module.stop_asked", module=module)
    supervisor.halt()

    def stopped() -> bool:
        return supervisor.halt_settled() or supervisor.stop_requested()

    await events.wait_until(stopped, supervisor.policy.stop_timeout.seconds + 2 * KILL_WAIT)
    return _result(supervisor)


async def start_module(
    supervisors: Mapping[str, ModuleSupervisor], events: EventBus, module: str | None
) -> dict[str, Any]:
    """Start a halted module (or one waiting out a backoff or cooldown) and await the result.

    Bounded as a restart: the halt's last workers' stop, then the start timeout.
    """
    supervisor = supervisor_of(supervisors, module)
    if supervisor.state is WorkerState.RUNNING and not supervisor.halted:
        return _result(supervisor)  # as `systemctl start` of an active unit: nothing to do
    before = supervisor.starts
    log.info("module.start_asked", module=module)
    supervisor.resume()
    policy = supervisor.policy

    def settled() -> bool:
        anew = supervisor.starts > before and supervisor.state is not WorkerState.STARTING
        failed = supervisor.state in (WorkerState.BACKOFF, WorkerState.COOLDOWN,
                                      WorkerState.FAILED)  # fmt: skip
        return anew or failed or supervisor.stop_requested() or supervisor.halted

    await events.wait_until(settled, policy.stop_timeout.seconds + policy.start_timeout.seconds)
    return _result(supervisor)
