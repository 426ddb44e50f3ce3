"""The client socket: one session per connection, each failing alone.

A client that breaks the protocol gets a GOODBYE with the reason and loses
its connection; every other client, and the daemon's state, are untouched.
A client that goes away has its proxies released and their instances freed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import structlog
import trio

from ipad._version import __version__
from ipad.config.access import AccessPolicy, Peer, Rule, peer_of
from ipad.config.model import ClientLimits, RestartPolicy
from ipad.daemon.bounds import fit_entries
from ipad.daemon.crashes import CAUSE_WAIT, CrashRecord
from ipad.daemon.events import EventBus, Subscription
from ipad.daemon.log_ring import log_reply
from ipad.daemon.metrics import refusal_reason
from ipad.daemon.proxy_table import ProxyRecord, ProxyTable
from ipad.daemon.states import ProxyState, WorkerState
from ipad.daemon.supervisor import ModuleSupervisor, ModuleUnavailable
from ipad.daemon.worker_process import WorkerCrashed
from ipad.protocol import wire as p
from ipad.protocol.fdpass import MIN_WMEM_MAX, SEND_BUFFER, size_send_buffer
from ipad.protocol.rate_limit import RateLimit
from ipad.transport.seqpacket import PacketSocket

log = structlog.get_logger("ipad")

#: How long a client being cut off (or told the daemon stops) gets to take the GOODBYE:
#: one that does not read has a full socket, and must not hold up the daemon.
GOODBYE_TIMEOUT = 1.0

#: accept() errors that mean "out of descriptors or memory for now" (as trio's
#: serve_listeners): the listener waits this long and tries again rather than dying.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY = 0.1

#: Unread packets dropped before a connection is closed (see PacketSocket.discard_unread).
DISCARD_UNREAD = 64

#: Per connection, at most this many denials and exceeded limits are logged per
#: interval; the rest are counted (a hostile client must not flood the journal).
ABUSE_LOG_BURST = 10
ABUSE_LOG_INTERVAL = 10.0


class AdminError(Exception):
    """An admin command failed; ``code`` is an ErrorCode, ``message`` says why."""

    def __init__(
        self, code: p.ErrorCode, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}


class Controller(Protocol):
    """The daemon's operations an admin client may ask for."""

    async def admin(self, command: str, module: str | None) -> dict[str, Any]:
        """Run ``command``; raise AdminError if it cannot be done."""
        ...


class ClientServer:
    """What sessions need from the daemon: modules, proxies, events, and facts for status."""

    def __init__(
        self,
        supervisors: Mapping[str, ModuleSupervisor],
        proxies: ProxyTable,
        events: EventBus,
        modules_info: Callable[[], dict[str, dict[str, Any]]],
        socket_path: str,
        controller: Controller | None = None,
        extra_status: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.controller = controller
        self.extra_status = extra_status
        self.supervisors = supervisors
        self.proxies = proxies
        self.events = events
        self.modules_info = modules_info
        self.socket_path = socket_path
        #: Both are set from the configuration (again at a reload) and read afresh by every
        #: connection and request.
        self.limits = ClientLimits()
        self.policy = AccessPolicy()
        self.started = time.monotonic()
        self.sessions: set[Session] = set()
        #: Open connections per peer uid, for ``max_connections_per_user``.
        self.connections: collections.Counter[int] = collections.Counter()
        #: Connections refused for a limit since the start, and their log's rate limit.
        self.refused = 0
        #: Refusals of connections and requests by reason, for metrics (ipad/daemon/metrics.py).
        self.refusals: collections.Counter[str] = collections.Counter()
        self.refusal_log = RateLimit(ABUSE_LOG_INTERVAL, ABUSE_LOG_BURST)

    async def revoke_denied(self) -> None:
        """Close every proxy whose holder the policy, as just reloaded, no longer allows.

        A proxy's channel goes straight to its worker: without this, a client
        whose access a reload took away would go on calling until that worker
        next restarted (reopening is judged by the policy of the moment).
        """
        for session in list(self.sessions):
            for record in self.proxies.of_client(session.client_id):
                if self.policy.may_use(session.peer, record.module):
                    continue
                reason = (f"access revoked: uid {session.peer.uid} may no longer use "
                          f"module {record.module!r}")  # fmt: skip
                session.log.warning("access.revoked", proxy_id=record.proxy_id,
                                    module=record.module)  # fmt: skip
                await session.release(record.proxy_id, reason)

    def refusal(self, peer: Peer) -> str | None:
        """Why a new connection from ``peer`` is refused (a connection limit), or None."""
        limits = self.limits
        if len(self.sessions) >= limits.max_connections:
            return (f"too many connections: the daemon serves {limits.max_connections} at once "
                    "(clients.max_connections)")  # fmt: skip
        if self.connections[peer.uid] >= limits.max_connections_per_user:
            return (f"too many connections from uid {peer.uid}: "
                    f"{limits.max_connections_per_user} at once per user "
                    "(clients.max_connections_per_user)")  # fmt: skip
        return None


class Session:
    """One client connection."""

    _ids = itertools.count(1)

    def __init__(self, server: ClientServer, conn: PacketSocket, peer: Peer) -> None:
        self.server = server
        self.conn = conn
        self.client_id = next(self._ids)
        self.peer = peer
        self.subscription: Subscription | None = None
        #: The minor revision agreed in HELLO/WELCOME (docs/protocol.md, Compatibility).
        self.minor = 0
        #: Requests being answered now, for ``max_pending_requests``.
        self.pending = 0
        #: Why the daemon cut the client off, when it did so from another task.
        self.cut_off: str | None = None
        self.abuse_log = RateLimit(ABUSE_LOG_INTERVAL, ABUSE_LOG_BURST)
        self.log = log.bind(client_id=self.client_id, peer_pid=peer.pid, peer_uid=peer.uid)

    async def run(self) -> None:
        """Serve the connection until the client leaves or breaks the rules."""
        reason = "client closed the connection"
        self.log.info("client.accepted", peer_gid=self.peer.gid)
        try:
            async with trio.open_nursery() as nursery:
                reason = await self._serve(nursery)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._release_all()
                if self.subscription is not None:
                    self.server.events.unsubscribe(self.subscription)
                self.conn.discard_unread(DISCARD_UNREAD)
                self.conn.close()
            suppressed = self.abuse_log.flush()
            extra = {"suppressed": suppressed} if suppressed else {}
            self.log.info("client.disconnected", reason=self.cut_off or reason, **extra)

    async def _serve(self, nursery: trio.Nursery) -> str:
        first: p.Frame | None = None
        hello_timeout = self.server.limits.hello_timeout
        with trio.move_on_after(hello_timeout.seconds) as hello_wait:
            try:
                first = await self.conn.receive()
            except p.ProtocolError as exc:
                return await self._goodbye(f"protocol error: {exc.reason}")
            except (OSError, trio.ClosedResourceError):
                return "connection lost"
        if hello_wait.cancelled_caught:
            return await self._goodbye(f"no HELLO within {hello_timeout} (clients.hello_timeout)")
        if first is None:
            return "client closed the connection"
        if not await self._hello(first):
            return "handshake failed"
        return await self._receive_loop(nursery)

    async def _hello(self, frame: p.Frame) -> bool:
        message = frame.message
        if not isinstance(message, p.Hello):
            await self._goodbye(f"expected HELLO, got {message.TYPE.name}")
            return False
        if p.PROTOCOL_VERSION not in message.versions:
            await self._reply(
                frame,
                p.Error(
                    p.ErrorCode.UNSUPPORTED_VERSION,
                    f"this daemon speaks protocol version {p.PROTOCOL_VERSION} only",
                    {"supported": [p.PROTOCOL_VERSION]},
                ),
            )
            await self._goodbye("unsupported protocol version")
            return False
        self.minor = p.agreed_minor(message.minor)
        self.log.info("client.connected", client=message.client, minor=self.minor)
        welcome = p.Welcome(p.PROTOCOL_VERSION, __version__, os.getpid(), self.minor)
        await self._reply(frame, welcome)
        return True

    async def _receive_loop(self, nursery: trio.Nursery) -> str:
        reset = False
        while True:
            try:
                frame = await self.conn.receive()
            except p.ProtocolError as exc:
                return await self._goodbye(f"protocol error: {exc.reason}")
            except (OSError, trio.ClosedResourceError) as exc:
                if isinstance(exc, ConnectionResetError) and not reset:
                    # The client closed with our replies or events unread: Linux says so once,
                    # ahead of the packets it sent before closing (its GOODBYE), then the end.
                    reset = True
                    continue
                return "connection lost"
            if frame is None:
                return "client closed the connection"
            message = frame.message
            if isinstance(message, p.Goodbye):
                return f"client said goodbye: {message.reason}"
            if isinstance(message, p.Hello):
                frame.close_fds()
                return await self._goodbye("HELLO sent twice")
            if frame.fds:
                frame.close_fds()
                return await self._goodbye(f"{message.TYPE.name} cannot carry file descriptors")
            limit = self.server.limits.max_pending_requests
            if self.pending >= limit:
                # Answered here, in order: a client that floods requests and reads no
                # replies stops being read once its socket is full, and costs no more.
                await self._limit_exceeded(
                    frame, "max_pending_requests", limit,
                    f"{self.pending} requests of this connection are being answered, "
                    f"the most clients.max_pending_requests allows",
                )  # fmt: skip
                continue
            self.pending += 1
            nursery.start_soon(self._handle, frame)

    async def _handle(self, frame: p.Frame) -> None:
        """Answer one request; a bug met here fails that request, not the whole session."""
        try:
            await self._dispatch(frame)
        except Exception as exc:
            self.log.exception("request.internal_error", message=frame.message.TYPE.name)
            await self._error(frame, p.ErrorCode.INTERNAL, f"internal error: {exc!r}")
        finally:
            self.pending -= 1

    async def _dispatch(self, frame: p.Frame) -> None:
        message = frame.message
        if isinstance(message, p.RequestProxy):
            await self._request_proxy(frame, message)
        elif isinstance(message, p.ReleaseProxy):
            await self._release_proxy(frame, message)
        elif isinstance(message, p.Subscribe):
            await self._subscribe(frame, message)
        elif isinstance(message, p.Status):
            await self._reply(frame, self._status())
        elif isinstance(message, p.ListModules):
            await self._reply(frame, fit_entries(p.Modules, self.server.modules_info()))
        elif isinstance(message, p.ReopenProxy):
            await self._reopen_proxy(frame, message)
        elif isinstance(message, p.ProxyReady):
            await self._proxy_ready(frame, message)
        elif isinstance(message, p.Admin):
            await self._admin(frame, message)
        elif isinstance(message, p.Describe):
            await self._describe(frame, message)
        elif isinstance(message, p.ProxyCause):
            await self._proxy_cause(frame, message)
        elif isinstance(message, p.Logs):
            await self._logs(frame, message)

    async def _reply(
        self, frame: p.Frame, message: p.Message, fds: list[int] | None = None
    ) -> None:
        """Answer ``frame``, after every event published so far (docs/protocol.md, Ordering).

        The EVENT a request caused (a release's "closed", PROXY_READY's "valid")
        is published before its reply is sent, so a client holding the reply
        has seen the event.
        """
        await self._flush_events()
        await self._send_reply(frame, message, fds)

    async def _send_reply(
        self, frame: p.Frame, message: p.Message, fds: list[int] | None = None
    ) -> None:
        if frame.request_id == 0:
            # Id 0 means "no reply expected", errors included (docs/protocol.md): the
            # request was carried out; a channel in ``fds`` is closed unsent by its owner.
            self.log.debug("reply.not_sent", message=message.TYPE.name, reason="request id 0")
            return
        try:
            await self.conn.send(message, frame.request_id, fds or ())
        except (OSError, trio.ClosedResourceError) as exc:
            self.log.info("client.send_failed", error=str(exc))

    async def say_goodbye(self, reason: str) -> None:
        """Tell the client the connection ends (the daemon is stopping)."""
        await self._goodbye(reason)

    async def _goodbye(self, reason: str) -> str:
        self.log.warning("client.dropped", reason=reason)
        with (
            contextlib.suppress(OSError, trio.ClosedResourceError),
            trio.move_on_after(GOODBYE_TIMEOUT),
        ):
            await self.conn.send(p.Goodbye(reason))
        return reason

    # --- access and limits ---------------------------------------------------------

    def _abuse(self, event: str, **fields: Any) -> None:
        """Log a denial or an exceeded limit, at most ABUSE_LOG_BURST per interval."""
        allowed, ended = self.abuse_log.allow(trio.current_time())
        if ended:
            self.log.warning("client.abuse_suppressed", suppressed=ended)
        if allowed:
            self.log.warning(event, **fields)

    async def _deny(self, frame: p.Frame, action: str, rule: Rule, **fields: Any) -> None:
        """Refuse a request the access policy does not allow, saying who may."""
        who = self.server.policy.who(rule)
        peer = self.peer
        self.server.refusals["permission_denied"] += 1
        self._abuse("access.denied", action=action, peer_gid=peer.gid,
                    peer_groups=sorted(peer.groups)[:32], allowed=who, **fields)  # fmt: skip
        message = f"permission denied: uid {peer.uid} may not {action} (allowed: {who})"
        details = {"action": action, "uid": peer.uid, **fields}
        await self._reply(frame, p.Error(p.ErrorCode.PERMISSION_DENIED, message, details))

    async def _limit_exceeded(self, frame: p.Frame, limit: str, value: int, message: str) -> None:
        self.server.refusals[refusal_reason(limit)] += 1
        self._abuse("client.limit_exceeded", limit=limit, value=value)
        await self._reply(frame, p.Error(p.ErrorCode.LIMIT_EXCEEDED, f"{message} ({value})",
                                         {"limit": limit, "value": value}))  # fmt: skip

    # --- proxies ---------------------------------------------------------------

    async def _request_proxy(self, frame: p.Frame, message: p.RequestProxy) -> None:
        supervisor = self.server.supervisors.get(message.module)
        if supervisor is None:
            known = ", ".join(sorted(self.server.supervisors)) or "none"
            await self._error(frame, p.ErrorCode.UNKNOWN_MODULE,
                              f"no module {message.module!r}; modules: {known}")  # fmt: skip
            return
        policy = self.server.policy
        if not policy.may_use(self.peer, message.module):
            rule = policy.module_rule(message.module)
            await self._deny(frame, f"use module {message.module!r}", rule, module=message.module)
            return
        support = supervisor.pipelines
        if message.pipeline is not None:
            version = message.pipeline_version
            if version is None:
                version = support.max_version
            if not support.supports(message.pipeline, version):
                await self._error(
                    frame,
                    p.ErrorCode.PIPELINE_MISMATCH,
                    f"{message.module} does not support pipeline {message.pipeline!r} "
                    f"version {version}",
                    {"handlers": list(support.handlers), "min_version": support.min_version,
                     "max_version": support.max_version},
                )  # fmt: skip
                return
        if not supervisor.settled:  # its first start (the daemon's, or a reload's) under way
            await self.server.events.wait_until(
                lambda: supervisor.settled, supervisor.start_timeout
            )
        limit = self.server.limits.max_proxies_per_client
        if len(self.server.proxies.of_client(self.client_id)) >= limit:
            await self._limit_exceeded(frame, "max_proxies_per_client", limit,
                                       "this connection holds as many proxies as "
                                       "clients.max_proxies_per_client allows")  # fmt: skip
            return
        serving = self._serving(message.module) or supervisor
        # No await since the count: two requests at once cannot both take the last place.
        record = self.server.proxies.create(message.module, self.client_id)
        channel = await self._attach(frame, record, serving, new=True)
        if channel is None:
            return
        if record.state is ProxyState.CLOSED:  # released (by a guessed id) while it opened
            with channel:
                if record.instance_id is not None:
                    await serving.close_instance(record.instance_id, record.proxy_id)
            await self._error(frame, p.ErrorCode.UNKNOWN_PROXY,
                              f"proxy {record.proxy_id} was closed before it was granted: "
                              f"{record.reason}")  # fmt: skip
            return
        if serving is supervisor:
            seq = self.server.proxies.set_state(record, ProxyState.VALID)
        else:
            seq = self.server.proxies.set_state(
                record, ProxyState.VALID, "fallback", {"served_by": serving.name}
            )
        await self._grant(frame, record, serving, seq, channel)
        self.log.info("proxy.granted", proxy_id=record.proxy_id, module=message.module,
                      worker_pid=record.worker_pid)  # fmt: skip

    def _serving(self, module: str) -> ModuleSupervisor | None:
        """The supervisor whose worker should hold a new instance of ``module``.

        The module itself, or, while it is in cooldown, its fallback if that runs.
        """
        supervisor = self.server.supervisors.get(module)
        if supervisor is None or supervisor.state is not WorkerState.COOLDOWN:
            return supervisor
        fallback = self.server.supervisors.get(supervisor.fallback or "")
        if fallback is not None and fallback.state is WorkerState.RUNNING:
            return fallback
        return supervisor

    def _unavailable(self, module: str) -> dict[str, Any]:
        """Why ``module`` serves no proxy now, for the error's details: a client tells its caller.

        Its state and reason (the worker's signal or exit status), in cooldown
        how often it is tried again, and the fallback and that one's state.
        """
        supervisor = self.server.supervisors.get(module)
        if supervisor is None:
            return {}
        details: dict[str, Any] = {"state": supervisor.state.value, "reason": supervisor.reason}
        if supervisor.state is WorkerState.COOLDOWN:
            details["cooldown_interval"] = supervisor.cooldown_interval
        if supervisor.fallback:
            fallback = self.server.supervisors.get(supervisor.fallback)
            details["fallback"] = supervisor.fallback
            details["fallback_state"] = fallback.state.value if fallback else None
        return details

    def _granted(self, record: ProxyRecord, serving: ModuleSupervisor, seq: int) -> p.ProxyGranted:
        ready = serving.ready
        return p.ProxyGranted(
            proxy_id=record.proxy_id,
            module=record.module,
            module_version=ready.version if ready else "",
            worker_pid=record.worker_pid or 0,
            methods=ready.methods if ready else (),
            state=record.state.value,
            seq=seq,
            served_by="" if serving.name == record.module else serving.name,
            call_timeout=serving.call_timeout,
            minor=ready.minor if ready else 0,
            types=ready.types if ready else {},
        )

    async def _describe(self, frame: p.Frame, message: p.Describe) -> None:
        """A module's description, as its last ready worker announced it (bounded in READY).

        Any connected client may ask, as for LIST_MODULES: it says what the
        module's code declares, no more than the module list says of it.
        A module that never became ready has none yet: MODULE_UNAVAILABLE.
        """
        supervisor = self.server.supervisors.get(message.module)
        if supervisor is None:
            known = ", ".join(sorted(self.server.supervisors)) or "none"
            await self._error(frame, p.ErrorCode.UNKNOWN_MODULE,
                              f"no module {message.module!r}; modules: {known}")  # fmt: skip
            return
        if not supervisor.settled:  # its first start under way: the description comes with it
            await self.server.events.wait_until(
                lambda: supervisor.settled, supervisor.start_timeout
            )
        ready = supervisor.last_ready
        if ready is None:
            details = self._unavailable(message.module)
            await self._error(frame, p.ErrorCode.MODULE_UNAVAILABLE,
                              f"{message.module} has not been ready yet: no description",
                              details)  # fmt: skip
            return
        described = all(m.params is not None for m in ready.methods)
        note = "" if described else (
            "not described: its worker sent no description, or one the daemon dropped "
            "for breaking a bound (the journal says which)"
        )  # fmt: skip
        await self._reply(
            frame, p.Description(message.module, ready.version, ready.methods, ready.types, note)
        )

    async def _own_proxy(self, frame: p.Frame, proxy_id: int) -> ProxyRecord | None:
        """The proxy ``proxy_id`` if this client holds it; else None, after an error reply."""
        record = self.server.proxies.get(proxy_id)
        if record is not None and record.client_id == self.client_id:
            return record
        await self._error(frame, p.ErrorCode.UNKNOWN_PROXY,
                          f"no proxy {proxy_id} on this connection")  # fmt: skip
        return None

    async def _attach(
        self, frame: p.Frame, record: ProxyRecord, serving: ModuleSupervisor, *, new: bool
    ) -> socket.socket | None:
        """Open an instance for ``record`` in ``serving``'s worker; None after an error reply.

        A ``new`` proxy that gets no instance is closed; a reopened one stays invalid.
        """
        if new:
            record.served_by = serving.name  # a reopened one keeps its own until it succeeds
        try:
            instance_id, channel = await serving.open_instance(record.proxy_id)
        except (ModuleUnavailable, WorkerCrashed) as exc:
            if new:
                self.server.proxies.close(record, str(exc))
            details = self._unavailable(record.module)
            state = f" ({details['state']})" if "state" in details else ""
            await self._error(frame, p.ErrorCode.MODULE_UNAVAILABLE,
                              f"{record.module} is unavailable{state}: {exc}", details)  # fmt: skip
            return None
        record.instance_id = instance_id
        record.served_by = serving.name
        record.served_on(serving.worker_pid_for(record.proxy_id))
        record.reattached = record.state is ProxyState.INVALID
        return channel

    async def _grant(
        self, frame: p.Frame, record: ProxyRecord, serving: ModuleSupervisor,
        seq: int, channel: socket.socket,
    ) -> None:  # fmt: skip
        """Reply PROXY_GRANTED with the client's end of the channel (closed here once sent).

        The reply never overtakes an event published before it: a client
        reads its proxy's "invalid" before the grant that makes it valid again.
        """
        with channel:
            await self._reply(frame, self._granted(record, serving, seq), [channel.fileno()])

    async def _proxy_cause(self, frame: p.Frame, message: p.ProxyCause) -> None:
        """Why a proxy is not valid: the reason its invalid event gave (a signal, a hang...).

        The client asks the moment its call's channel ends, usually before the
        daemon has reaped the worker: the answer waits, at most ``CAUSE_WAIT``,
        for the proxy to leave "valid" (docs/operations.md, "Crash reports").
        """
        record = await self._own_proxy(frame, message.proxy_id)
        if record is None:
            return
        # Only a worker that held this proxy: another client's worker is not its business.
        asked = message.worker_pid
        pid = asked if asked and asked in record.served_pids else record.worker_pid
        supervisors = self.server.supervisors

        def crash() -> CrashRecord | None:
            serving = supervisors.get(record.served_by)
            return serving.crash_of(pid) if serving is not None and pid else None

        def known() -> bool:
            if record.state is ProxyState.CLOSED or crash() is not None:
                return True
            serving = supervisors.get(record.served_by)
            running = serving.running_pid_for(record.proxy_id) if serving is not None else None
            # Invalid, and not on that worker any more: its end was told (a stop, a restart).
            # Invalid while that worker still runs is an earlier end's state: wait for this one;
            # so is a proxy reopened on it whose end is not announced yet (ProxyRecord.reattached).
            unannounced = record.reattached and record.worker_pid == pid
            return record.state is not ProxyState.VALID and running != pid and not unannounced

        await self.server.events.wait_until(known, CAUSE_WAIT)
        crashed = crash()
        reason = crashed.reason if crashed is not None else record.reason or ""
        state = "invalid" if crashed is not None else record.state.value
        await self._reply(frame, p.ProxyCauseReply(record.proxy_id, state, reason))

    async def _reopen_proxy(self, frame: p.Frame, message: p.ReopenProxy) -> None:
        """A new instance for a proxy whose channel broke; it stays invalid until ready.

        The client asks the moment its channel breaks, usually before the
        daemon has seen the worker die. So the answer waits, bounded by the
        start timeout, until a worker other than the lost one runs (a standby
        promoted, a restart) or the proxy is closed: no refusal, no retry.
        Unless the lost worker still runs and shows no sign of ending: then the
        channel broke on the client's side (a reply it could not decode or keep),
        no other worker is coming, and the new instance is opened on it at once.
        """
        record = await self._own_proxy(frame, message.proxy_id)
        if record is None:
            return
        policy = self.server.policy
        if not policy.may_use(self.peer, record.module):  # a reload may have taken it away
            rule = policy.module_rule(record.module)
            await self._deny(frame, f"use module {record.module!r}", rule, module=record.module)
            return
        lost = record.worker_pid

        def answerable() -> bool:
            serving = self._serving(record.module)
            if record.state is ProxyState.CLOSED or serving is None:
                return True
            if record.instance_id is None:  # closed by a live worker (a failed replay): none lost
                return serving.state is WorkerState.RUNNING
            running = serving.running_pid_for(record.proxy_id)
            return running is not None and running != lost

        supervisor = self.server.supervisors.get(record.module)
        if supervisor is not None and self._still_serving(record):
            await self._pace_live_reopen(record, supervisor.policy)
        elif supervisor is not None:
            await self.server.events.wait_until(answerable, supervisor.start_timeout)
        if record.state is ProxyState.CLOSED:
            await self._error(frame, p.ErrorCode.UNKNOWN_PROXY,
                              f"proxy {record.proxy_id} was closed: {record.reason}")  # fmt: skip
            return
        serving = self._serving(record.module)
        if serving is None:
            await self._error(frame, p.ErrorCode.UNKNOWN_MODULE,
                              f"module {record.module!r} is no longer configured")  # fmt: skip
            return
        channel = await self._attach(frame, record, serving, new=False)
        if channel is not None:
            await self._grant(frame, record, serving, self.server.events.last_seq, channel)

    def _still_serving(self, record: ProxyRecord) -> bool:
        """Whether the worker that holds ``record``'s instance runs and shows no sign of ending.

        Should it be ending after all, opening the instance fails, and the open
        waits for the worker that replaces it (ModuleSupervisor.open_instance).
        """
        serving = self._serving(record.module)
        worker = serving.running_worker_for(record.proxy_id) if serving is not None else None
        return worker is not None and worker.pid == record.worker_pid and not worker.ending()

    async def _pace_live_reopen(self, record: ProxyRecord, policy: RestartPolicy) -> None:
        """The first reopen on a live worker at once; more in a row wait as restarts would.

        Answered at once each time, a module that breaks every new channel (a reply
        the client refuses, replayed) would keep client, daemon and worker busy.
        A proxy closed meanwhile ends the wait.
        """
        now = trio.current_time()
        if now - record.live_reopened_at >= policy.stable_after.seconds:
            record.live_reopens = 0
        if record.live_reopens:
            delay = policy.initial_delay.seconds * policy.multiplier ** (record.live_reopens - 1)

            def closed() -> bool:
                return record.state is ProxyState.CLOSED

            await self.server.events.wait_until(closed, min(delay, policy.max_delay.seconds))
        record.live_reopens += 1
        record.live_reopened_at = trio.current_time()

    async def _proxy_ready(self, frame: p.Frame, message: p.ProxyReady) -> None:
        record = await self._own_proxy(frame, message.proxy_id)
        if record is None:
            return
        seq = self.server.events.last_seq
        serving = self.server.supervisors.get(record.served_by)
        # Its worker may have died since the grant: then it stays invalid (its client
        # recovers again), never valid on a dead worker.
        running = serving.running_pid_for(record.proxy_id) if serving is not None else None
        alive = running is not None and running == record.worker_pid
        if record.state is ProxyState.INVALID and alive:
            fallback = record.served_by != record.module
            details: dict[str, Any] = {"replayed": message.replayed}
            if fallback:
                details["served_by"] = record.served_by
            reason = "fallback" if fallback else "recovered"
            seq = self.server.proxies.set_state(record, ProxyState.VALID, reason, details)
        await self._reply(frame, p.ProxyStateReply(record.proxy_id, record.state.value, seq))

    async def _admin(self, frame: p.Frame, message: p.Admin) -> None:
        controller = self.server.controller
        if controller is None:
            await self._error(frame, p.ErrorCode.UNKNOWN_COMMAND, "no admin operations here")
            return
        policy = self.server.policy
        if not policy.may_admin(self.peer):
            action = f"use the admin operation {message.command!r}"
            await self._deny(frame, action, policy.admin, command=message.command)
            return
        self.log.info("admin.requested", command=message.command, module=message.module)
        try:
            result = await controller.admin(message.command, message.module)
        except AdminError as exc:
            await self._error(frame, exc.code, exc.message, exc.details)
            return
        await self._reply(frame, p.AdminDone(result))

    async def _logs(self, frame: p.Frame, message: p.Logs) -> None:
        """The ring's recent records: admins only (they name peers, paths and pids)."""
        policy = self.server.policy
        if not policy.may_admin(self.peer):
            await self._deny(frame, "read the daemon's logs", policy.admin)
            return
        await self._reply(frame, log_reply(message))

    async def _release_proxy(self, frame: p.Frame, message: p.ReleaseProxy) -> None:
        record = await self._own_proxy(frame, message.proxy_id)
        if record is None:
            return
        await self.release(record.proxy_id)
        await self._reply(frame, p.Released(message.proxy_id))

    async def release(self, proxy_id: int, reason: str = "released") -> None:
        """Close one of this client's proxies, and its instance in the worker."""
        record = self.server.proxies.get(proxy_id)
        if record is None:
            return
        supervisor = self.server.supervisors.get(record.served_by)
        self.server.proxies.close(record, reason)
        if supervisor is not None and record.instance_id is not None:
            await supervisor.close_instance(record.instance_id, record.proxy_id)

    async def _release_all(self) -> None:
        for record in self.server.proxies.of_client(self.client_id):
            await self.release(record.proxy_id)

    async def _error(
        self, frame: p.Frame, code: p.ErrorCode, message: str, details: dict[str, Any] | None = None
    ) -> None:
        self.log.info("request.failed", code=code.value, message=message)
        await self._reply(frame, p.Error(code.value, message, details or {}))

    # --- events and status ------------------------------------------------------

    async def _subscribe(self, frame: p.Frame, message: p.Subscribe) -> None:
        events = self.server.events
        if self.subscription is not None:
            await self._reply(frame, p.Subscribed(events.last_seq))
            return
        # Subscribe and copy the history with no await between: no event is missed or doubled.
        # The history goes ahead of the live events in the queue, and SUBSCRIBED is sent
        # (or queued for the socket) before anything can flush it: a reply another request
        # sends meanwhile flushes them in order, and never overtakes them.
        self.subscription = sub = events.subscribe(self.server.limits.event_queue)
        past = events.since(message.since) if message.since is not None else []
        sub.queue.extendleft(reversed(past))
        with sub.cut_off:  # cancelled by the bus the moment the queue overflows
            await self._send_reply(frame, p.Subscribed(events.last_seq, len(past)))
            while not sub.overflowed and await self._flush_events() and not sub.closed:
                await sub.wait()
        if sub.overflowed:
            sub.queue.clear()
            self.cut_off = (f"event queue overflow: the client does not read its events "
                            f"({sub.size} unread, clients.event_queue)")  # fmt: skip
            await self._goodbye(self.cut_off)
            self.conn.close()

    async def _flush_events(self) -> bool:
        """Send every event queued for this client now, in order; False if the client is gone.

        A reply sent after this never overtakes an event published before it
        (a client reads its proxy's "invalid" before the grant that makes it
        valid again). Sends do not yield while the socket has room, and an
        event leaves the queue only as it is sent, in FIFO order behind any
        send that waits for room.
        """
        sub = self.subscription
        # A subscriber cut off for overflow gets no more events: its session ends.
        while sub is not None and sub.queue and not sub.overflowed:
            if not await self._send_event(sub.queue.popleft()):
                return False
        return True

    async def _send_event(self, event: p.Event) -> bool:
        try:
            await self.conn.send(event)
        except (OSError, trio.ClosedResourceError):
            return False  # the client is gone: its session ends on its own
        return True

    def _status(self) -> p.Message:
        """STATUS_REPLY, degraded per module if all of it would not fit one packet."""
        d = self.server
        daemon = {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(time.monotonic() - d.started, 3),
            "socket": d.socket_path,
            "clients": len(d.sessions),
            "clients_refused": d.refused,
            "proxies": len(d.proxies),
            "event_seq": d.events.last_seq,
            **d.extra_status(),
        }
        modules = {name: sup.status() for name, sup in d.supervisors.items()}
        return fit_entries(lambda entries: p.StatusReply(daemon, entries), modules)


async def serve_clients(
    listener: socket.socket,
    server: ClientServer,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections for ever, one session task each, within the connection limits."""
    sock = trio.socket.from_stdlib_socket(listener)
    warned_groups = False
    warned_buffer = False
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue  # gone before we took it
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("client.accept_failed", error=os.strerror(exc.errno or 0),
                          retry_in=ACCEPT_RETRY)  # fmt: skip
                await trio.sleep(ACCEPT_RETRY)
                continue
            try:
                peer = peer_of(conn)
            except OSError:
                conn.close()
                continue
            if not peer.groups_known and not warned_groups:
                warned_groups = True
                log.warning("access.no_peergroups",
                            reason="this kernel has no SO_PEERGROUPS: group rules see each "
                            "client's primary group only")  # fmt: skip
            raw = socket.socket(fileno=conn.detach())
            if not size_send_buffer(raw) and not warned_buffer:
                warned_buffer = True
                log.warning("socket.send_buffer_small", needed=SEND_BUFFER // 2,
                            wmem_max_at_least=MIN_WMEM_MAX,
                            reason="the kernel caps the send buffer (net.core.wmem_max) below "
                            "one largest message: replies that large will fail")  # fmt: skip
            refusal = server.refusal(peer)
            if refusal is not None:
                _refuse(server, raw, peer, refusal)
                continue
            packets = PacketSocket(raw, p.FROM_CLIENT, server.limits.max_message_size)
            session = Session(server, packets, peer)
            # Counted now, not when its task starts: a burst of connections cannot slip past.
            server.sessions.add(session)
            server.connections[peer.uid] += 1
            nursery.start_soon(_run_session, server, session)


def _refuse(server: ClientServer, sock: socket.socket, peer: Peer, reason: str) -> None:
    """Tell a connection past a limit why, without waiting on it, and close it."""
    server.refused += 1
    per_user = "(clients.max_connections_per_user)" in reason
    server.refusals["max_connections_per_user" if per_user else "max_connections"] += 1
    allowed, ended = server.refusal_log.allow(trio.current_time())
    if allowed:
        log.warning("client.refused", peer_pid=peer.pid, peer_uid=peer.uid, reason=reason,
                    **({"suppressed": ended} if ended else {}))  # fmt: skip
    with sock, contextlib.suppress(OSError):  # a new socket has room; if not, it just closes
        sock.send(p.encode(p.Goodbye(reason)), socket.MSG_DONTWAIT)
        for _ in range(DISCARD_UNREAD):  # its HELLO, if sent: no ECONNRESET ahead of the reason
            if not sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC):
                break


async def _run_session(server: ClientServer, session: Session) -> None:
    try:
        await session.run()
    except Exception:
        # A bug met by one client must not stop the daemon serving all the others.
        session.log.exception("client.session_failed")
    finally:
        server.sessions.discard(session)
        server.connections[session.peer.uid] -= 1
        if not server.connections[session.peer.uid]:
            del server.connections[session.peer.uid]
