"""The daemon's table of proxies: who holds which module instance, and whether it is valid."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import attrs

from ipad.daemon.events import EventBus
from ipad.daemon.states import ProxyState, advance_proxy

#: How many of a proxy's past workers PROXY_CAUSE may be asked about: a call fails on
#: the worker it was sent to, which is the newest or, after a quick reopen, the one before.
SERVED_PIDS_KEPT = 4


@attrs.define
class ProxyRecord:
    """One proxy: a client's handle on one module instance."""

    proxy_id: int
    module: str
    client_id: int
    state: ProxyState = ProxyState.PENDING
    reason: str | None = None
    instance_id: int | None = None
    worker_pid: int | None = None
    #: The module whose worker holds the instance: ``module``, or its fallback.
    served_by: str = ""
    #: Reopens answered on the worker that already served it, in a row, and when the last
    #: was: a module that breaks each new channel is paced like a crash loop, not served flat out.
    live_reopens: int = 0
    live_reopened_at: float = -math.inf
    #: Given a new instance while invalid (REOPEN_PROXY) and not announced since: should that
    #: worker end before PROXY_READY is read, its end is announced anew (``invalid_again``).
    reattached: bool = False
    #: The last workers that held its instance (newest last, ``SERVED_PIDS_KEPT`` at most):
    #: PROXY_CAUSE answers about these only, never about another client's worker.
    served_pids: tuple[int, ...] = ()

    def served_on(self, pid: int | None) -> None:
        """Its instance is now in worker ``pid``."""
        self.worker_pid = pid
        if pid is not None and pid not in self.served_pids:
            self.served_pids = (*self.served_pids, pid)[-SERVED_PIDS_KEPT:]

    def __attrs_post_init__(self) -> None:
        if not self.served_by:
            self.served_by = self.module


class ProxyTable:
    """Every live proxy; each state change goes through the state table and out as an event."""

    def __init__(self, events: EventBus) -> None:
        self.events = events
        self._ids = itertools.count(1)
        self._proxies: dict[int, ProxyRecord] = {}

    def __iter__(self) -> Iterator[ProxyRecord]:
        return iter(list(self._proxies.values()))

    def __len__(self) -> int:
        return len(self._proxies)

    def get(self, proxy_id: int) -> ProxyRecord | None:
        """The proxy with that id, if it is still open."""
        return self._proxies.get(proxy_id)

    def create(self, module: str, client_id: int) -> ProxyRecord:
        """A new pending proxy."""
        record = ProxyRecord(proxy_id=next(self._ids), module=module, client_id=client_id)
        self._proxies[record.proxy_id] = record
        return record

    def set_state(
        self,
        record: ProxyRecord,
        state: ProxyState,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Move a proxy to ``state`` and publish it; return the event's sequence number."""
        record.state = advance_proxy(record.state, state)
        record.reason = reason
        record.reattached = False
        if state is ProxyState.CLOSED:
            self._proxies.pop(record.proxy_id, None)
        event = self.events.publish(
            "proxy",
            record.module,
            proxy_id=record.proxy_id,
            state=state.value,
            reason=reason,
            worker_pid=record.worker_pid,
            details=details,
        )
        return event.seq

    def invalid_again(
        self, record: ProxyRecord, reason: str, details: dict[str, Any] | None = None
    ) -> None:
        """The worker an invalid proxy was reattached to ended before the proxy was valid again.

        Its client replays its setup, counts itself valid and sends PROXY_READY
        without waiting; a call that kills the new worker before the daemon read
        it would otherwise go unannounced (the proxy was invalid already): its
        invalid event, with the new end's reason, says so to every subscriber.
        """
        record.reason = reason
        record.reattached = False
        self.events.publish("proxy", record.module, proxy_id=record.proxy_id,
                            state=ProxyState.INVALID.value, reason=reason,
                            worker_pid=record.worker_pid, details=details)  # fmt: skip

    def close(self, record: ProxyRecord, reason: str) -> None:
        """Close a proxy unless it is closed already (a release and its channel's end may race)."""
        if record.state is not ProxyState.CLOSED:
            self.set_state(record, ProxyState.CLOSED, reason)

    def instance_closed(self, record: ProxyRecord, reason: str) -> bool:
        """The worker closed ``record``'s instance (its channel ended); True if the proxy closed.

        A valid proxy closes: its client left, or its module gave the instance
        up. An invalid one stays invalid, holding no instance: its client
        closed a channel granted by REOPEN_PROXY whose replay failed, and
        asks again (docs/protocol.md, "Recovery after a worker restart").
        """
        if record.state is not ProxyState.INVALID:
            self.close(record, reason)
            return True
        record.instance_id = None
        record.worker_pid = None
        self.events.notify()  # a REOPEN_PROXY waiting on this instance's worker can go on
        return False

    def of_module(self, module: str) -> list[ProxyRecord]:
        """The open proxies whose instance lives in ``module``'s worker (fallbacks included)."""
        return [r for r in self._proxies.values() if r.served_by == module]

    def of_fallback(self, module: str) -> list[ProxyRecord]:
        """The open proxies to ``module`` that its fallback serves for now."""
        return [r for r in self._proxies.values() if r.module == module and r.served_by != module]

    def of_client(self, client_id: int) -> list[ProxyRecord]:
        """The open proxies one client holds."""
        return [r for r in self._proxies.values() if r.client_id == client_id]
