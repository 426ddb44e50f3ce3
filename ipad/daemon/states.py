"""Every state of a proxy and of a module's worker, and every allowed move, in one table.

As in h11's _state.py: code elsewhere asks ``advance`` to move, and an illegal
move raises at once instead of leaving an object in a state nobody planned.
"""

from __future__ import annotations

import enum


class ProxyState(enum.Enum):
    """A proxy's validity, as its client sees it."""

    #: Requested; its instance is being created in the worker.
    PENDING = "pending"
    #: Its worker is alive and its instance initialised: calls go through.
    VALID = "valid"
    #: Its worker exited, hung, was stopped or failed to load; ``reason`` says which.
    INVALID = "invalid"
    #: Released by its client, or its client went away. Final.
    CLOSED = "closed"


class WorkerState(enum.Enum):
    """A module's worker, as the supervisor runs it (the states of ipad/daemon/lifecycle.py)."""

    #: Not running: not started yet, stopped for good, or stopped by the operator until started.
    STOPPED = "stopped"
    #: A worker is being launched, or was, and its READY is awaited within the start timeout.
    STARTING = "starting"
    #: READY received: instances can be opened.
    RUNNING = "running"
    #: Being stopped (for good, or by the operator): its workers are asked to end, then
    #: killed after stop_timeout.
    STOPPING = "stopping"
    #: Exited, crashed or hung; about to be restarted, or (per policy) not restarted.
    EXITED = "exited"
    #: Failed again soon after a start: waiting out the backoff delay before the next.
    BACKOFF = "backoff"
    #: Failed too often: retried at the slow cooldown interval.
    COOLDOWN = "cooldown"
    #: Failed and not started again until asked (restart = "never").
    FAILED = "failed"


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in ipad, never the peer's fault."""


PROXY_TRANSITIONS: dict[ProxyState, frozenset[ProxyState]] = {
    ProxyState.PENDING: frozenset({ProxyState.VALID, ProxyState.INVALID, ProxyState.CLOSED}),
    ProxyState.VALID: frozenset({ProxyState.INVALID, ProxyState.CLOSED}),
    ProxyState.INVALID: frozenset({ProxyState.VALID, ProxyState.CLOSED}),
    ProxyState.CLOSED: frozenset(),
}

WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STOPPED: frozenset({WorkerState.STARTING}),
    WorkerState.STARTING: frozenset(
        {WorkerState.RUNNING, WorkerState.EXITED, WorkerState.STOPPING}
    ),
    WorkerState.RUNNING: frozenset({WorkerState.EXITED, WorkerState.STOPPING}),
    # STARTING: an operator's start (``ipadctl start``) while its stop still ended workers.
    WorkerState.STOPPING: frozenset(
        {WorkerState.STOPPED, WorkerState.EXITED, WorkerState.STARTING}
    ),
    WorkerState.EXITED: frozenset(
        {
            WorkerState.STARTING,
            WorkerState.BACKOFF,
            WorkerState.COOLDOWN,
            WorkerState.FAILED,
            WorkerState.STOPPED,
            WorkerState.STOPPING,
        }
    ),
    WorkerState.BACKOFF: frozenset(
        {WorkerState.STARTING, WorkerState.STOPPED, WorkerState.STOPPING}
    ),
    WorkerState.COOLDOWN: frozenset(
        {WorkerState.STARTING, WorkerState.STOPPED, WorkerState.STOPPING}
    ),
    WorkerState.FAILED: frozenset(
        {WorkerState.STARTING, WorkerState.STOPPED, WorkerState.STOPPING}
    ),
}


def advance_proxy(current: ProxyState, new: ProxyState) -> ProxyState:
    """Return ``new`` if the table allows the move, else raise IllegalTransition."""
    if new not in PROXY_TRANSITIONS[current]:
        raise IllegalTransition(f"proxy cannot go from {current.value} to {new.value}")
    return new


def advance_worker(current: WorkerState, new: WorkerState) -> WorkerState:
    """Return ``new`` if the table allows the move, else raise IllegalTransition."""
    if new not in WORKER_TRANSITIONS[current]:
        raise IllegalTransition(f"worker cannot go from {current.value} to {new.value}")
    return new
