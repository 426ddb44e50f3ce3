"""A proxy as both clients hold it, sans I/O: its states and moves, and what recovery decides.

The trio client (ipad/client/_trio_proxy.py) and the blocking one
(ipad/client/_blocking.py) each subclass ProxyCore and only carry its
decisions out: they send what it says to send (REOPEN_PROXY or REQUEST_PROXY,
the setup calls to replay, pipelined, PROXY_READY), on their own sockets, and
raise or hand on the errors it makes. Like ipad/daemon/states.py for the
daemon, every move between states is in one table and an illegal one raises.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

from ipad.client._buffers import BufferArg, FdArg
from ipad.client._core import (
    CHANNEL_REPLIES,
    Backoff,
    Bounds,
    ProxyInfo,
    SetupLog,
    build_call,
    closed_error,
    expect,
    not_sent,
    proxy_news,
    unavailable_details,
)
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    CallNotSent,
    Disconnected,
    IpadError,
    TimedOut,
    UnknownProxy,
    UnsupportedVersion,
    WorkerCrashed,
)


class ProxyState(enum.Enum):
    """Where a proxy stands, as its client sees it."""

    #: Its channel works: calls go straight to the worker.
    VALID = "valid"
    #: Its channel is gone (the worker died, the daemon said invalid): a reopen brings it back.
    RECOVERING = "recovering"
    #: Its daemon connection is gone: a reconnection requests it anew, or (without one) nothing.
    LOST = "lost"
    #: Released, closed by the daemon, or its client closed. Final.
    CLOSED = "closed"


class IllegalMove(RuntimeError):
    """A move the table does not allow: a bug in the client, never the daemon's fault."""


MOVES: dict[ProxyState, frozenset[ProxyState]] = {
    ProxyState.VALID: frozenset({ProxyState.RECOVERING, ProxyState.LOST, ProxyState.CLOSED}),
    ProxyState.RECOVERING: frozenset({ProxyState.VALID, ProxyState.LOST, ProxyState.CLOSED}),
    # Back on a new daemon connection (replayed), or held there anew but its replay failed.
    ProxyState.LOST: frozenset({ProxyState.VALID, ProxyState.RECOVERING, ProxyState.CLOSED}),
    ProxyState.CLOSED: frozenset(),
}

#: What ``proxy.state`` says (the public API): recovering and lost are both "invalid".
PUBLIC_STATE = {
    ProxyState.VALID: "valid",
    ProxyState.RECOVERING: "invalid",
    ProxyState.LOST: "invalid",
    ProxyState.CLOSED: "closed",
}

#: Module states in which the daemon can answer REOPEN_PROXY: it runs, it is about to
#: (the daemon answers once it does: starting, just exited, in backoff), or it is in
#: cooldown and a fallback may serve it.
REOPENABLE = frozenset({"running", "starting", "exited", "backoff", "cooldown"})


#: Seconds a call whose worker died waits for the daemon to say why (its invalid event, or
#: PROXY_CAUSE's reply, which the daemon sends within half a second).
CAUSE_WAIT = 0.75


class ProxyCore:
    """A proxy's state, setup log and recovery decisions; the client subclassing it does the I/O.

    Methods named for what happened (``channel_lost``, ``refused``,
    ``adopted``...) move the state by the table and return what to send or
    the error a caller is told.
    """

    def __init__(
        self, info: ProxyInfo, pipeline: str | None = None, pipeline_version: int | None = None
    ) -> None:
        #: What the proxy was requested for, to request it again from a restarted daemon.
        self.pipeline = pipeline
        self.pipeline_version = pipeline_version
        self.info = info
        self.proxy_id = info.proxy_id
        self.module = info.module
        self.setup_log = SetupLog(info)
        self.recoveries = 0
        self.phase = ProxyState.VALID
        #: Why the proxy is not valid (or how it came back: "recovered", "fallback").
        self.reason: str | None = None
        #: Why the last recovery attempt failed (None once valid): what a caller is told.
        self.failure: IpadError | None = None
        #: Set when the daemon connection is gone for good (no reconnection): calls fail with it.
        self.gone: str | None = None
        #: Paces reopens the daemon refused; a crash is paced by the daemon itself.
        self.backoff = Backoff()
        #: Why the daemon says the proxy turned invalid (a crash's signal and method, a hang,
        #: an OOM kill...), until it is valid again: what a call its worker died under is told.
        self.cause: str | None = None

    # --- the state table ---------------------------------------------------------

    def move(self, to: ProxyState, reason: str | None) -> None:
        """Go to ``to`` with ``reason``, if the table allows; IllegalMove otherwise."""
        if to is not self.phase and to not in MOVES[self.phase]:
            raise IllegalMove(f"proxy cannot go from {self.phase.value} to {to.value}")
        self.phase, self.reason = to, reason

    @property
    def state(self) -> str:
        """What the API calls it: valid, invalid (a recovery or reconnection is due) or closed."""
        return PUBLIC_STATE[self.phase]

    @property
    def closed(self) -> bool:
        """Whether the proxy is closed for good."""
        return self.phase is ProxyState.CLOSED

    # --- what happened ------------------------------------------------------------

    def channel_lost(self, reason: str | None) -> bool:
        """The channel to the worker is gone: recovering. False if it was not valid anyway."""
        if self.phase is not ProxyState.VALID:
            return False
        self.move(ProxyState.RECOVERING, reason)
        return True

    def connection_lost(self, reason: str, *, final: bool) -> None:
        """The daemon connection is gone.

        ``final`` (no reconnection): the channel may still work until it
        breaks, but nothing will bring the proxy back after that. Otherwise
        the proxy is lost until the reconnection requests it anew.
        """
        if final:
            self.gone = reason
        elif self.phase is not ProxyState.CLOSED:
            self.move(ProxyState.LOST, reason)

    def closed_by(self, reason: str) -> None:
        """Released, closed by the daemon, or its client closed."""
        self.move(ProxyState.CLOSED, reason)

    def on_event(self, event: p.Event) -> bool:
        """A daemon event about this proxy; True if it closed it."""
        news = proxy_news(event, self.info.seq)
        if news is None or self.phase in (ProxyState.CLOSED, ProxyState.LOST):
            return False
        state, reason = news
        if state == "invalid":
            self.cause = reason or "invalid"
        if state == "closed":
            self.closed_by(reason or "closed by the daemon")
            return True
        self.move(ProxyState.RECOVERING, reason)
        return False

    def learned_cause(self, reason: str) -> None:
        """PROXY_CAUSE's answer: the daemon's reason, as the invalid event would have said it."""
        if reason:
            self.cause = reason
            if self.phase is ProxyState.RECOVERING:
                self.reason = reason

    def crashed(self, error: WorkerCrashed) -> WorkerCrashed:
        """What a call whose worker died is told: ``error``, with the daemon's cause once known.

        The channel's end says only that the worker went; the daemon's invalid
        event says why (docs/operations.md, "Crash reports"). A client waits
        ``CAUSE_WAIT`` at most for it.
        """
        cause = self.cause
        if cause is None or isinstance(error, CallNotSent):
            return error
        crashed = WorkerCrashed(f"{self.module} worker died during the call: {cause}",
                                {**error.details, "cause": cause})  # fmt: skip
        crashed.__cause__ = error
        return crashed

    def recorded(
        self, method: str, args: Mapping[str, Any] | None, fds: Mapping[str, FdArg] | None
    ) -> None:
        """A call succeeded: the setup log keeps it if a new instance must replay it."""
        self.setup_log.record(method, args, fds)

    # --- a call's arguments and result ---------------------------------------------

    def check_call(
        self, method: str, args: Mapping[str, Any] | None, fds: Mapping[str, FdArg] | None
    ) -> None:
        """Raise BadArguments (or UnknownMethod) before sending a call the description refuses."""
        self.info.description.check(self.module, method, args, fds)

    def typed(self, method: str, value: Any) -> Any:
        """A call's result with its objects as Records, as the method's description says."""
        return self.info.description.typed(method, value)

    def map_request(self, buffers: Mapping[int, BufferArg]) -> tuple[p.MapBuffers, list[int]]:
        """MAP_BUFFERS for ``buffers`` and its sealed descriptors (BadArguments: nothing sent).

        UnsupportedVersion, nothing sent, if the serving worker is of a minor before
        registered buffers (a native worker of minor 0 or 1, say): it would take
        MAP_BUFFERS for a protocol error and close the channel.
        """
        if self.info.minor < p.MINOR_REGISTERED_BUFFERS:
            raise UnsupportedVersion(
                f"{self.module}'s worker speaks protocol minor {self.info.minor}: registering "
                f"buffers needs minor {p.MINOR_REGISTERED_BUFFERS}; pass them with each call",
                {"minor": self.info.minor, "needed": p.MINOR_REGISTERED_BUFFERS},
            )
        return self.setup_log.buffers.map_message(buffers)

    def unmap_request(self, ids: Iterable[int]) -> p.UnmapBuffers:
        """UNMAP_BUFFERS for ``ids`` (BadArguments for one unknown or named by a setup call)."""
        return self.setup_log.buffers.unmap_message(ids, self.setup_log.in_use())

    def answered(self, message: p.Message, frame: p.Frame, given: Any) -> Any:
        """What a channel request's reply means: a call's value, or None for (un)registration.

        A setup call is recorded, registered buffers kept: ``given`` is what the caller passed.
        """
        if isinstance(message, p.Call):
            value = expect(frame, p.Result).value
            self.recorded(message.method, message.args, given)
            return self.typed(message.method, value)
        expect(frame, CHANNEL_REPLIES[type(message)])
        if isinstance(message, p.MapBuffers):
            self.setup_log.buffers.mapped(given)
        elif isinstance(message, p.UnmapBuffers):
            self.setup_log.buffers.unmapped(message.ids)
        return None

    # --- a call's limits and errors ------------------------------------------------

    def bounds(self, now: float, timeout: float | None, wait: float | None) -> Bounds:
        """A call's limits: ``timeout`` over the whole call, the grant's call_timeout by default."""
        return Bounds.of(now, self.info.call_timeout if timeout is None else timeout, wait)

    def timed_out(self, method: str, timeout: float | None, *, sent: bool) -> TimedOut:
        """The TimedOut for a call whose deadline passed with the proxy valid."""
        if sent:
            return TimedOut(f"{self.module}.{method} did not answer within {timeout:g}s",
                            {"sent": True})  # fmt: skip
        return TimedOut(f"{self.module}.{method} was not sent within {timeout:g}s",
                        {"sent": False})  # fmt: skip

    def why(self) -> str | None:
        """The reason a caller is told: the last attempt's failure, else why the proxy was lost."""
        return self.failure.message if self.failure is not None else self.reason

    def unusable(self) -> IpadError | None:
        """Why no recovery can make the proxy valid again (closed, or its daemon gone for good)."""
        if self.closed:
            return closed_error(self.module, self.reason)
        if self.gone is not None:
            return Disconnected(self.gone)
        return None

    def gives_up(self, bounds: Bounds, failure: IpadError) -> bool:
        """Whether a call stops at a failed attempt: without ``wait``, or when none can succeed."""
        final = bool(failure.details.get("closed")) or self.unusable() is not None
        return bounds.wait is None or final

    # --- recovery --------------------------------------------------------------------

    def reopen_message(self, same_connection: bool) -> p.Message:
        """REOPEN_PROXY on the connection that granted the proxy; REQUEST_PROXY on a new one."""
        if same_connection:
            return p.ReopenProxy(self.proxy_id)
        return p.RequestProxy(self.module, self.pipeline, self.pipeline_version)

    def not_reopenable(self, module_event: p.Event | None) -> IpadError | None:
        """The failure to tell without asking, when the module's last event says it cannot serve."""
        if module_event is None or module_event.state is None:
            return None
        if module_event.state in REOPENABLE:
            return None
        why = f"{self.module} is {module_event.state}: {module_event.reason or 'no reason given'}"
        return self.failed(not_sent(self.module, IpadError(why, unavailable_details(module_event))))

    def refused(self, exc: IpadError, now: float, module_event: p.Event | None) -> IpadError:
        """The daemon refused the reopen with ``exc``: the failure to tell (the proxy may close).

        UnknownProxy: the daemon closed it, for good. Anything else (the module
        is unavailable, access denied) is tried again after the backoff. (A
        lost daemon connection is not a refusal: the reconnection, if any,
        decides.)
        """
        if isinstance(exc, UnknownProxy):
            self.closed_by(f"the daemon closed it: {exc.message}")
            return self.failed(not_sent(self.module, exc))
        if "state" not in exc.details:
            exc.details.update(unavailable_details(module_event))
        self.backoff.failed(now)
        return self.failed(not_sent(self.module, exc, self.reason))

    def reattached(self, proxy_id: int) -> None:
        """A new daemon connection granted the proxy anew, under ``proxy_id``: replay is due."""
        self.proxy_id = proxy_id
        if self.phase is ProxyState.LOST:
            self.move(ProxyState.RECOVERING, "requested anew after reconnecting")

    def replay_calls(self) -> list[tuple[p.Call, list[int]]]:
        """The setup calls to send on a new channel, in order, all before any reply is read.

        The worker runs calls in arrival order, so pipelining keeps the order
        and saves a round trip each.
        """
        return [build_call(c.method, c.args, dict(c.fds)) for c in self.setup_log.calls]

    def replay(self) -> list[tuple[p.Message, list[int]]]:
        """What to send on a new channel, pipelined: the registered buffers, then replay_calls.

        Buffers first (MAP_BUFFERS), since setup calls may name them. Each
        message's reply is CHANNEL_REPLIES of its type.
        """
        replay: list[tuple[p.Message, list[int]]] = []
        replay.extend(self.setup_log.buffers.replay())
        replay.extend(self.replay_calls())
        return replay

    def replay_failed(self, exc: IpadError, now: float) -> IpadError:
        """Replaying on a granted channel failed: the failure to tell.

        A worker that crashed again is paced by the daemon (it answers the next
        reopen once a worker runs again); any other failure by our backoff.
        """
        if not isinstance(exc, WorkerCrashed):
            self.backoff.failed(now)
        return self.failed(
            not_sent(self.module, f"replaying its setup failed: {exc.message}", self.reason)
        )

    def failed(self, error: IpadError) -> IpadError:
        """A recovery attempt failed with ``error``."""
        self.failure = error
        return error

    def adopted(self, granted: p.ProxyGranted) -> p.ProxyReady:
        """The replay on ``granted``'s channel is done: valid again; the PROXY_READY to send."""
        self.info = ProxyInfo.from_granted(granted)
        self.proxy_id = granted.proxy_id
        self.move(ProxyState.VALID, "fallback" if granted.served_by else "recovered")
        self.recoveries += 1
        self.failure = None
        self.cause = None
        self.gone = None
        self.backoff.reset()
        return p.ProxyReady(self.proxy_id, len(self.setup_log.calls))
