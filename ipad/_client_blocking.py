"""The blocking client, for programs without an event loop and for ipadctl.

It imports no trio, so a command-line call starts fast. One thread at a time
may use a client and its proxies. Events that arrive while a reply is awaited
are queued and returned by ``next_event``.
"""

from __future__ import annotations

import collections
import errno
import itertools
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import _protocol as p
from ._client_common import CLIENT_VERSIONS, M, ProxyInfo, SetupLog, build_call, expect
from ._errors import (
    CallNotSent,
    Disconnected,
    IpadError,
    ModuleUnavailable,
    UnknownProxy,
    WorkerCrashed,
)
from ._fdpass import recv_packet, send_packet
from ._paths import client_socket_path

#: Events kept while nobody reads them; the oldest go first.
EVENT_BACKLOG = 1024

#: How often a recovering blocking proxy asks again whether its module is back.
RECOVERY_POLL = 0.005


class _Connection:
    """A blocking SEQPACKET connection with request ids and an event backlog."""

    def __init__(self, sock: socket.socket, allowed: frozenset[p.MsgType], what: str) -> None:
        self.sock = sock
        self.allowed = allowed
        self.what = what
        self.ids = itertools.count(1)
        self.backlog: collections.deque[p.Message] = collections.deque(maxlen=EVENT_BACKLOG)
        self.closed_reason: str | None = None

    def request(
        self, message: p.Message, fds: list[int] | None = None, timeout: float | None = None
    ) -> p.Frame:
        """Send and wait for the reply with the same id, queueing whatever comes between."""
        if self.closed_reason is not None:
            gone = self._gone()
            raise CallNotSent(gone.message) if isinstance(gone, WorkerCrashed) else gone
        request_id = next(self.ids)
        try:
            send_packet(self.sock, p.encode(message, request_id, len(fds or ())), fds or ())
        except OSError as exc:
            self._drain()
            self.closed_reason = self.closed_reason or f"{self.what} is gone: {exc.strerror}"
            gone = self._gone()
            if isinstance(gone, WorkerCrashed):
                raise CallNotSent(gone.message) from None
            raise gone from None
        if timeout is not None:  # an ioctl each way: only when there is a timeout to set
            self.sock.settimeout(timeout)
        try:
            while True:
                frame = self._receive()
                if frame is None:
                    continue
                if frame.request_id == request_id:
                    return frame
                # A late reply to an abandoned request: drop it, never misdeliver it.
                frame.close_fds()
        finally:
            if timeout is not None:
                self.sock.settimeout(None)

    def next_event(self, timeout: float | None) -> p.Message | None:
        """The oldest queued or next arriving event; None if none came within ``timeout``."""
        if self.backlog:
            return self.backlog.popleft()
        if self.closed_reason is not None:
            raise self._gone()
        self.sock.settimeout(timeout)
        try:
            while not self.backlog:
                frame = self._receive()
                if frame is not None:
                    frame.close_fds()  # a late reply nobody waits for
        except TimeoutError:
            return None
        finally:
            self.sock.settimeout(None)
        return self.backlog.popleft()

    def _drain(self) -> None:
        """Read what the peer sent before it closed: its GOODBYE says why."""
        self.sock.settimeout(0)
        try:
            while self._receive() is None and self.closed_reason is None:
                pass
        except (IpadError, OSError):
            pass

    def _receive(self) -> p.Frame | None:
        """The next packet: a reply is returned; an event is queued and a goodbye noted (None)."""
        try:
            received = recv_packet(self.sock)
            if received is not None:
                frame = p.decode(*received, allowed=self.allowed)
        except p.ProtocolError as exc:
            self.closed_reason = f"{self.what} broke the protocol: {exc.reason}"
            raise self._gone() from None
        except TimeoutError:
            raise
        except OSError as exc:
            if exc.errno == errno.ECONNRESET and self.what == "daemon":
                # The daemon closed with our packets unread: the kernel reports that first,
                # then what the daemon sent before (a GOODBYE with its reason), then the end.
                return self._receive()
            self.closed_reason = f"{self.what} is gone: {exc.strerror}"
            gone = self._gone()
            if exc.errno == errno.ECONNRESET and isinstance(gone, WorkerCrashed):
                # The worker died with packets unread: it processes them in order, so
                # the newest request, the one this blocking connection waits for, never ran.
                raise CallNotSent(gone.message) from None
            raise gone from None
        if received is None:
            self.closed_reason = self.closed_reason or f"{self.what} closed the connection"
            raise self._gone()
        message = frame.message
        if isinstance(message, p.Event | p.ModuleEvent):
            self.backlog.append(message)
            return None
        if isinstance(message, p.Goodbye):
            self.closed_reason = message.reason
            return None
        return frame

    def _gone(self) -> IpadError:
        if self.what == "daemon":
            return Disconnected(self.closed_reason or "disconnected")
        return WorkerCrashed(self.closed_reason or "worker is gone")


class BlockingProxy:
    """A handle on one module instance.

    Without an event loop it cannot recover in the background: a call on a
    proxy whose worker died fails with WorkerCrashed, or, given ``wait``,
    first brings the proxy back itself (new channel, setup calls replayed)
    within that many seconds.
    """

    def __init__(
        self,
        client: BlockingClient,
        info: ProxyInfo,
        channel: socket.socket,
        pipeline: str | None = None,
        pipeline_version: int | None = None,
    ) -> None:
        self.client = client
        #: What the proxy was requested for, to request it again from a restarted daemon.
        self.pipeline = pipeline
        self.pipeline_version = pipeline_version
        self.info = info
        self.proxy_id = info.proxy_id
        self.module = info.module
        self.setup_log = SetupLog(info)
        self.recoveries = 0
        self._conn = _Connection(channel, p.FROM_WORKER_CHANNEL, f"{info.module} worker")

    @property
    def valid(self) -> bool:
        """False once the channel to the worker is known to be gone."""
        return self._conn.closed_reason is None

    def call(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        fds: Mapping[str, int] | None = None,
        timeout: float | None = None,
        *,
        wait: float | None = None,
    ) -> Any:
        """Call ``method``; a dead worker fails the call with WorkerCrashed unless ``wait``.

        With ``wait``, a call that could not even be sent (the worker was gone
        already) is sent again once the proxy is back, within those seconds.
        """
        deadline = None if wait is None else time.monotonic() + wait
        message, fd_list = build_call(method, args, fds)
        while True:
            if not self.valid and deadline is not None:
                self.recover(max(deadline - time.monotonic(), 0.001))
            try:
                frame = self._conn.request(message, fd_list, timeout)
            except CallNotSent:
                if deadline is None or time.monotonic() >= deadline:
                    raise
                continue
            value = expect(frame, p.Result).value
            self.setup_log.record(method, args, fds)
            return value

    def recover(self, timeout: float) -> None:
        """Reopen on the restarted worker and replay the setup calls, within ``timeout`` seconds.

        If the daemon itself went away and the client was made with
        ``reconnect``, connect again and request the module anew instead.
        """
        deadline = time.monotonic() + timeout
        while True:
            conn: _Connection | None = None
            try:
                frame = self._regrant(timeout)
                granted = expect(frame, p.ProxyGranted)
                channel = socket.socket(fileno=frame.fds[0])
                conn = _Connection(channel, p.FROM_WORKER_CHANNEL, f"{self.module} worker")
                for call in self.setup_log.calls:
                    replay, fd_list = build_call(call.method, call.args, dict(call.fds))
                    expect(conn.request(replay, fd_list, timeout), p.Result)
                break
            except (ModuleUnavailable, WorkerCrashed, Disconnected) as exc:
                if conn is not None:
                    conn.sock.close()
                if isinstance(exc, Disconnected) and not self.client.reconnect:
                    raise
                if time.monotonic() >= deadline:
                    why = f"{self.module} did not recover within {timeout:g}s: {exc}"
                    raise WorkerCrashed(why) from None
                time.sleep(RECOVERY_POLL)  # no event loop here: look again shortly
            except BaseException:
                if conn is not None:
                    conn.sock.close()
                raise
        self._conn.sock.close()
        self._conn, self.info = conn, ProxyInfo.from_granted(granted)
        if granted.proxy_id != self.proxy_id:  # requested anew from a restarted daemon
            self.client.proxies.pop(self.proxy_id, None)
            self.proxy_id = granted.proxy_id
            self.client.proxies[self.proxy_id] = self
        ready = p.ProxyReady(self.proxy_id, len(self.setup_log.calls))
        self.client.request(ready, p.ProxyStateReply)
        self.recoveries += 1

    def _regrant(self, timeout: float) -> p.Frame:
        """A new channel: REOPEN_PROXY on the daemon we know, else REQUEST_PROXY on a new one."""
        client = self.client
        try:
            return client._conn.request(p.ReopenProxy(self.proxy_id), timeout=timeout)
        except Disconnected:
            if not client.reconnect:
                raise
        client.reconnect_now()
        again = p.RequestProxy(self.module, self.pipeline, self.pipeline_version)
        return client._conn.request(again, timeout=timeout)

    def next_event(self, timeout: float | None = None) -> p.ModuleEvent | None:
        """The next event the module instance sent, or None after ``timeout`` seconds."""
        event = self._conn.next_event(timeout)
        assert event is None or isinstance(event, p.ModuleEvent)  # noqa: S101 - channel sends only these
        return event

    def release(self) -> None:
        """Give the instance back (a proxy the daemon already closed is simply forgotten)."""
        self.client.proxies.pop(self.proxy_id, None)
        try:
            self.client.request(p.ReleaseProxy(self.proxy_id), p.Released)
        except UnknownProxy:
            pass  # its channel broke or its instance was closed: it is gone already
        finally:
            self._conn.sock.close()
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
        #: Whether a lost daemon connection is made again (on the next request or ``wait``).
        self.reconnect = reconnect
        self.proxies: dict[int, BlockingProxy] = {}
        self._conn, self.welcome = self._connect()

    def _connect(self) -> tuple[_Connection, p.Welcome]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                sock.connect(self.path)
            except OSError as exc:  # connect(2) names no file: say which socket it was
                raise type(exc)(exc.errno, exc.strerror, self.path) from None
            conn = _Connection(sock, p.FROM_DAEMON, "daemon")
            welcome = expect(conn.request(p.Hello(CLIENT_VERSIONS, self.name)), p.Welcome)
            if self.subscribed:
                expect(conn.request(p.Subscribe(None)), p.Subscribed)
        except BaseException:
            sock.close()
            raise
        return conn, welcome

    def reconnect_now(self) -> None:
        """Connect to the daemon again; Disconnected if it is not there (yet)."""
        try:
            conn, welcome = self._connect()
        except OSError as exc:
            raise Disconnected(f"cannot reach the daemon at {self.path}: {exc.strerror}") from None
        self._conn.sock.close()
        self._conn, self.welcome = conn, welcome

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, message: p.Message, reply: type[M], timeout: float | None = None) -> M:
        """Send a request to the daemon; return its reply of type ``reply``.

        With ``reconnect``, a connection found lost is made again once and the
        request sent on the new one (the daemon that lost it kept no state).
        """
        return expect(self._frame(message, timeout), reply)

    def _frame(self, message: p.Message, timeout: float | None = None) -> p.Frame:
        try:
            return self._conn.request(message, timeout=timeout)
        except Disconnected:
            if not self.reconnect:
                raise
            self.reconnect_now()
            return self._conn.request(message, timeout=timeout)

    def subscribe(self, since: int | None = None) -> p.Subscribed:
        """Receive events from now on, after the kept ones later than ``since`` if given."""
        return self.request(p.Subscribe(since), p.Subscribed)

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
        """An operator's command: ``restart`` (a module), ``reload`` or ``stop``."""
        reply: p.AdminDone = self.request(p.Admin(command, module), p.AdminDone, timeout)
        return reply.result

    def modules(self) -> dict[str, dict[str, Any]]:
        """Every discovered module and its manifest."""
        reply: p.Modules = self.request(p.ListModules(), p.Modules)
        return reply.modules

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
        for proxy in list(self.proxies.values()):
            proxy._conn.sock.close()
        self.proxies.clear()
        self._conn.sock.close()
