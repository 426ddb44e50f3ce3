"""The trio client: connect to the daemon, request proxies, call modules directly.

Calls do not pass through the daemon: each proxy owns a channel straight to
its module instance in the worker. The daemon connection carries requests,
status and validity events. Everything runs inside the nursery that
``open_client`` opens, so nothing outlives the ``async with`` block.

With ``reconnect=True`` a lost daemon connection (the daemon restarted,
crashed or was upgraded) is made again with backoff; each proxy is then
requested anew and its setup calls replayed, under the same Proxy object.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn

import trio

from ipad.client._backlog import RAW_EVENTS
from ipad.client._core import (
    CLIENT_VERSIONS,
    RECONNECT_INITIAL,
    RECONNECT_JITTER,
    RECONNECT_MAX,
    Backoff,
    M,
    ProxyInfo,
    check_admin,
    check_describe,
    expect,
    not_sent,
)
from ipad.client._core_proxy import ProxyState
from ipad.client._core_requests import Match
from ipad.client._events import EVENT_BACKLOG, EVENT_BACKLOG_BYTES, EventQueue, LocalEvent
from ipad.client._trio_proxy import Proxy
from ipad.client._trio_requests import TrioRequests
from ipad.config.paths import client_socket_path
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    Disconnected,
    IpadError,
    ModuleUnavailable,
    WorkerCrashed,
)
from ipad.transport.seqpacket import PacketSocket, report_suppressed_drops

__all__ = [
    "EVENT_BACKLOG",
    "EVENT_BACKLOG_BYTES",
    "RECONNECT_INITIAL",
    "RECONNECT_JITTER",
    "RECONNECT_MAX",
    "RECOVERY_RETRY",
    "Client",
    "EventQueue",
    "LocalEvent",
    "Proxy",
    "open_client",
]

#: A recovering proxy tries again this often even without news of its module (missed events).
RECOVERY_RETRY = 1.0

#: A Unix socket's connect() fails with EAGAIN while the daemon's listen backlog is full (it
#: is busy, or starting): tried again after this, doubling up to CONNECT_RETRY_MAX.
CONNECT_RETRY = 0.002
CONNECT_RETRY_MAX = 0.1


class Client:
    """A connection to the daemon, made again after a loss when ``reconnect`` is set."""

    def __init__(
        self,
        path: str,
        nursery: trio.Nursery,
        *,
        name: str = "",
        subscribe: bool = True,
        reconnect: bool = False,
    ) -> None:
        self.path = path
        self.name = name
        self.subscribed = subscribe
        self.reconnect = reconnect
        self.nursery = nursery
        self.conn: PacketSocket | None = None
        self.requests = TrioRequests("daemon")
        self.requests.fail_all(lambda: Disconnected("not connected yet"))
        self.proxies: dict[int, Proxy] = {}
        #: Proxies of a lost connection, each back in ``proxies`` under its new id once regained.
        self.reattaching: set[Proxy] = set()
        self.events = EventQueue()
        self.welcome: p.Welcome | None = None
        self.goodbye: str | None = None
        #: How many connections have been made; a task started on one stops on the next.
        self.generation = 0
        #: The last event about each module's state.
        self.module_states: dict[str, p.Event] = {}
        #: The one schedule of reconnection attempts, and whether its loop runs.
        self.backoff = Backoff()
        self._reconnecting = False
        self._closing = False

    async def connect(self) -> None:
        """Connect, say HELLO and subscribe: the first time, or again after a loss.

        The connection counts as made, and its loss as a loss, only once the
        daemon welcomed it: one refused (a GOODBYE at a connection limit) is an
        attempt that failed, for the one loop that retries to pace.
        """
        conn = PacketSocket(
            socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC),
            p.FROM_DAEMON,
        )
        try:
            await connect_unix(conn, self.path)
        except BaseException:
            conn.close()
            raise
        requests = TrioRequests("daemon")
        self.module_states.clear()
        self.nursery.start_soon(self.read_daemon, conn, requests)
        try:
            hello = p.Hello(CLIENT_VERSIONS, self.name, p.PROTOCOL_MINOR)
            welcome = expect(await self._call_on(conn, requests, hello), p.Welcome)
            if self.subscribed:
                expect(await self._call_on(conn, requests, p.Subscribe(None)), p.Subscribed)
        except BaseException:
            conn.close()
            raise
        self.conn, self.requests, self.goodbye, self.welcome = conn, requests, None, welcome
        self.generation += 1
        self.backoff.up(trio.current_time())

    async def request(self, message: p.Message, reply: type[M]) -> M:
        """Send a request to the daemon and return its reply of type ``reply``."""
        return expect(await self._call(message), reply)

    async def _call(self, message: p.Message) -> p.Frame:
        conn = self.conn
        if conn is None:
            raise Disconnected(self.goodbye or "not connected to the daemon")
        return await self._call_on(conn, self.requests, message)

    async def _call_on(
        self, conn: PacketSocket, requests: TrioRequests, message: p.Message
    ) -> p.Frame:
        try:
            return await requests.call(conn, message)
        except (OSError, trio.ClosedResourceError) as exc:
            raise Disconnected(self.goodbye or f"connection to the daemon lost: {exc}") from None

    async def hello(self, name: str) -> p.Welcome:
        """Negotiate the protocol version."""
        self.welcome = await self.request(
            p.Hello(CLIENT_VERSIONS, name, p.PROTOCOL_MINOR), p.Welcome
        )
        return self.welcome

    async def subscribe(self, since: int | None = None) -> p.Subscribed:
        """Receive events from now on, after the kept ones later than ``since`` if given."""
        return await self.request(p.Subscribe(since), p.Subscribed)

    async def status(self) -> p.StatusReply:
        """The daemon's and every module's state."""
        reply: p.StatusReply = await self.request(p.Status(), p.StatusReply)
        return reply

    async def admin(self, command: str, module: str | None = None) -> Any:
        """An operator's command: ``restart`` (a module), ``reload``, ``stop``, ``start``...

        UnsupportedVersion, nothing sent, for ``stop``/``start`` of a module to a
        daemon before minor 3 (it would stop itself).
        """
        check_admin(self.welcome, command, module)
        reply = await self.request(p.Admin(command, module), p.AdminDone)
        return reply.result

    async def modules(self) -> dict[str, dict[str, Any]]:
        """Every discovered module and its manifest."""
        reply: p.Modules = await self.request(p.ListModules(), p.Modules)
        return reply.modules

    async def describe(self, module: str) -> p.Description:
        """``module``'s methods: parameters, result types, docs (as its last worker said them)."""
        check_describe(self.welcome)
        reply: p.Description = await self.request(p.Describe(module), p.Description)
        return reply

    async def request_proxy(
        self, module: str, pipeline: str | None = None, pipeline_version: int | None = None
    ) -> Proxy:
        """A proxy to a new instance of ``module``."""
        conn = self.conn
        granted, channel = await self._grant(p.RequestProxy(module, pipeline, pipeline_version))
        proxy = Proxy(self, ProxyInfo.from_granted(granted), channel, pipeline, pipeline_version)
        proxy.granted_on = conn
        proxy.start_reader(channel, proxy.requests)
        self.proxies[proxy.proxy_id] = proxy
        return proxy

    async def _grant(self, message: p.Message) -> tuple[p.ProxyGranted, PacketSocket]:
        """Send REQUEST_PROXY or REOPEN_PROXY; the grant and its channel."""
        frame = await self._call(message)
        granted: p.ProxyGranted = expect(frame, p.ProxyGranted)
        if len(frame.fds) != 1:
            frame.close_fds()
            raise IpadError("PROXY_GRANTED came without its channel")
        channel = PacketSocket(
            socket.socket(fileno=frame.fds[0]), p.FROM_WORKER_CHANNEL, decoders=RAW_EVENTS
        )
        return granted, channel

    # --- recovery after a worker's crash ----------------------------------------

    def poke(self, proxy: Proxy) -> None:
        """An invalid proxy: start its recovery, or ask the one under way to try now.

        A proxy of a lost connection is the reconnection's to bring back.
        """
        if proxy.valid or proxy.unusable() is not None or proxy in self.reattaching:
            return
        if proxy._recovering:
            proxy._poke.set()
        else:
            proxy._recovering = True
            self.nursery.start_soon(self.recover, proxy)

    async def recover(self, proxy: Proxy) -> None:
        """Bring an invalid proxy back once its module runs again (one task per loss)."""
        try:
            await self._recover(proxy, self.generation)
        finally:
            proxy._recovering = False

    async def _recover(self, proxy: Proxy, generation: int) -> None:
        while self._recovering_on(proxy, generation):
            proxy._poke = trio.Event()  # from now on, news of its module or a caller wakes us
            news = self.module_states.get(proxy.module)
            if proxy.not_reopenable(news) is not None:
                proxy._signal()
                await self._wait_news(proxy)
                continue
            try:
                granted, channel = await self._grant(proxy.reopen_message(same_connection=True))
            except Disconnected:
                return  # the daemon is gone: a reconnection takes over, or nothing will
            except IpadError as exc:  # closed by the daemon (for good), unavailable, denied
                proxy._failed(proxy.refused(exc, trio.current_time(), news))
                if proxy.closed:
                    return
                await self._wait_news(proxy)
                continue
            adopted = await self._adopt(proxy, granted, channel, reconnected=False)
            if not adopted and not proxy.closed:
                await self._wait_news(proxy)

    def _recovering_on(self, proxy: Proxy, generation: int) -> bool:
        alive = self.goodbye is None and generation == self.generation
        return alive and not proxy.valid and self.proxies.get(proxy.proxy_id) is proxy

    async def _adopt(
        self, proxy: Proxy, granted: p.ProxyGranted, channel: PacketSocket, *, reconnected: bool
    ) -> bool:
        """Replay a proxy's setup on a granted channel and switch to it; False if that failed."""
        requests = TrioRequests(f"proxy:{proxy.proxy_id}")
        try:
            replayed = await proxy._recovered(channel, requests, granted)
        except IpadError as exc:
            channel.close()
            proxy._failed(proxy.replay_failed(exc, trio.current_time()))
            if not isinstance(exc, WorkerCrashed):
                failed: dict[str, Any] = {"error": exc.message}
                self.events.put(LocalEvent("recovery_failed", proxy.module, proxy.proxy_id, failed))
            return False
        except BaseException:  # cancelled (the client closes): a channel not taken is closed
            if proxy.channel is not channel:
                channel.close()
            raise
        if replayed is None:  # closed while the grant was on its way: the channel is closed
            return False
        done: dict[str, Any] = {"replayed": replayed, "worker_pid": granted.worker_pid}
        kind = "fallback" if granted.served_by else "recovered"
        if granted.served_by:
            done["served_by"] = granted.served_by
        if reconnected:
            done["reconnected"] = True
        self.events.put(
            LocalEvent(kind, proxy.module, proxy.proxy_id, done, state="valid", reason=kind)
        )
        return True

    async def _wait_news(self, proxy: Proxy) -> None:
        """After a failed attempt: the backoff's delay, then news of the module or a caller.

        Without news it tries again after RECOVERY_RETRY regardless (events can be missed).
        """
        await trio.sleep(proxy.backoff.wait(trio.current_time()))
        with trio.move_on_after(RECOVERY_RETRY):
            await proxy._poke.wait()

    # --- the daemon connection ----------------------------------------------------

    async def read_daemon(self, conn: PacketSocket, requests: TrioRequests) -> None:
        """Deliver replies and events until the daemon closes the connection."""
        goodbye: str | None = None
        try:
            while True:
                try:
                    frame = await conn.receive()
                except p.ProtocolError as exc:
                    goodbye = f"daemon broke the protocol: {exc.reason}"
                    break
                except ConnectionResetError:
                    # The daemon closed with our packets unread: the kernel says so first,
                    # then delivers what it sent before (a GOODBYE's reason), then the end.
                    continue
                except (OSError, trio.ClosedResourceError):
                    break
                if frame is None:
                    break
                match, message = requests.take(frame), frame.message
                if match is Match.EVENT and isinstance(message, p.Event):
                    self._on_event(message)
                elif match is Match.GOODBYE and isinstance(message, p.Goodbye):
                    goodbye = message.reason
        except MemoryError:
            # Too big to decode or keep in the memory left: this connection ends, not the client.
            goodbye = "the client ran out of memory decoding what the daemon sent"
        finally:
            reason = goodbye or "the daemon closed the connection"
            requests.fail_all(lambda: Disconnected(reason))
            conn.close()
            if conn is self.conn:
                self.goodbye = goodbye
                if not self._closing:
                    self._connection_lost(reason)

    def _connection_lost(self, reason: str) -> None:
        self.goodbye = self.goodbye or reason
        if not self.reconnect:
            self.events.close()
            for proxy in self.proxies.values():
                proxy._disconnected(reason)
            return
        self.events.put(LocalEvent("disconnected", "", None, {"reason": reason}))
        # The next daemon numbers proxies afresh: they come back under new ids, by the reconnection.
        self.reattaching |= set(self.proxies.values())
        self.proxies = {}
        for proxy in self.reattaching:
            proxy._lost(f"daemon connection lost: {reason}", recover=False)
        self.backoff.down(trio.current_time())
        if not self._reconnecting:
            self._reconnecting = True
            self.nursery.start_soon(self._reconnect)

    async def _reconnect(self) -> None:
        """The one loop that connects again, on one backoff schedule whatever refuses it.

        Then it brings every proxy back under its old handle.
        """
        attempts = 0
        try:
            while True:
                await trio.sleep(self.backoff.wait(trio.current_time()))
                attempts += 1
                try:
                    await self.connect()
                except (OSError, IpadError) as exc:
                    self.backoff.failed(trio.current_time())
                    why = exc.message if isinstance(exc, IpadError) else str(exc)
                    lost = Disconnected(f"cannot reach the daemon at {self.path}: {why}")
                    for proxy in self.reattaching:
                        proxy._failed(not_sent(proxy.module, lost, proxy.reason))
                    continue
                break
        finally:
            self._reconnecting = False
        pid = self.welcome.pid if self.welcome else None
        self.events.put(
            LocalEvent("reconnected", "", None, {"attempts": attempts, "daemon_pid": pid})
        )
        for proxy in list(self.reattaching):
            self.nursery.start_soon(self._reattach, proxy, self.generation)

    async def _reattach(self, proxy: Proxy, generation: int) -> None:
        """After a reconnection: request the proxy's module anew and replay its setup."""
        while not proxy.closed and generation == self.generation:
            proxy._poke = trio.Event()
            conn = self.conn
            try:
                granted, channel = await self._grant(proxy.reopen_message(same_connection=False))
            except Disconnected:
                return  # lost again: the next reconnection takes over
            except IpadError as exc:  # unavailable for now, or gone from the configuration
                proxy._failed(not_sent(proxy.module, exc, proxy.reason))
                if not isinstance(exc, ModuleUnavailable):
                    failed: dict[str, Any] = {"error": exc.message, "reconnected": True}
                    proxy.reason = f"cannot get it again: {exc.message}"
                    self.events.put(
                        LocalEvent("recovery_failed", proxy.module, proxy.proxy_id, failed)
                    )
                    proxy.backoff.failed(trio.current_time())
                await self._wait_news(proxy)
                continue
            if proxy.phase is ProxyState.CLOSED:  # released while its request was on its way
                try:  # its grant is given back before the channel closes: freed as released
                    await self._give_back(conn, granted.proxy_id)
                finally:
                    channel.close()
                return
            self.reattaching.discard(proxy)
            proxy.reattached(granted.proxy_id)
            proxy.granted_on = conn
            self.proxies[proxy.proxy_id] = proxy
            if not await self._adopt(proxy, granted, channel, reconnected=True):
                # The new instance is held under the new id: recover it like any other.
                proxy._lost("replay failed after reconnecting")
            return

    async def _give_back(self, conn: PacketSocket | None, proxy_id: int) -> None:
        """Release a grant nobody wants, if the connection that granted it is still ours."""
        if conn is None or conn is not self.conn:
            return  # that daemon connection is gone, and the grant with it
        with contextlib.suppress(IpadError):  # gone meanwhile: nothing is held any more
            await self.request(p.ReleaseProxy(proxy_id), p.Released)

    def _on_event(self, event: p.Event) -> None:
        if event.kind == "module" and event.state is not None:
            self.module_states[event.module] = event
            for proxy in [*self.proxies.values(), *self.reattaching]:
                if proxy.module == event.module:
                    proxy._poke.set()  # news for a recovery that waits
        if event.proxy_id is not None and event.proxy_id in self.proxies:
            self.proxies[event.proxy_id]._on_event(event)
        self.events.put(event)

    def close(self) -> None:
        """Close the daemon connection and every proxy channel."""
        self._closing = True
        for proxy in [*self.proxies.values(), *self.reattaching]:
            proxy.channel.close()
            proxy.setup_log.close()
        if self.conn is not None:
            self.conn.close()
        report_suppressed_drops()


async def connect_unix(conn: PacketSocket, path: str) -> None:
    """Connect to a Unix socket, waiting while its listen backlog is full.

    Not trio's ``connect``: for a Unix socket, Linux answers a full backlog with
    EAGAIN (not EINPROGRESS, as for TCP), which means "try again", not "under
    way"; waiting for the socket to become writable would report it connected
    when it is not (the same bug as mio#1560 and CPython gh-117208).
    """
    delay = CONNECT_RETRY
    while True:
        try:
            conn.raw.connect(path)
        except BlockingIOError:
            await trio.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX)
        except OSError as exc:  # connect(2) names no file: say which socket it was
            raise type(exc)(exc.errno, exc.strerror, path) from None
        else:
            return


@asynccontextmanager
async def open_client(
    path: str | Path | None = None,
    *,
    name: str = "",
    subscribe: bool = True,
    reconnect: bool = False,
) -> AsyncIterator[Client]:
    """Connect to the daemon ($IPAD_SOCKET or the default path unless ``path`` is given).

    With ``reconnect``, a lost connection is made again with backoff and every
    proxy is brought back (``disconnected``, ``reconnected`` and ``recovered``
    events say so); without it, the loss ends ``client.events`` and every
    later request fails with Disconnected.
    """
    target = str(path) if path is not None else str(client_socket_path())
    raised: list[BaseException] = []  # by the caller's block, or by connecting
    try:
        async with trio.open_nursery() as nursery:
            client = Client(target, nursery, name=name, subscribe=subscribe, reconnect=reconnect)
            try:
                await client.connect()
                yield client
            except BaseException as exc:
                raised.append(exc)
                raise
            finally:
                client.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery is ours, not the caller's: what their block raised (or the connect)
        # comes out as itself, not in a group; our own tasks' errors stay grouped.
        if raised and group.exceptions == (raised[0],):
            _reraise(raised[0])
        raise


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` again exactly as it was: its context is not the group it came in."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
