"""The trio client: connect to the daemon, request proxies, call modules directly.

Calls do not pass through the daemon: each proxy owns a channel straight to
its module instance in the worker. The daemon connection carries requests,
status and validity events. Everything runs inside the nursery that
``open_client`` opens, so nothing outlives the ``async with`` block.
"""

from __future__ import annotations

import collections
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

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
from ._paths import socket_path
from ._transport import PacketSocket, Pending, Requests

#: Events kept for a reader that is behind; older ones are dropped first.
EVENT_BACKLOG = 1024

#: A recovering proxy tries again this often even without news of its module (missed events).
RECOVERY_RETRY = 1.0

#: Module states in which the daemon can answer REOPEN_PROXY: it runs, it is about to
#: (the daemon answers once it does), or it is in cooldown and a fallback may serve it.
REOPENABLE = frozenset({"running", "starting", "exited", "cooldown"})


class EventQueue:
    """A bounded queue that never blocks its writer: when full, the oldest entry goes."""

    def __init__(self, size: int = EVENT_BACKLOG) -> None:
        self._items: collections.deque[Any] = collections.deque(maxlen=size)
        self._ready = trio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, item: object) -> None:
        """Add an item, dropping the oldest if the queue is full."""
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        """No more items will come; readers finish once the queue is drained."""
        self._closed = True
        self._ready.set()

    async def get(self) -> Any:
        """The next item; raise trio.EndOfChannel once closed and drained."""
        while not self._items:
            if self._closed:
                raise trio.EndOfChannel
            self._ready = trio.Event()
            await self._ready.wait()
        return self._items.popleft()

    def __aiter__(self) -> EventQueue:
        # An iterator object, not an async generator: breaking out of ``async for``
        # then leaves no generator to be finalised behind trio's back.
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.get()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


@attrs.frozen
class LocalEvent:
    """An event the client library makes itself: ``recovered`` or ``recovery_failed``."""

    kind: str
    module: str
    proxy_id: int
    details: dict[str, Any] = attrs.field(factory=dict)
    #: As on daemon events, so one loop can read both.
    state: str | None = None
    reason: str | None = None


class Proxy:
    """A handle on one module instance, valid while its worker lives.

    When the worker dies, calls in flight fail at once with WorkerCrashed and
    the proxy turns invalid. Once the module runs again, the proxy gets a new
    channel by itself, replays its setup calls in order and turns valid again
    (a ``recovered`` event): code that called ``init``/``configure``/``start``
    before the crash needs no change to carry on.
    """

    def __init__(self, client: Client, info: ProxyInfo, channel: PacketSocket) -> None:
        self.client = client
        self.info = info
        self.proxy_id = info.proxy_id
        self.module = info.module
        self.channel = channel
        self.requests = Requests(f"proxy:{info.proxy_id}")
        self.state = "valid"
        self.reason: str | None = None
        self.module_events = EventQueue()
        self.setup_log = SetupLog(info)
        self.recoveries = 0
        self._closed = False
        self._gone: str | None = None
        self._recovering = False
        self._valid = trio.Event()
        self._valid.set()

    @property
    def valid(self) -> bool:
        """True while the worker is alive and the instance is initialised."""
        return self.state == "valid"

    async def call(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        fds: Mapping[str, int] | None = None,
        *,
        wait: float | None = None,
    ) -> Any:
        """Call ``method``; ``fds`` maps Buffer parameters to descriptors.

        On an invalid proxy the call fails at once with WorkerCrashed, or, with
        ``wait``, first waits up to that many seconds for the proxy to recover.
        A crash of the worker during the call fails it at once with WorkerCrashed.
        """
        deadline = None if wait is None else trio.current_time() + wait
        while True:
            await self._wait_valid(wait, deadline)
            channel, requests = self.channel, self.requests
            try:
                sent = await self._send_call(channel, requests, method, args, fds)
            except CallNotSent:
                if deadline is None:
                    raise
                if channel is self.channel:
                    self._lost("worker closed the channel")  # known before its reader saw it
                continue  # nothing ran: send it again once recovered, within the deadline
            value = expect(await requests.reply(*sent), p.Result).value
            self.setup_log.record(method, args, fds)
            return value

    async def _wait_valid(self, wait: float | None, deadline: float | None) -> None:
        """Return once valid; fail at once without ``wait``, or once ``deadline`` passes."""
        if self.valid:
            return
        if deadline is None or self._closed:
            raise WorkerCrashed(f"{self.module} proxy is {self.state}: {self.reason}")
        with trio.move_on_at(deadline):
            await self._valid.wait()
        if self._gone is not None:
            raise Disconnected(self._gone)
        if not self.valid:
            raise WorkerCrashed(f"{self.module} did not recover within {wait:g}s: {self.reason}")

    async def _send_call(
        self,
        channel: PacketSocket,
        requests: Requests,
        method: str,
        args: Mapping[str, Any] | None,
        fds: Mapping[str, int] | None,
    ) -> Pending:
        """Send a CALL without waiting; a closed channel is the worker gone (CallNotSent)."""
        message, fd_list = build_call(method, args, fds)
        try:
            return await requests.send(channel, message, fd_list)
        except (OSError, trio.ClosedResourceError, WorkerCrashed) as exc:
            raise CallNotSent(f"{self.module} channel is closed: {exc}") from None

    async def read_channel(self, channel: PacketSocket, requests: Requests) -> None:
        """Deliver replies and module events until the worker closes the channel."""
        reason = "worker closed the channel"
        try:
            while True:
                try:
                    frame = await channel.receive()
                except p.ProtocolError as exc:
                    reason = f"worker broke the protocol: {exc.reason}"
                    break
                except (OSError, trio.ClosedResourceError):
                    break
                if frame is None:
                    break
                if isinstance(frame.message, p.ModuleEvent):
                    self.module_events.put(frame.message)
                else:
                    requests.deliver(frame)
        finally:
            requests.fail_all(lambda: WorkerCrashed(f"{self.module}: {reason}"))
            if channel is self.channel:
                self._lost(reason)

    def _lost(self, reason: str) -> None:
        """The current channel is gone: invalid until recovered (one recovery at a time)."""
        if self._closed:
            return
        if self.valid:
            self.state = "invalid"
            self.reason = reason
            self._valid = trio.Event()
        if not self._recovering:
            self._recovering = True
            self.client.nursery.start_soon(self.client.recover, self)

    def _on_event(self, event: p.Event) -> None:
        # An event from before the current channel was granted is about an older one.
        if event.state is None or event.seq <= self.info.seq:
            return
        if event.state == "invalid" and self.valid:
            self.state = "invalid"
            self._valid = trio.Event()
        if event.state != "valid":  # "valid" is set by recovery, once the replay is done
            self.state = event.state
            self.reason = event.reason

    def _disconnected(self, reason: str) -> None:
        """The daemon connection is gone: no recovery will come, so wake callers waiting for one."""
        self._gone = reason
        self._valid.set()

    async def _recovered(self, channel: PacketSocket, requests: Requests, info: ProxyInfo) -> int:
        """Replay the setup calls on a new channel and switch to it; return how many.

        The proxy is valid once the replay is done: the daemon is told
        (PROXY_READY) without waiting for its answer, which changes nothing here.
        """
        self.client.nursery.start_soon(self.read_channel, channel, requests)
        # Pipelined: the worker runs calls in arrival order, so sending every setup call
        # before collecting the replies keeps the order and saves a round trip each.
        sent = [
            await self._send_call(channel, requests, call.method, call.args, dict(call.fds))
            for call in list(self.setup_log.calls)
        ]
        for request_id, slot in sent:
            expect(await requests.reply(request_id, slot), p.Result)
        old = self.channel
        self.channel, self.requests, self.info = channel, requests, info
        old.close()
        replayed = len(self.setup_log.calls)
        await self._tell_ready(replayed)
        self.state = "valid"
        self.reason = "fallback" if info.served_by else "recovered"
        self.recoveries += 1
        self._valid.set()
        return replayed

    async def _tell_ready(self, replayed: int) -> None:
        """Send PROXY_READY: the daemon marks the proxy valid and tells everyone.

        Its answer changes nothing here, so it is collected in the background.
        """
        client = self.client
        try:
            sent = await client.requests.send(client.conn, p.ProxyReady(self.proxy_id, replayed))
        except (OSError, trio.ClosedResourceError, IpadError):
            return  # the daemon is gone; the proxy's channel still works
        client.nursery.start_soon(self._ready_answered, sent)

    async def _ready_answered(self, sent: Pending) -> None:
        with contextlib.suppress(IpadError):  # closed meanwhile: its own event says so
            expect(await self.client.requests.reply(*sent), p.ProxyStateReply)

    async def release(self) -> None:
        """Give the instance back; the proxy cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        self.state = "closed"
        self.client.proxies.pop(self.proxy_id, None)
        try:
            await self.client.request(p.ReleaseProxy(self.proxy_id), p.Released)
        except UnknownProxy:
            pass  # its channel broke or its instance was closed: it is gone already
        finally:
            self.channel.close()
            self.setup_log.close()
            self._valid.set()  # wake waiters: they see the proxy closed


class Client:
    """A connection to the daemon."""

    def __init__(self, conn: PacketSocket, nursery: trio.Nursery) -> None:
        self.conn = conn
        self.nursery = nursery
        self.requests = Requests("daemon")
        self.proxies: dict[int, Proxy] = {}
        self.events = EventQueue()
        self.welcome: p.Welcome | None = None
        self.goodbye: str | None = None
        #: The last state each module was announced in, and a wake-up for changes.
        self.module_states: dict[str, str] = {}
        self._module_changed = trio.Event()

    async def request(self, message: p.Message, reply: type[M]) -> M:
        """Send a request to the daemon and return its reply of type ``reply``."""
        try:
            frame = await self.requests.call(self.conn, message)
        except (OSError, trio.ClosedResourceError) as exc:
            raise Disconnected(self.goodbye or f"connection to the daemon lost: {exc}") from None
        return expect(frame, reply)

    async def hello(self, name: str) -> p.Welcome:
        """Negotiate the protocol version."""
        self.welcome = await self.request(p.Hello(CLIENT_VERSIONS, name), p.Welcome)
        return self.welcome

    async def subscribe(self, since: int | None = None) -> p.Subscribed:
        """Receive events from now on, after the kept ones later than ``since`` if given."""
        return await self.request(p.Subscribe(since), p.Subscribed)

    async def status(self) -> p.StatusReply:
        """The daemon's and every module's state."""
        reply: p.StatusReply = await self.request(p.Status(), p.StatusReply)
        return reply

    async def admin(self, command: str, module: str | None = None) -> Any:
        """An operator's command: ``restart`` (a module), ``reload`` or ``stop``."""
        reply = await self.request(p.Admin(command, module), p.AdminDone)
        return reply.result

    async def modules(self) -> dict[str, dict[str, Any]]:
        """Every discovered module and its manifest."""
        reply: p.Modules = await self.request(p.ListModules(), p.Modules)
        return reply.modules

    async def request_proxy(
        self, module: str, pipeline: str | None = None, pipeline_version: int | None = None
    ) -> Proxy:
        """A proxy to a new instance of ``module``."""
        try:
            frame = await self.requests.call(
                self.conn, p.RequestProxy(module, pipeline, pipeline_version)
            )
        except (OSError, trio.ClosedResourceError) as exc:
            raise Disconnected(self.goodbye or f"connection to the daemon lost: {exc}") from None
        granted: p.ProxyGranted = expect(frame, p.ProxyGranted)
        if len(frame.fds) != 1:
            frame.close_fds()
            raise IpadError("PROXY_GRANTED came without its channel")
        channel = PacketSocket(socket.socket(fileno=frame.fds[0]), p.FROM_WORKER_CHANNEL)
        proxy = Proxy(self, ProxyInfo.from_granted(granted), channel)
        self.proxies[proxy.proxy_id] = proxy
        self.nursery.start_soon(proxy.read_channel, channel, proxy.requests)
        return proxy

    async def recover(self, proxy: Proxy) -> None:
        """Bring an invalid proxy back once its module runs again (one task per loss)."""
        try:
            await self._recover(proxy)
        finally:
            proxy._recovering = False

    async def _recover(self, proxy: Proxy) -> None:
        while not proxy.valid and proxy.proxy_id in self.proxies and self.goodbye is None:
            changed = self._module_changed  # taken first: a change from now on wakes us
            if self.module_states.get(proxy.module, "running") not in REOPENABLE:
                await self._wait_change(changed)
                continue
            try:
                frame = await self.requests.call(self.conn, p.ReopenProxy(proxy.proxy_id))
                granted = expect(frame, p.ProxyGranted)
            except ModuleUnavailable:
                await self._wait_change(changed)  # down again: wait for the next start
                continue
            except (OSError, trio.ClosedResourceError, IpadError):
                return  # the daemon is gone or the proxy with it
            channel = PacketSocket(socket.socket(fileno=frame.fds[0]), p.FROM_WORKER_CHANNEL)
            info = ProxyInfo.from_granted(granted)
            requests = Requests(f"proxy:{proxy.proxy_id}")
            try:
                replayed = await proxy._recovered(channel, requests, info)
            except WorkerCrashed:
                channel.close()
                continue  # crashed again during the replay: wait for the next start
            except IpadError as exc:
                channel.close()
                proxy.reason = f"replay failed: {exc.message}"
                failed: dict[str, Any] = {"error": exc.message}
                self.events.put(LocalEvent("recovery_failed", proxy.module, proxy.proxy_id, failed))
                await self._wait_change(changed)
                continue
            done: dict[str, Any] = {"replayed": replayed, "worker_pid": granted.worker_pid}
            kind = "fallback" if granted.served_by else "recovered"
            if granted.served_by:
                done["served_by"] = granted.served_by
            event = LocalEvent(kind, proxy.module, proxy.proxy_id, done, state="valid", reason=kind)
            self.events.put(event)

    async def _wait_change(self, changed: trio.Event) -> None:
        """Wait for a module event after ``changed`` was taken; retry now and then regardless."""
        with trio.move_on_after(RECOVERY_RETRY):
            await changed.wait()

    async def read_daemon(self) -> None:
        """Deliver replies and events until the daemon closes the connection."""
        try:
            while True:
                try:
                    frame = await self.conn.receive()
                except p.ProtocolError as exc:
                    self.goodbye = f"daemon broke the protocol: {exc.reason}"
                    break
                except (OSError, trio.ClosedResourceError):
                    break
                if frame is None:
                    break
                message = frame.message
                if isinstance(message, p.Event):
                    self._on_event(message)
                elif isinstance(message, p.Goodbye):
                    self.goodbye = message.reason
                else:
                    self.requests.deliver(frame)
        finally:
            reason = self.goodbye or "the daemon closed the connection"
            self.requests.fail_all(lambda: Disconnected(reason))
            self.events.close()
            for proxy in self.proxies.values():
                proxy._disconnected(reason)

    def _on_event(self, event: p.Event) -> None:
        if event.kind == "module" and event.state is not None:
            self.module_states[event.module] = event.state
            changed, self._module_changed = self._module_changed, trio.Event()
            changed.set()
        if event.proxy_id is not None and event.proxy_id in self.proxies:
            self.proxies[event.proxy_id]._on_event(event)
        self.events.put(event)

    def close(self) -> None:
        """Close the daemon connection and every proxy channel."""
        for proxy in self.proxies.values():
            proxy.channel.close()
            proxy.setup_log.close()
        self.conn.close()


@asynccontextmanager
async def open_client(
    path: str | Path | None = None, *, name: str = "", subscribe: bool = True
) -> AsyncIterator[Client]:
    """Connect to the daemon ($IPAD_SOCKET or the default path unless ``path`` is given)."""
    target = str(path) if path is not None else str(socket_path(None))
    conn = PacketSocket(
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC), p.FROM_DAEMON
    )
    try:
        await conn.sock.connect(target)
    except BaseException:
        conn.close()
        raise
    async with trio.open_nursery() as nursery:
        client = Client(conn, nursery)
        nursery.start_soon(client.read_daemon)
        try:
            await client.hello(name)
            if subscribe:
                await client.subscribe()
            yield client
        finally:
            client.close()
            nursery.cancel_scope.cancel()
