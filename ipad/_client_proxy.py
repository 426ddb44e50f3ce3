"""A proxy as the trio client holds it: a channel straight to one module instance."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from . import _protocol as p
from ._client_common import ProxyInfo, SetupLog, build_call, expect
from ._client_events import EventQueue
from ._errors import CallNotSent, Disconnected, IpadError, UnknownProxy, WorkerCrashed
from ._transport import PacketSocket, Pending, Requests

if TYPE_CHECKING:
    from ._client import Client


class Proxy:
    """A handle on one module instance, valid while its worker lives.

    When the worker dies, calls in flight fail at once with WorkerCrashed and
    the proxy turns invalid. Once the module runs again, the proxy gets a new
    channel by itself, replays its setup calls in order and turns valid again
    (a ``recovered`` event): code that called ``init``/``configure``/``start``
    before the crash needs no change to carry on.
    """

    def __init__(
        self,
        client: Client,
        info: ProxyInfo,
        channel: PacketSocket,
        pipeline: str | None = None,
        pipeline_version: int | None = None,
    ) -> None:
        self.client = client
        #: What the proxy was requested for, to request it again after a reconnection.
        self.pipeline = pipeline
        self.pipeline_version = pipeline_version
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

    def _lost(self, reason: str, *, recover: bool = True) -> None:
        """The current channel is gone: invalid until recovered (one recovery at a time).

        ``recover=False`` when the daemon connection is what was lost: the
        reconnection brings the proxy back instead.
        """
        if self._closed:
            return
        if self.valid:
            self.state = "invalid"
            self.reason = reason
            self._valid = trio.Event()
        if recover and not self._recovering:
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
        client, conn = self.client, self.client.conn
        if conn is None:
            return
        try:
            sent = await client.requests.send(conn, p.ProxyReady(self.proxy_id, replayed))
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
        self.client.reattaching.discard(self)
        try:
            await self.client.request(p.ReleaseProxy(self.proxy_id), p.Released)
        except (UnknownProxy, Disconnected):
            pass  # its channel broke, its instance was closed, or its daemon is gone: it is gone
        finally:
            self.channel.close()
            self.setup_log.close()
            self._valid.set()  # wake waiters: they see the proxy closed
