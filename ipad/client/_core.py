"""What the trio and the blocking client share, sans I/O: messages, recovery rules, backoff.

Both clients make the same decisions (when to try again, what a failed
reopen means, what the caller is told and within which deadline) from the
helpers here; each only carries them out, with trio or with poll(2).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs

from ipad.client._buffers import FdArg, Output, Registered, fd_of, protect_all
from ipad.client._describe import Description, description_of
from ipad.client._registry import BufferRegistry
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    CallNotSent,
    IpadError,
    TimedOut,
    UnknownProxy,
    UnsupportedVersion,
    error_from_reply,
)

#: Protocol versions this client library speaks, newest first.
CLIENT_VERSIONS = (p.PROTOCOL_VERSION,)

#: Trying again (connecting to the daemon, or a reopen it refused): at once the first time,
#: then after RECONNECT_INITIAL, doubling up to RECONNECT_MAX.
RECONNECT_INITIAL = 0.01
RECONNECT_MAX = 1.0
#: Fraction of each delay added at random, so clients do not return in step.
RECONNECT_JITTER = 0.2
#: A connection that lasted this long was a success: after its loss, the first attempt is at once.
RECONNECT_STABLE = RECONNECT_MAX


def check_describe(welcome: p.Welcome | None) -> None:
    """Raise UnsupportedVersion, nothing sent, if the daemon agreed a minor before DESCRIBE."""
    minor = welcome.minor if welcome is not None else 0
    if minor < p.MINOR_DESCRIBE:
        raise UnsupportedVersion(
            f"the daemon speaks protocol minor {minor}: DESCRIBE needs minor {p.MINOR_DESCRIBE}",
            {"minor": minor, "needed": p.MINOR_DESCRIBE},
        )


def check_admin(welcome: p.Welcome | None, command: str, module: str | None) -> None:
    """UnsupportedVersion, nothing sent, for ADMIN ``stop``/``start`` MODULE to an older daemon.

    A daemon before minor 3 ignores ADMIN's module for ``stop``: it would stop
    itself, every module with it (a new ipadctl against a daemon not yet
    restarted after an upgrade).
    """
    minor = welcome.minor if welcome is not None else 0
    if command in ("stop", "start") and module is not None and minor < p.MINOR_MODULE_STOP:
        raise UnsupportedVersion(
            f"the daemon speaks protocol minor {minor}: {command} of one module needs minor "
            f"{p.MINOR_MODULE_STOP} (an older daemon would take 'stop MODULE' for a stop of "
            "itself); restart the daemon to run this version, or use 'restart MODULE'",
            {"minor": minor, "needed": p.MINOR_MODULE_STOP},
        )


@attrs.frozen
class ProxyInfo:
    """What the daemon told us about a granted proxy."""

    proxy_id: int
    module: str
    module_version: str
    worker_pid: int
    methods: tuple[str, ...]
    setup_methods: frozenset[str]
    #: method -> the setup method calling it cancels (``stop`` -> ``start``).
    undoes: dict[str, str]
    seq: int
    #: The module serving this proxy for now, when a fallback stands in; else "".
    served_by: str = ""
    #: Every call's deadline when the caller gives no ``timeout`` (None: the daemon gave none).
    call_timeout: float | None = None
    #: The methods' parameters, results and docs (ipad/client/_describe.py).
    description: Description = attrs.field(factory=lambda: Description((), {}), eq=False)
    #: The minor revision the proxy's channel speaks: ours and the serving worker's, the lower.
    minor: int = 0

    @classmethod
    def from_granted(cls, granted: p.ProxyGranted) -> ProxyInfo:
        """Read a PROXY_GRANTED reply."""
        return cls(
            proxy_id=granted.proxy_id,
            module=granted.module,
            module_version=granted.module_version,
            worker_pid=granted.worker_pid,
            methods=tuple(m.name for m in granted.methods),
            setup_methods=frozenset(m.name for m in granted.methods if m.setup),
            undoes={m.name: m.undoes for m in granted.methods if m.undoes},
            seq=granted.seq,
            served_by=granted.served_by,
            call_timeout=granted.call_timeout if granted.call_timeout > 0 else None,
            description=description_of(
                granted.served_by or granted.module,
                granted.module_version,
                granted.methods,
                granted.types,
            ),
            minor=p.agreed_minor(granted.minor),
        )


@attrs.frozen
class SetupCall:
    """A setup call to replay on a new instance; ``fds`` are our own duplicates."""

    method: str
    args: dict[str, Any]
    fds: tuple[tuple[str, FdArg], ...]


class SetupLog:
    """The setup calls a proxy made, in order, to bring a new instance to the same state.

    A setup method called again replaces its earlier call (the module keeps the
    latest configuration); a method that undoes one (``stop``) removes it.
    Passed descriptors are duplicated, since the caller may close its own.
    """

    def __init__(self, info: ProxyInfo) -> None:
        self.info = info
        self.calls: list[SetupCall] = []
        #: The buffers registered with the instance: registered again before the replay.
        self.buffers = BufferRegistry()

    def record(
        self, method: str, args: Mapping[str, Any] | None, fds: Mapping[str, FdArg] | None
    ) -> None:
        """Note a successful call, if it changes what a new instance must replay."""
        undone = self.info.undoes.get(method)
        if undone is not None:
            self._drop(undone)
        if method in self.info.setup_methods:
            self._drop(method)
            dups = tuple((name, _dup(value)) for name, value in (fds or {}).items())
            self.calls.append(SetupCall(method, dict(args or {}), dups))

    def _drop(self, method: str) -> None:
        for call in [c for c in self.calls if c.method == method]:
            self.calls.remove(call)
            _close(call.fds)

    def in_use(self) -> set[int]:
        """The registered buffer ids the recorded setup calls name."""
        return {v.id for c in self.calls for _, v in c.fds if isinstance(v, Registered)}

    def close(self) -> None:
        """Close the duplicated descriptors."""
        for call in self.calls:
            _close(call.fds)
        self.calls.clear()
        self.buffers.close()


def _close(fds: tuple[tuple[str, FdArg], ...]) -> None:
    for _, value in fds:
        if not isinstance(value, Registered):
            os.close(fd_of(value))


def _dup(value: FdArg) -> FdArg:
    """A duplicate for the replay, an Output still an Output; the memfd (and its seals) shared."""
    if isinstance(value, Registered):
        return value  # no descriptor: the registration is replayed first
    return Output(os.dup(value.fd)) if isinstance(value, Output) else os.dup(value)


def build_call(
    method: str, args: Mapping[str, Any] | None, fds: Mapping[str, FdArg] | None
) -> tuple[p.Call, list[int]]:
    """A CALL and the descriptors to pass with it, in the order ``fd_args`` names them.

    Each descriptor is sealed first (ipad/client/_buffers.py): one that cannot be is
    refused with BadArguments, and nothing is sent.
    """
    fd_list = protect_all(fds)
    passed = tuple(k for k, v in (fds or {}).items() if not isinstance(v, Registered))
    named = {k: v.id for k, v in (fds or {}).items() if isinstance(v, Registered)}
    if named:
        return p.Call(method, dict(args or {}), passed, named), fd_list
    return p.Call(method, dict(args or {}), passed), fd_list


M = TypeVar("M", bound=p.Message)

#: The reply each request on a channel gets when it succeeds.
CHANNEL_REPLIES: dict[type[p.Message], type[p.Message]] = {
    p.Call: p.Result,
    p.MapBuffers: p.BuffersMapped,
    p.UnmapBuffers: p.BuffersUnmapped,
}


def expect(frame: p.Frame, kind: type[M]) -> M:
    """The reply's message if it is a ``kind``; raise the error it carries otherwise."""
    message = frame.message
    if isinstance(message, kind):
        return message
    frame.close_fds()
    if isinstance(message, p.Error):
        raise error_from_reply(message)
    raise IpadError(f"expected {kind.TYPE.name}, got {message.TYPE.name}")


class Backoff:
    """One schedule of attempts, however many callers notice a failure: at once, then ever later.

    Each thing that is retried (a client's connection, a proxy's reopen) has
    one, so a daemon that refuses sees one attempt per delay, never one per
    caller or per task. Pure: the caller passes the time.
    """

    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        self._rand = rand
        #: Consecutive failures; the next delay is RECONNECT_INITIAL * 2**(failures - 1).
        self.failures = 0
        #: When the next attempt may be made.
        self.next_at = -math.inf
        self._up_since: float | None = None

    def failed(self, now: float) -> float:
        """An attempt failed at ``now``: the delay before the next, which ``next_at`` holds."""
        base = min(RECONNECT_INITIAL * 2.0**self.failures, RECONNECT_MAX)
        delay = base * (1 + RECONNECT_JITTER * self._rand())
        self.failures += 1
        self.next_at = now + delay
        return delay

    def reset(self) -> None:
        """It worked: the next attempt, if one is ever needed, is at once."""
        self.failures = 0
        self.next_at = -math.inf

    def up(self, now: float) -> None:
        """A connection was made at ``now``; whether that was a success its loss will tell."""
        self._up_since = now

    def down(self, now: float) -> None:
        """The connection made last was lost: after a short life it counts as a failure.

        A daemon that accepts and at once drops each connection must see the
        backoff too, not an attempt as fast as the client can make them.
        """
        if self._up_since is None:
            return
        lasted = now - self._up_since
        self._up_since = None
        if lasted >= RECONNECT_STABLE:
            self.reset()
        else:
            self.failed(now)

    def wait(self, now: float) -> float:
        """Seconds until the next attempt may be made (0: now)."""
        return max(0.0, self.next_at - now)


@attrs.frozen
class Bounds:
    """A call's limits as times on one clock.

    ``deadline`` (from ``timeout``) holds for the whole call, recovery and
    replay included; ``recovery`` (from ``wait``) only for waiting until the
    proxy is valid again. Either may be None: no such limit.
    """

    deadline: float | None
    recovery: float | None
    timeout: float | None
    wait: float | None

    @classmethod
    def of(cls, now: float, timeout: float | None, wait: float | None) -> Bounds:
        """The limits of a call made at ``now``."""
        deadline = None if timeout is None else now + timeout
        recovery = None if wait is None else now + wait
        return cls(deadline, recovery, timeout, wait)

    @property
    def until(self) -> float | None:
        """How long the proxy's recovery may be waited for: the earlier limit."""
        limits = [t for t in (self.deadline, self.recovery) if t is not None]
        return min(limits) if limits else None

    def expired(self, now: float, module: str, why: str | None) -> IpadError:
        """The error for a recovery not done by ``until``: the caller's timeout, or ``wait``."""
        because = f": {why}" if why else ""
        if self.deadline is not None and now >= self.deadline:
            message = f"{module} did not recover within the call's timeout of {self.timeout:g}s"
            return TimedOut(message + because, {"sent": False})
        return CallNotSent(f"{module} did not recover within {self.wait:g}s{because}")


#: The proxy states a daemon event makes a client act on; any other is only news.
ACTED_ON = frozenset({"invalid", "closed"})


def proxy_news(event: p.Event, seq: int) -> tuple[str, str | None] | None:
    """The state and reason a daemon event gives a proxy whose grant came at ``seq``.

    None when it says nothing the client acts on: an event from before the
    grant is about a channel the proxy no longer uses, "valid" is the
    client's to decide, once its replay is done, and a state this revision
    does not know (a newer daemon's) is taken and ignored (docs/protocol.md,
    Compatibility).
    """
    if event.seq <= seq or event.state not in ACTED_ON:
        return None
    return event.state, event.reason


def unavailable_details(module_event: p.Event | None) -> dict[str, Any]:
    """What a module event says about why a module does not serve: state and reason."""
    if module_event is None or module_event.state is None:
        return {}
    details: dict[str, Any] = {"state": module_event.state}
    if module_event.reason:
        details["reason"] = module_event.reason
    return details


def not_sent(module: str, failure: IpadError | str, lost: str | None = None) -> CallNotSent:
    """Why a call was not sent: its proxy could not be brought back, and what the daemon said.

    ``lost`` is why the proxy turned invalid, when the daemon said so; a
    cooldown says when the daemon tries the module again.
    """
    if isinstance(failure, str):
        failure = IpadError(failure)
    details = dict(failure.details)
    message = failure.message
    interval = details.get("cooldown_interval")
    if details.get("state") == "cooldown" and isinstance(interval, int | float):
        message += f"; the daemon tries it again every {interval:g}s"
    if lost and lost not in message:
        message += f" (proxy invalid: {lost})"
    if isinstance(failure, UnknownProxy):
        details["closed"] = True
    error = CallNotSent(f"{module} proxy could not be reopened: {message}", details)
    error.__cause__ = failure
    return error


def closed_error(module: str, reason: str | None) -> CallNotSent:
    """A call on a proxy the daemon closed (released, access revoked): it will not come back."""
    return CallNotSent(f"{module} proxy is closed: {reason or 'closed'}", {"closed": True})
