"""The blocking client, for programs without an event loop and for ipadctl.

It imports no trio, so a command-line call starts fast. One thread at a time
may use a client and its proxies. Events that arrive while a reply is awaited
are queued and returned by ``next_event``.

Without a task of its own, a proxy recovers on the next call instead of in the
background: it asks for a new channel (REOPEN_PROXY) and waits for the answer
on the daemon's socket, with poll(2) and the call's deadline. A grant that
comes after the caller gave up is kept for the next call, never thrown away.
"""

from __future__ import annotations

import contextlib
import errno
import math
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ipad.client._backlog import EVENT_BACKLOG, RAW_EVENTS, Backlog
from ipad.client._buffers import BufferArg, FdArg
from ipad.client._core import (
    CHANNEL_REPLIES,
    CLIENT_VERSIONS,
    Backoff,
    Bounds,
    M,
    ProxyInfo,
    build_call,
    check_admin,
    check_describe,
    expect,
    not_sent,
)
from ipad.client._core_proxy import CAUSE_WAIT, ProxyCore, ProxyState
from ipad.client._core_requests import Match, RequestBook
from ipad.config.paths import client_socket_path
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    CallNotSent,
    Disconnected,
    IpadError,
    TimedOut,
    UnknownProxy,
    WorkerCrashed,
)
from ipad.protocol.fdpass import recv_packet, rights

__all__ = ["EVENT_BACKLOG", "BlockingClient", "BlockingProxy"]

#: Packets a wait still takes once its deadline has passed, if they are ready: a grant
#: behind a burst of events is used, but a peer that keeps the socket full (a worker
#: flooding its channel) cannot stretch the wait for ever.
LATE_PACKETS = 128

#: Seconds a request whose answer changes nothing (PROXY_READY) may wait for room to be sent.
TELL_WAIT = 5.0


class _Connection:
    """A blocking SEQPACKET connection: its RequestBook, and an event backlog.

    What each packet answers is the book's decision (ipad/client/_core_requests.py):
    a reply to a request not awaited now (a grant the caller gave up on) stays
    in the book for the next caller. Every wait is a poll(2) bounded by one
    deadline for the whole request, so packets that keep coming (events)
    cannot stretch it.
    """

    def __init__(
        self,
        sock: socket.socket,
        allowed: frozenset[p.MsgType],
        what: str,
        on_event: Callable[[p.Message], None] | None = None,
    ) -> None:
        self.sock = sock
        self.allowed = allowed
        self.what = what
        self.on_event = on_event
        self.book = RequestBook(what)
        #: Events not read yet, bounded in count and bytes (ipad/client/_backlog.py).
        self.backlog = Backlog()
        self.closed_reason: str | None = None

    def request(
        self, message: p.Message, fds: list[int] | None = None, deadline: float | None = None
    ) -> p.Frame:
        """Send and wait for the reply with the same id, queueing whatever comes between."""
        return self.reply(self.send(message, fds, deadline), deadline)

    def send(
        self, message: p.Message, fds: list[int] | None = None, deadline: float | None = None
    ) -> int:
        """Send a request; its id. A connection already gone never took it (CallNotSent)."""
        if self.closed_reason is not None:
            raise self._not_sent()
        request_id = self.book.open(deadline).request_id
        packet = p.encode(message, request_id, len(fds or ()))
        flags = 0 if deadline is None else socket.MSG_DONTWAIT  # without one, block as ever
        while True:
            try:
                self.sock.sendmsg([packet], rights(fds or ()), flags)
            except BlockingIOError:
                try:
                    self._ready(select.POLLOUT, deadline)  # the peer reads slowly: wait for room
                except TimedOut:
                    self.book.unsent(request_id)
                    raise
            except OSError as exc:
                self.book.unsent(request_id)
                self._drain()
                self._end(f"{self.what} is gone: {exc.strerror}")
                raise self._not_sent() from None
            else:
                return request_id

    def tell(self, message: p.Message) -> None:
        """Send a request whose answer changes nothing: dropped when it comes.

        It waits up to TELL_WAIT for room: sent with no wait at all, a PROXY_READY
        met by a full socket buffer (a daemon busy for a moment) was lost, and the
        daemon kept announcing a proxy invalid that its client used again.
        """
        self.book.give_up(self.send(message, deadline=time.monotonic() + TELL_WAIT))

    def reply(self, request_id: int, deadline: float | None, *, keep: bool = False) -> p.Frame:
        """The reply to ``request_id``; other packets that come first go where the book says.

        A caller that gives up (TimedOut) gives the request up, unless ``keep``:
        then its reply is kept for the next caller. Past the deadline up to
        ``LATE_PACKETS`` that are ready are still taken: then the wait ends,
        however much more keeps coming. CallNotSent if the worker died before
        it read the request.
        """
        self.book.wait_until(request_id, deadline)
        try:
            return self._await(request_id, deadline)
        except WorkerCrashed:
            if self.book.never_ran(request_id):
                raise self._not_sent() from None
            raise
        except BaseException:
            if not keep:
                self.book.give_up(request_id)
            raise

    def _await(self, request_id: int, deadline: float | None) -> p.Frame:
        late = 0
        while True:
            frame = self.book.collect(request_id)  # the connection's end, if that came first
            if frame is not None:
                return frame
            if late >= LATE_PACKETS:
                raise TimedOut(f"no answer from the {self.what} in time")
            self._receive(deadline)
            late += self.book.overdue(request_id, time.monotonic())

    def next_event(self, timeout: float | None) -> p.Message | None:
        """The oldest queued or next arriving event; None if none came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        late = 0
        while True:
            while not self.backlog:
                if self.closed_reason is not None:
                    raise self._gone()
                if late >= LATE_PACKETS:
                    return None  # past the deadline: a flood does not stretch it
                try:
                    self._receive(deadline)
                except TimedOut:
                    return None
                late += deadline is not None and time.monotonic() >= deadline
            event: p.Message | None = self.backlog.pop()
            if event is not None:  # None: a module event that could not be decoded (lost)
                return event

    def _ready(self, events: int, deadline: float | None) -> None:
        """Wait until the socket is ready for ``events``; TimedOut once ``deadline`` passed.

        What is ready at the deadline is still taken: a grant already there is used.
        """
        poller = select.poll()
        poller.register(self.sock, events)
        while True:
            if deadline is None:
                wait_ms = None
            else:
                wait_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if poller.poll(wait_ms):
                return
            if wait_ms == 0:
                raise TimedOut(f"no answer from the {self.what} in time")

    def _drain(self) -> None:
        """Read what the peer sent before it closed: its GOODBYE says why."""
        with contextlib.suppress(IpadError, OSError):
            while self.closed_reason is None:
                self._receive(time.monotonic())

    def _receive(self, deadline: float | None) -> None:
        """Take the next packet: the book keeps a reply, an event is queued, a goodbye noted.

        The connection's end is the book's error for every request still waiting.
        """
        if deadline is not None:  # without one, the blocking receive waits as long as it takes
            self._ready(select.POLLIN, deadline)
        try:
            received = recv_packet(self.sock)
            if received is not None:
                frame = p.decode(*received, allowed=self.allowed, decoders=RAW_EVENTS)
        except p.ProtocolError as exc:
            self._end(f"{self.what} broke the protocol: {exc.reason}")
            return
        except MemoryError:
            # What the peer sent decodes to more than this process can hold: this connection
            # ends with that reason (a proxy reopens its channel, which closes this one); the
            # client and its other proxies carry on.
            self._end(f"the client ran out of memory decoding what the {self.what} sent")
            return
        except OSError as exc:
            if exc.errno == errno.ECONNRESET and self.what == "daemon":
                # The daemon closed with our packets unread: the kernel reports that first,
                # then what the daemon sent before (a GOODBYE with its reason), then the end.
                self._receive(deadline)
                return
            # A worker that died with packets unread never read the newest request.
            self.book.reset = exc.errno == errno.ECONNRESET
            self._end(f"{self.what} is gone: {exc.strerror}")
            return
        if received is None:
            self._end(f"{self.what} closed the connection")
            return
        match, message = self.book.take(frame), frame.message
        if match is Match.EVENT:
            self.backlog.put(message)
            if self.on_event is not None:
                self.on_event(message)
        elif match is Match.GOODBYE and isinstance(message, p.Goodbye):
            self._end(message.reason)

    def _end(self, reason: str) -> None:
        """The connection ended (the first reason given stands): every wait on it fails."""
        self.closed_reason = self.closed_reason or reason
        self.book.fail_all(self._gone)

    def _gone(self) -> IpadError:
        if self.what == "daemon":
            return Disconnected(self.closed_reason or "disconnected")
        return WorkerCrashed(self.closed_reason or "worker is gone")

    def _not_sent(self) -> IpadError:
        gone = self._gone()
        return CallNotSent(gone.message) if isinstance(gone, WorkerCrashed) else gone

    def close(self) -> None:
        """Close the socket and whatever replies were kept."""
        self._end("closed by this client")
        self.book.close()
        self.sock.close()


class _Failed(Exception):
    """One recovery attempt failed; ``error`` is what a caller is told.

    ``final``: no later attempt can succeed (the daemon closed the proxy, or
    its connection is gone without ``reconnect``), so ``wait`` waits no more.
    """

    def __init__(self, error: IpadError, *, final: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.final = final


class _Replay:
    """A granted channel whose setup calls are being replayed, kept across calls until done."""

    def __init__(self, proxy: BlockingProxy, frame: p.Frame) -> None:
        self.granted: p.ProxyGranted = expect(frame, p.ProxyGranted)
        if len(frame.fds) != 1:
            frame.close_fds()
            raise IpadError("PROXY_GRANTED came without its channel")
        channel = socket.socket(fileno=frame.fds[0])
        self.conn = _Connection(channel, p.FROM_WORKER_CHANNEL, f"{proxy.module} worker")
        self.calls = proxy.replay()
        self.sent: list[int] = []
        self.answered = 0

    def finish(self, until: float | None) -> None:
        """Send the setup calls not yet sent, all before any reply (pipelined), and collect them."""
        while len(self.sent) < len(self.calls):
            message, fd_list = self.calls[len(self.sent)]
            self.sent.append(self.conn.send(message, fd_list, until))
        while self.answered < len(self.sent):
            reply = CHANNEL_REPLIES[type(self.calls[self.answered][0])]
            expect(self.conn.reply(self.sent[self.answered], until, keep=True), reply)
            self.answered += 1


class BlockingProxy(ProxyCore):
    """A handle on one module instance.

    A call on a proxy whose worker died brings it back first (new channel,
    setup calls replayed), within the call's ``timeout`` (the whole call) and
    ``wait`` (the recovery) if given; without ``wait``, one attempt is made
    and its failure is the call's, with the daemon's reason. A call in flight
    when the worker died fails with WorkerCrashed: it may have run.
    """

    def __init__(
        self,
        client: BlockingClient,
        info: ProxyInfo,
        channel: socket.socket,
        pipeline: str | None = None,
        pipeline_version: int | None = None,
    ) -> None:
        super().__init__(info, pipeline, pipeline_version)
        self.client = client
        self._conn = _Connection(channel, p.FROM_WORKER_CHANNEL, f"{info.module} worker")
        #: The daemon connection the proxy id belongs to; another one needs REQUEST_PROXY.
        self._daemon_conn = client._conn
        #: REOPEN_PROXY (or REQUEST_PROXY after a reconnection) sent, its reply kept.
        self._asked: tuple[_Connection, int] | None = None
        self._replay: _Replay | None = None

    @property
    def valid(self) -> bool:
        """True while the channel to the worker works, as far as the client knows."""
        return self.phase is ProxyState.VALID and self._conn.closed_reason is None

    def call(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        fds: Mapping[str, FdArg] | None = None,
        timeout: float | None = None,
        *,
        wait: float | None = None,
    ) -> Any:
        """Call ``method``; ``fds`` maps Buffer parameters to descriptors (or Registered ids).

        ``timeout`` bounds the whole call (TimedOut), recovery and replay
        included; without it, the module's ``call_timeout`` does (from the
        grant). ``wait`` is how long a dead proxy's recovery is waited for,
        through failed attempts (CallNotSent when it runs out). A reply that
        comes after the call gave up is dropped; the proxy stays usable.
        """
        message, fd_list = build_call(method, args, fds)
        self.check_call(method, args, fds)  # no round trip for a call that cannot fit
        return self._request(message, fd_list, method, fds, timeout, wait)

    def map_buffers(
        self,
        buffers: Mapping[int, BufferArg],
        timeout: float | None = None,
        *,
        wait: float | None = None,
    ) -> None:
        """Register up to MAX_FDS buffers by id, kept mapped by the worker until unmapped.

        As the trio client's ``map_buffers``: memfds (inputs), ``Output(fd)``,
        ``DmaBuf(fd)``; all or none; registered again after a worker restart,
        before the setup calls are replayed. Calls name them with ``Registered(id)``.
        """
        message, fd_list = self.map_request(buffers)
        self._request(message, fd_list, "map_buffers", dict(buffers), timeout, wait)

    def unmap_buffers(
        self, ids: Iterable[int], timeout: float | None = None, *, wait: float | None = None
    ) -> None:
        """Unregister buffers: the worker unmaps them and closes its descriptors."""
        self._request(self.unmap_request(ids), [], "unmap_buffers", None, timeout, wait)

    def _request(
        self,
        message: p.Message,
        fd_list: list[int],
        method: str,
        given: Any,
        timeout: float | None,
        wait: float | None,
    ) -> Any:
        """Send a channel request within its bounds; what ``answered`` makes of the reply."""
        bounds = self.bounds(time.monotonic(), timeout, wait)
        while True:
            if not self.valid:
                self._recover(bounds)
            conn = self._conn
            try:
                request_id = conn.send(message, fd_list, bounds.deadline)
            except CallNotSent:
                self._lost(conn)
                continue  # nothing ran: sent again once the proxy is back, within the bounds
            except TimedOut:
                raise self.timed_out(method, bounds.timeout, sent=False) from None
            try:
                frame = conn.reply(request_id, bounds.deadline)
            except CallNotSent:
                self._lost(conn)
                continue
            except WorkerCrashed as exc:
                self._lost(conn)
                self._ask_now()  # the next call finds the new channel ready, or sooner
                self._await_cause(bounds.deadline)
                error = self.crashed(exc)
                if error is exc:
                    raise
                raise error from exc
            except TimedOut:
                raise self.timed_out(method, bounds.timeout, sent=True) from None
            return self.answered(message, frame, given)

    def recover(self, timeout: float) -> None:
        """Bring the proxy back now (reopen, replay) within ``timeout`` seconds; raise why not.

        What is raised is the daemon's own error (UnknownProxy for a proxy it
        closed, ModuleUnavailable, Disconnected), not a call's CallNotSent.
        """
        if self.closed:
            raise UnknownProxy(f"proxy {self.proxy_id} was closed: {self.reason}")
        try:
            self._recover(Bounds.of(time.monotonic(), timeout, timeout))
        except CallNotSent as exc:
            cause = exc.__cause__
            raise cause if isinstance(cause, IpadError) else exc from None

    def _recover(self, bounds: Bounds) -> None:
        """Make the proxy valid within ``bounds``: one attempt, or attempts until ``wait`` ends."""
        while not self.valid:
            unusable = self.unusable()
            if unusable is not None:
                raise unusable
            try:
                self._pace(bounds.until)
                self._attempt(bounds.until)
            except TimedOut:
                raise bounds.expired(time.monotonic(), self.module, self.why()) from None
            except _Failed as failed:
                self.failed(failed.error)
                if failed.final or self.gives_up(bounds, failed.error):
                    raise failed.error from failed.error.__cause__

    def _pace(self, until: float | None) -> None:
        """After a refusal, the backoff's delay before asking again; the last failure if too late.

        A refusal is an answer, not news to wait for on a socket; and however
        many calls come, the daemon is asked on one schedule.
        """
        if self._asked is not None or self._replay is not None or self.failure is None:
            return  # an attempt is under way, or none failed
        now = time.monotonic()
        delay = self.backoff.wait(now)
        if until is not None and now + delay >= until:
            raise _Failed(self.failure)
        time.sleep(delay)

    def _attempt(self, until: float | None) -> None:
        """One recovery: a grant (asked once, kept across calls), then the replay on it."""
        if self._replay is None:
            frame = self._grant(until)
            try:
                self._replay = _Replay(self, frame)
            except IpadError as exc:  # closed by the daemon (for good), unavailable, denied
                module_event = self.client.module_events.get(self.module)
                error = self.refused(exc, time.monotonic(), module_event)
                raise _Failed(error, final=self.closed) from None
        replay = self._replay
        try:
            replay.finish(until)
        except TimedOut:
            raise  # the replay goes on at the next call, on the same channel
        except IpadError as exc:
            replay.conn.close()
            self._replay = None
            raise _Failed(self.replay_failed(exc, time.monotonic())) from None
        self._replay = None
        self._adopt(replay)

    def _grant(self, until: float | None) -> p.Frame:
        """The daemon's answer to REOPEN_PROXY, or REQUEST_PROXY on a daemon connected anew.

        The request is sent once and its reply kept: a caller that gives up
        leaves it for the next, which waits on the same request.
        """
        client = self.client
        retried = False  # a connection found lost is made again once, and asked anew
        while True:
            try:
                if self._asked is None:
                    conn = client._live(until)
                    message = self.reopen_message(same_connection=conn is self._daemon_conn)
                    request_id = conn.send(message, deadline=until)
                    self._asked = (conn, request_id)
                conn, request_id = self._asked
                frame = conn.reply(request_id, until, keep=True)
            except Disconnected as exc:
                self._asked = None
                if not client.reconnect or retried:
                    raise self._disconnected(exc) from None
                retried = True
                continue
            self._asked = None
            return frame

    def _disconnected(self, exc: Disconnected) -> _Failed:
        """The daemon connection is gone: for good without ``reconnect``, else until it is back."""
        final = not self.client.reconnect
        self.connection_lost(exc.message, final=final)
        if final:
            return _Failed(Disconnected(exc.message), final=True)
        return _Failed(not_sent(self.module, exc, self.reason))

    def _await_cause(self, deadline: float | None) -> None:
        """Learn, within a bounded moment, why the worker died: PROXY_CAUSE, or its invalid event.

        A daemon that speaks PROXY_CAUSE is asked about the worker the call ran
        on: it answers once it knows that worker's end (an invalid event may be
        about an earlier one). An older daemon's invalid event, if subscribed.
        """
        client, conn = self.client, self._daemon_conn
        end = time.monotonic() + CAUSE_WAIT
        end = end if deadline is None else min(end, deadline)
        if conn is not client._conn:
            return
        if client.welcome.minor >= p.MINOR_PROXY_CAUSE:
            asked = p.ProxyCause(self.proxy_id, self.info.worker_pid)
            with contextlib.suppress(IpadError, OSError):
                reply = conn.request(asked, deadline=end).message
                if isinstance(reply, p.ProxyCauseReply) and reply.state == "invalid":
                    self.learned_cause(reply.reason)
            return
        if not client.subscribed:
            return
        while self.cause is None and conn.closed_reason is None and time.monotonic() < end:
            try:
                conn._receive(end)
            except (IpadError, OSError):
                return

    def _ask_now(self) -> None:
        """Ask for a new channel without waiting: the daemon answers once a new worker runs."""
        conn = self.client._conn
        if self._asked is not None or conn is not self._daemon_conn or conn.closed_reason:
            return
        try:
            request_id = conn.send(p.ReopenProxy(self.proxy_id), deadline=time.monotonic())
        except IpadError:
            return  # the daemon is gone or slow: the next call asks again
        self._asked = (conn, request_id)

    def _adopt(self, replay: _Replay) -> None:
        """Switch to the replayed channel and tell the daemon (its answer is not awaited)."""
        client, granted = self.client, replay.granted
        self._conn.close()
        self._conn = replay.conn
        if self._daemon_conn is not client._conn:  # requested anew from a restarted daemon
            client.reattaching.discard(self)
            client.proxies[granted.proxy_id] = self
            self._daemon_conn = client._conn
        ready = self.adopted(granted)
        # The daemon marks the proxy valid for everyone; its answer changes nothing here.
        with contextlib.suppress(IpadError):
            client._conn.tell(ready)

    def _lost(self, conn: _Connection) -> None:
        if conn is self._conn:
            self.channel_lost(conn.closed_reason)

    def _on_event(self, event: p.Event) -> None:
        self.on_event(event)

    @property
    def events_lost(self) -> int:
        """Module events lost on the current channel (past its bounds, or undecodable)."""
        return self._conn.backlog.dropped

    def next_event(self, timeout: float | None = None) -> p.ModuleEvent | None:
        """The next event the module instance sent, or None after ``timeout`` seconds."""
        event = self._conn.next_event(timeout)
        assert event is None or isinstance(event, p.ModuleEvent)  # noqa: S101 - channel sends only these
        return event

    def release(self) -> None:
        """Give the instance back (a proxy the daemon already closed is simply forgotten).

        RELEASE_PROXY goes before the channel is closed, as with the trio
        client: closed first, the worker would report the instance closed,
        the daemon close the proxy for that and answer the release with an
        error (``request.failed`` in its log) on every release.
        """
        client = self.client
        if client.proxies.get(self.proxy_id) is self:  # not another's id on a new connection
            del client.proxies[self.proxy_id]
        client.reattaching.discard(self)
        try:
            if self._daemon_conn is self.client._conn:
                self.client.request(p.ReleaseProxy(self.proxy_id), p.Released)
        except (UnknownProxy, Disconnected):
            pass  # its channel broke, its instance was closed, or its daemon is gone: it is gone
        finally:
            self._discard()
            self.closed_by("released")

    def _discard(self) -> None:
        """Close the channels and drop what a recovery under way holds."""
        if self._asked is not None:
            self._asked[0].book.give_up(self._asked[1])
            self._asked = None
        if self._replay is not None:
            self._replay.conn.close()
            self._replay = None
        self._conn.close()
        self.setup_log.close()


class BlockingClient:
    """A blocking connection to the daemon."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        name: str = "",
        subscribe: bool = False,
        reconnect: bool = False,
    ) -> None:
        self.path = str(path) if path is not None else str(client_socket_path())
        self.name = name
        self.subscribed = subscribe
        #: Whether a lost daemon connection is made again (on the next request or call).
        self.reconnect = reconnect
        self.proxies: dict[int, BlockingProxy] = {}
        #: Proxies of a lost connection, each back in ``proxies`` under its new id once regained.
        self.reattaching: set[BlockingProxy] = set()
        #: The last event about each module (with ``subscribe``): why it does not serve.
        self.module_events: dict[str, p.Event] = {}
        #: Paces reconnections, however many calls find the daemon gone.
        self._backoff = Backoff()
        self._conn, self.welcome = self._connect(None)
        self._backoff.up(time.monotonic())

    def _connect(self, deadline: float | None) -> tuple[_Connection, p.Welcome]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                sock.connect(self.path)
            except OSError as exc:  # connect(2) names no file: say which socket it was
                raise type(exc)(exc.errno, exc.strerror, self.path) from None
            conn = _Connection(sock, p.FROM_DAEMON, "daemon", self._on_event)
            hello = p.Hello(CLIENT_VERSIONS, self.name, p.PROTOCOL_MINOR)
            welcome = expect(conn.request(hello, deadline=deadline), p.Welcome)
            if self.subscribed:
                expect(conn.request(p.Subscribe(None), deadline=deadline), p.Subscribed)
        except BaseException:
            sock.close()
            raise
        return conn, welcome

    def _on_event(self, event: p.Message) -> None:
        """Note what a daemon event says about a module or one of our proxies."""
        if not isinstance(event, p.Event):
            return
        if event.kind == "module" and event.state is not None:
            self.module_events[event.module] = event
        proxy = self.proxies.get(event.proxy_id) if event.proxy_id is not None else None
        if proxy is not None and proxy._daemon_conn is self._conn:
            proxy._on_event(event)

    def _live(self, deadline: float | None) -> _Connection:
        """The daemon connection, made again first if it was lost and ``reconnect`` allows."""
        if self._conn.closed_reason is None:
            return self._conn
        if not self.reconnect:
            raise Disconnected(self._conn.closed_reason)
        self.reconnect_now(deadline)
        return self._conn

    def reconnect_now(self, deadline: float | None = None) -> None:
        """Connect to the daemon again, when the backoff allows; Disconnected if refused.

        However many calls find the daemon gone, attempts follow one schedule
        (at once, then 10 ms doubling to 1 s, with jitter); a call whose
        deadline comes before the next attempt fails at once, saying when.
        """
        backoff = self._backoff
        now = time.monotonic()
        self.module_events.clear()  # about the daemon that is gone
        backoff.down(now)
        delay = backoff.wait(now)
        if deadline is not None and now + delay > deadline:
            raise Disconnected(f"cannot reach the daemon at {self.path} now; "
                               f"next attempt in {delay:.3f}s")  # fmt: skip
        time.sleep(delay)  # the backoff's own delay: nothing to wait for on a socket
        try:
            conn, welcome = self._connect(deadline)
        except (OSError, IpadError) as exc:
            backoff.failed(time.monotonic())
            why = exc.message if isinstance(exc, IpadError) else exc.strerror
            raise Disconnected(f"cannot reach the daemon at {self.path}: {why}") from None
        backoff.up(time.monotonic())
        self._conn.close()
        self._conn, self.welcome = conn, welcome
        # The new daemon numbers proxies afresh: each comes back under a new id once regained.
        self.reattaching |= set(self.proxies.values())
        self.proxies = {}

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, message: p.Message, reply: type[M], timeout: float | None = None) -> M:
        """Send a request to the daemon; return its reply of type ``reply``.

        With ``reconnect``, a connection found lost is made again (when the
        backoff allows) and the request sent on the new one.
        """
        return expect(self._frame(message, timeout), reply)

    def _frame(self, message: p.Message, timeout: float | None = None) -> p.Frame:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            try:
                return self._live(deadline).request(message, deadline=deadline)
            except Disconnected:
                if not self.reconnect:
                    raise
                return self._live(deadline).request(message, deadline=deadline)
        except TimedOut:
            raise TimedOut(f"the daemon did not answer {message.TYPE.name} within {timeout:g}s",
                           {"sent": True}) from None  # fmt: skip

    def subscribe(self, since: int | None = None) -> p.Subscribed:
        """Receive events from now on, after the kept ones later than ``since`` if given."""
        return self.request(p.Subscribe(since), p.Subscribed)

    @property
    def events_lost(self) -> int:
        """Daemon events lost on this connection past the backlog's bounds."""
        return self._conn.backlog.dropped

    def next_event(self, timeout: float | None = None) -> p.Event | None:
        """The next daemon event, or None after ``timeout`` seconds."""
        event = self._conn.next_event(timeout)
        assert event is None or isinstance(event, p.Event)  # noqa: S101 - daemon sends only these
        return event

    def status(self) -> p.StatusReply:
        """The daemon's and every module's state."""
        reply: p.StatusReply = self.request(p.Status(), p.StatusReply)
        return reply

    def admin(self, command: str, module: str | None = None, timeout: float | None = None) -> Any:
        """An operator's command: ``restart`` (a module), ``reload``, ``stop``, ``start``...

        UnsupportedVersion, nothing sent, for ``stop``/``start`` of a module to a
        daemon before minor 3 (it would stop itself).
        """
        check_admin(self.welcome, command, module)
        reply: p.AdminDone = self.request(p.Admin(command, module), p.AdminDone, timeout)
        return reply.result

    def modules(self) -> dict[str, dict[str, Any]]:
        """Every discovered module and its manifest."""
        reply: p.Modules = self.request(p.ListModules(), p.Modules)
        return reply.modules

    def describe(self, module: str) -> p.Description:
        """``module``'s methods: parameters, result types, docs (as its last worker said them)."""
        check_describe(self.welcome)
        reply: p.Description = self.request(p.Describe(module), p.Description)
        return reply

    def request_proxy(
        self, module: str, pipeline: str | None = None, pipeline_version: int | None = None
    ) -> BlockingProxy:
        """A proxy to a new instance of ``module``."""
        frame = self._frame(p.RequestProxy(module, pipeline, pipeline_version))
        granted: p.ProxyGranted = expect(frame, p.ProxyGranted)
        if len(frame.fds) != 1:
            frame.close_fds()
            raise IpadError("PROXY_GRANTED came without its channel")
        channel = socket.socket(fileno=frame.fds[0])
        proxy = BlockingProxy(
            self, ProxyInfo.from_granted(granted), channel, pipeline, pipeline_version
        )
        self.proxies[proxy.proxy_id] = proxy
        return proxy

    def close(self) -> None:
        """Close every proxy channel and the connection."""
        for proxy in [*self.proxies.values(), *self.reattaching]:
            proxy._discard()
            proxy.closed_by("client closed")
        self.proxies.clear()
        self.reattaching.clear()
        self._conn.close()
