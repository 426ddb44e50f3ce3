"""A proxy as the trio client holds it: a channel straight to one module instance."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from ipad.client._buffers import BufferArg, FdArg
from ipad.client._core import CHANNEL_REPLIES, Bounds, ProxyInfo, build_call, expect
from ipad.client._core_proxy import CAUSE_WAIT, ProxyCore, ProxyState
from ipad.client._core_requests import Match
from ipad.client._events import EventQueue
from ipad.client._trio_requests import Pending, TrioRequests
from ipad.protocol import wire as p
from ipad.protocol.errors import (
    CallNotSent,
    Disconnected,
    IpadError,
    UnknownProxy,
    WorkerCrashed,
)
from ipad.transport.seqpacket import PacketSocket

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ipad.client._trio import Client


class Proxy(ProxyCore):
    """A handle on one module instance, valid while its worker lives.

    When the worker dies, calls in flight fail at once with WorkerCrashed and
    the proxy turns invalid. Once the module runs again, the proxy gets a new
    channel by itself, replays its setup calls in order and turns valid again
    (a ``recovered`` event): code that called ``init``/``configure``/``start``
    before the crash needs no change to carry on. A call made meanwhile waits
    for that recovery.
    """

    def __init__(
        self,
        client: Client,
        info: ProxyInfo,
        channel: PacketSocket,
        pipeline: str | None = None,
        pipeline_version: int | None = None,
    ) -> None:
        super().__init__(info, pipeline, pipeline_version)
        self.client = client
        self.channel = channel
        #: The daemon connection that granted ``proxy_id``: the only one where it names this proxy.
        self.granted_on = client.conn
        self.requests = TrioRequests(f"proxy:{info.proxy_id}")
        self.module_events = EventQueue()
        self._recovering = False
        #: Set, and replaced, at each outcome of the recovery: valid again, or an attempt failed.
        self._outcome = trio.Event()
        #: Set by a call that wants an attempt now rather than at the recovery's next retry.
        self._poke = trio.Event()
        #: Set at each daemon event about this proxy: a call its worker died under waits for
        #: the one that says why (``_await_cause``).
        self._news = trio.Event()

    @property
    def valid(self) -> bool:
        """True while the worker is alive and the instance is initialised."""
        return self.phase is ProxyState.VALID

    async def call(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        fds: Mapping[str, FdArg] | None = None,
        *,
        wait: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call ``method``; ``fds`` maps Buffer parameters to descriptors (or Registered ids).

        On an invalid proxy the call waits for the recovery under way: if its
        attempt fails, the call fails with CallNotSent saying why, or with
        ``wait``, waits on through failures for up to that many seconds.
        ``timeout`` bounds the whole call, recovery included (TimedOut); without
        it, the module's ``call_timeout`` does (from the grant). A surrounding
        cancel scope works as ever. A crash of the worker during the call fails
        it at once with WorkerCrashed. A reply that comes after the call gave
        up is dropped; the proxy stays usable. A buffer that cannot be sealed
        (ipad/client/_buffers.py) fails the call with BadArguments before anything else.
        """
        call = build_call(method, args, fds)  # sealed and encoded once, whatever the retries
        self.check_call(method, args, fds)  # no round trip for a call that cannot fit
        return await self._request(call, method, fds, timeout, wait)

    async def map_buffers(
        self,
        buffers: Mapping[int, BufferArg],
        *,
        wait: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """Register up to MAX_FDS buffers by id, kept mapped by the worker until unmapped.

        Values are memfds (inputs, sealed as a call's), ``Output(fd)`` or
        ``DmaBuf(fd)``; calls name them with ``fds={"param": Registered(id)}``.
        All are registered or none (BadArguments naming the id). After a worker
        restart they are registered again before the setup calls are replayed.
        ``wait`` and ``timeout`` as for ``call``.
        """
        request = self.map_request(buffers)
        await self._request(request, "map_buffers", dict(buffers), timeout, wait)

    async def unmap_buffers(
        self, ids: Iterable[int], *, wait: float | None = None, timeout: float | None = None
    ) -> None:
        """Unregister buffers: the worker unmaps them and closes its descriptors."""
        await self._request((self.unmap_request(ids), []), "unmap_buffers", None, timeout, wait)

    async def _request(
        self,
        call: tuple[p.Message, list[int]],
        method: str,
        given: Any,
        timeout: float | None,
        wait: float | None,
    ) -> Any:
        """Send a channel request within the call's bounds; what ``answered`` makes of it."""
        bounds = self.bounds(trio.current_time(), timeout, wait)
        sent: list[bool] = []
        if bounds.deadline is None:  # no cancel scope of ours on the common path
            return await self._call(bounds, sent, call, given)
        with trio.move_on_at(bounds.deadline):
            return await self._call(bounds, sent, call, given)
        if sent or self.valid:  # sent, or the channel had no room for the call in time
            raise self.timed_out(method, bounds.timeout, sent=bool(sent))
        raise bounds.expired(trio.current_time(), self.module, self.why())

    async def _call(
        self,
        bounds: Bounds,
        sent: list[bool],
        call: tuple[p.Message, list[int]],
        given: Any,
    ) -> Any:
        """The call, once the proxy is valid; ``sent`` gets True once it reached the worker.

        ``call`` is what build_call (or map_request) made of what the caller
        ``given``, which the setup log keeps once it succeeded.
        """
        while True:
            await self._until_valid(bounds)
            channel, requests = self.channel, self.requests
            try:
                pending = await self._send_call(channel, requests, *call)
            except CallNotSent:
                if channel is self.channel:
                    self._lost("worker closed the channel")  # known before its reader saw it
                continue  # nothing ran: sent again once recovered, within the bounds
            sent.append(True)
            try:
                frame = await requests.reply(pending)
            except WorkerCrashed as exc:
                if not requests.book.never_ran(pending[0]):  # it may have run: never sent again
                    await self._await_cause(bounds)
                    error = self.crashed(exc)
                    if error is exc:
                        raise
                    raise error from exc
                sent.clear()
                continue  # the worker died with it unread: sent again once recovered
            return self.answered(call[0], frame, given)

    async def _until_valid(self, bounds: Bounds) -> None:
        """Return once valid; raise why not once an attempt failed, or ``wait`` ran out."""
        while not self.valid:
            unusable = self.unusable()
            if unusable is not None:
                raise unusable
            outcome, before = self._outcome, self.failure
            self.client.poke(self)
            with trio.move_on_at(math.inf if bounds.recovery is None else bounds.recovery):
                await outcome.wait()
            self._check_outcome(bounds, before)

    def _check_outcome(self, bounds: Bounds, before: IpadError | None) -> None:
        """After an outcome (or ``wait``'s end): raise unless valid, or ``wait`` waits on.

        Only a failure newer than ``before`` counts: an older one is about an earlier attempt.
        """
        if self.valid:
            return
        if bounds.recovery is not None and trio.current_time() >= bounds.recovery:
            raise bounds.expired(trio.current_time(), self.module, self.why())
        failure = self.failure
        if failure is None or failure is before:
            return
        if self.gives_up(bounds, failure):
            # Each caller its own exception: a shared one would pile up their tracebacks.
            raise type(failure)(failure.message, dict(failure.details)) from failure.__cause__

    def _signal(self) -> None:
        """An outcome: wake every call waiting for the recovery."""
        outcome, self._outcome = self._outcome, trio.Event()
        outcome.set()

    def _failed(self, error: IpadError) -> None:
        """A recovery attempt failed: the calls waiting for it fail with ``error``."""
        self.failed(error)
        self._signal()

    async def _send_call(
        self,
        channel: PacketSocket,
        requests: TrioRequests,
        message: p.Message,
        fd_list: Sequence[int],
    ) -> Pending:
        """Send a CALL without waiting; a closed channel is the worker gone (CallNotSent)."""
        try:
            return await requests.send(channel, message, fd_list)
        except (OSError, trio.ClosedResourceError, WorkerCrashed) as exc:
            raise CallNotSent(f"{self.module} channel is closed: {exc}") from None

    def start_reader(self, channel: PacketSocket, requests: TrioRequests) -> None:
        """Hand a channel just granted to its reader task, which owns it from now on.

        Whatever happens next (the client closes, the proxy is released, a
        recovery is cancelled or fails) the channel is closed: at the latest
        when its reader ends, which a cancelled nursery makes it do at once.
        """
        try:
            self.client.nursery.start_soon(self.read_channel, channel, requests)
        except BaseException:
            channel.close()
            raise

    async def read_channel(self, channel: PacketSocket, requests: TrioRequests) -> None:
        """Deliver replies and module events until the channel ends; then close it."""
        reason = "worker closed the channel"
        #: The worker may still serve (it sent what this client could not take): the channel
        #: stays open until the recovery's new one replaces it. Closing it tells the worker,
        #: and through it the daemon, that the client left: the proxy would be closed.
        keep = False
        try:
            while True:
                try:
                    frame = await channel.receive()
                except p.ProtocolError as exc:
                    reason = f"worker broke the protocol: {exc.reason}"
                    keep = True
                    break
                except ConnectionResetError:
                    requests.book.reset = True
                    reason = "worker died with calls unread"
                    break
                except (OSError, trio.ClosedResourceError):
                    break
                if frame is None:
                    break
                if requests.take(frame) is Match.EVENT:
                    self.module_events.put(frame.message)  # decoded when read
        except MemoryError:
            # What the worker sent decodes to more than this process can hold (or there is no
            # room to keep it): the proxy loses its channel and recovers; the client carries on.
            reason = "the client ran out of memory decoding what the worker sent"
            keep = True
        finally:
            requests.fail_all(lambda: WorkerCrashed(f"{self.module}: {reason}"))
            current = channel is self.channel
            if not (keep and current and not self.closed):
                channel.close()
            if current:
                self._lost(reason)

    def _lost(self, reason: str, *, recover: bool = True) -> None:
        """The current channel is gone: invalid until recovered (one recovery at a time).

        ``recover=False`` when the daemon connection is what was lost: the
        reconnection brings the proxy back instead.
        """
        if self.closed:
            return
        if recover:
            self.channel_lost(reason)
            self.client.poke(self)
        else:
            self.connection_lost(reason, final=False)

    def _on_event(self, event: p.Event) -> None:
        closed = self.on_event(event)
        self._news.set()
        if closed:
            self._signal()

    async def _await_cause(self, bounds: Bounds) -> None:
        """Learn, within a bounded moment, why the worker died: PROXY_CAUSE, or its invalid event.

        A daemon that speaks PROXY_CAUSE is asked about the worker the call ran
        on: it answers once it knows that worker's end (an invalid event may be
        about an earlier one). An older daemon's invalid event, if subscribed.
        """
        client = self.client
        end = trio.current_time() + CAUSE_WAIT
        end = end if bounds.deadline is None else min(end, bounds.deadline)
        with trio.move_on_at(end):
            welcome = client.welcome
            if welcome is not None and welcome.minor >= p.MINOR_PROXY_CAUSE:
                if client.conn is not self.granted_on:
                    return
                asked = p.ProxyCause(self.proxy_id, self.info.worker_pid)
                with contextlib.suppress(IpadError):
                    reply = await client.request(asked, p.ProxyCauseReply)
                    if reply.state == "invalid":
                        self.learned_cause(reply.reason)
                return
            if not client.subscribed:
                return
            while self.cause is None and not self.closed:
                if self._news.is_set():  # shared by every call waiting: replaced once spent
                    self._news = trio.Event()
                await self._news.wait()

    def _disconnected(self, reason: str) -> None:
        """The daemon connection is gone: no recovery will come, so wake callers waiting for one."""
        self.connection_lost(reason, final=True)
        self._signal()

    async def _recovered(
        self, channel: PacketSocket, requests: TrioRequests, granted: p.ProxyGranted
    ) -> int | None:
        """Replay the setup calls on a new channel (pipelined) and switch to it; return how many.

        The proxy is valid once the replay is done: the daemon is told
        (PROXY_READY) without waiting for its answer, which changes nothing here.
        None, and the channel closed, if the proxy was closed (released, or by
        the daemon) while the grant was on its way.
        """
        self.start_reader(channel, requests)
        calls = self.replay()
        sent = [await self._send_call(channel, requests, *call) for call in calls]
        for (message, _), pending in zip(calls, sent, strict=True):
            expect(await requests.reply(pending), CHANNEL_REPLIES[type(message)])
        if self.closed:
            channel.close()
            return None
        old = self.channel
        self.channel, self.requests = channel, requests
        old.close()
        ready = self.adopted(granted)
        await self._tell_ready(ready)
        self._signal()
        return ready.replayed

    async def _tell_ready(self, ready: p.ProxyReady) -> None:
        """Send PROXY_READY: the daemon marks the proxy valid and tells everyone.

        Its answer changes nothing here, so it is collected in the background.
        """
        client, conn = self.client, self.client.conn
        if conn is None:
            return
        try:
            sent = await client.requests.send(conn, ready)
        except (OSError, trio.ClosedResourceError, IpadError):
            return  # the daemon is gone; the proxy's channel still works
        client.nursery.start_soon(self._ready_answered, sent)

    async def _ready_answered(self, sent: Pending) -> None:
        with contextlib.suppress(IpadError):  # closed meanwhile: its own event says so
            expect(await self.client.requests.reply(sent), p.ProxyStateReply)

    async def release(self) -> None:
        """Give the instance back; the proxy cannot be used afterwards."""
        if self.closed:
            return
        client = self.client
        self.closed_by("released")
        if client.proxies.get(self.proxy_id) is self:  # not another's id on a new connection
            del client.proxies[self.proxy_id]
        client.reattaching.discard(self)
        try:
            # Not yet back on a new connection, its id is the old daemon's: there it may
            # name another proxy. A grant that comes for it later is given back at once.
            if self.granted_on is not None and self.granted_on is client.conn:
                await client.request(p.ReleaseProxy(self.proxy_id), p.Released)
        except (UnknownProxy, Disconnected):
            pass  # its channel broke, its instance was closed, or its daemon is gone: it is gone
        finally:
            self.channel.close()
            self.setup_log.close()
            self._signal()  # wake waiters: they see the proxy closed
