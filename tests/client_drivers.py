"""The two clients behind one small adapter, so a behaviour test is written once.

``connect`` opens clients of one kind per test run (trio, then blocking);
``TrioDriver`` runs the trio client in a thread of its own and calls it
through trio.from_thread, ``BlockingDriver`` calls the blocking client
directly. Tests that start clients of a given kind build the driver itself.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio

from ipad import client as ipc
from ipad.client._trio import LocalEvent
from tests.daemon_process import WAIT, DaemonProcess

Start = Callable[..., DaemonProcess]


class Driver(Protocol):
    """What a test does with a client, whichever client it is."""

    kind: str
    #: The client itself (a trio one is used only through ``attr`` and the methods here).
    client: Any

    def request_proxy(self, module: str, **kwargs: Any) -> Any:
        """A proxy to ``module``."""

    def call(
        self,
        proxy: Any,
        method: str,
        args: dict[str, Any] | None = None,
        fds: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        wait: float | None = None,
    ) -> Any:
        """``proxy.call`` with the same arguments, whichever the client."""

    def status(self) -> Any:
        """The daemon's STATUS_REPLY."""

    def describe(self, module: str) -> Any:
        """The daemon's DESCRIPTION of ``module``."""

    def map_buffers(self, proxy: Any, buffers: dict[int, Any], **bounds: float) -> None:
        """``proxy.map_buffers``, whichever the client."""

    def unmap_buffers(self, proxy: Any, ids: list[int], **bounds: float) -> None:
        """``proxy.unmap_buffers``, whichever the client."""

    def attr(self, proxy: Any, name: str) -> Any:
        """An attribute of ``proxy``, read where the client runs."""

    def tasks(self) -> int:
        """How many tasks (trio) or threads (blocking) the client runs now."""

    def release(self, proxy: Any) -> None:
        """``proxy.release()``, whichever the client."""

    def events_lost(self, proxy: Any) -> int:
        """Module events the client dropped for ``proxy`` past its backlog's bounds."""

    def local_event(self, kind: str) -> dict[str, Any] | None:
        """The details of the next event of ``kind`` the client made itself; None if it makes none."""

    def events_until_lost(self) -> list[Any]:
        """The daemon's events read until the client's event stream ends with the connection."""

    def close(self) -> None:
        """Close the client, and fail the test if it cannot."""


class BlockingDriver:
    """The blocking client, called directly."""

    kind = "blocking"

    def __init__(self, path: Path, **kwargs: Any) -> None:
        self.client = ipc.BlockingClient(path, **kwargs)

    def request_proxy(self, module: str, **kwargs: Any) -> Any:
        """A proxy to ``module``."""
        return self.client.request_proxy(module, **kwargs)

    def call(
        self,
        proxy: Any,
        method: str,
        args: dict[str, Any] | None = None,
        fds: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        wait: float | None = None,
    ) -> Any:
        """``proxy.call`` with the same arguments."""
        return proxy.call(method, args, fds, timeout, wait=wait)

    def map_buffers(self, proxy: Any, buffers: dict[int, Any], **bounds: float) -> None:
        """``proxy.map_buffers``."""
        proxy.map_buffers(buffers, **bounds)

    def unmap_buffers(self, proxy: Any, ids: list[int], **bounds: float) -> None:
        """``proxy.unmap_buffers``."""
        proxy.unmap_buffers(ids, **bounds)

    def status(self) -> Any:
        """The daemon's STATUS_REPLY."""
        return self.client.status()

    def describe(self, module: str) -> Any:
        """The daemon's DESCRIPTION of ``module``."""
        return self.client.describe(module)

    def attr(self, proxy: Any, name: str) -> Any:
        """An attribute of ``proxy``."""
        return getattr(proxy, name)

    def tasks(self) -> int:
        """How many tasks or threads the client runs now."""
        return threading.active_count()  # it starts none: this stays the test's own count

    def release(self, proxy: Any) -> None:
        """Release ``proxy``."""
        proxy.release()

    def events_lost(self, proxy: Any) -> int:
        """Module events dropped for ``proxy``."""
        return int(proxy.events_lost)

    def local_event(self, kind: str) -> dict[str, Any] | None:
        """None: the blocking client tells of a loss or a reconnection by its calls only."""
        return None

    def events_until_lost(self) -> list[Any]:
        """Events until ``next_event`` says Disconnected."""
        seen: list[Any] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                event = self.client.next_event(timeout=max(0.0, deadline - time.monotonic()))
            except ipc.Disconnected:
                return seen
            if event is not None:
                seen.append(event)
        raise AssertionError(f"the event stream did not end within {WAIT}s")

    def close(self) -> None:
        """Close the client."""
        self.client.close()


class TrioDriver:
    """The trio client in a thread running its own event loop, called through trio.from_thread."""

    kind = "trio"

    def __init__(self, path: Path, **kwargs: Any) -> None:
        ready: concurrent.futures.Future[tuple[Any, trio.lowlevel.TrioToken]] = (
            concurrent.futures.Future()
        )
        self._ready = ready
        self._stop: trio.Event | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path, kwargs), daemon=True)
        self._thread.start()
        self.client, self.token = ready.result(timeout=WAIT)

    def _run(self, path: Path, kwargs: dict[str, Any]) -> None:
        try:
            trio.run(self._main, path, kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                self.error = exc

    async def _main(self, path: Path, kwargs: dict[str, Any]) -> None:
        self._stop = trio.Event()
        async with ipc.open_client(path, **kwargs) as client:
            self._ready.set_result((client, trio.lowlevel.current_trio_token()))
            await self._stop.wait()

    def _in_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return trio.from_thread.run(functools.partial(fn, *args, **kwargs), trio_token=self.token)

    def _sync(self, fn: Callable[[], Any]) -> Any:
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def request_proxy(self, module: str, **kwargs: Any) -> Any:
        """A proxy to ``module``."""
        return self._in_loop(self.client.request_proxy, module, **kwargs)

    def call(
        self,
        proxy: Any,
        method: str,
        args: dict[str, Any] | None = None,
        fds: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        wait: float | None = None,
    ) -> Any:
        """``proxy.call`` with the same arguments."""
        bounds = {k: v for k, v in (("timeout", timeout), ("wait", wait)) if v is not None}
        return self._in_loop(proxy.call, method, args, fds, **bounds)

    def map_buffers(self, proxy: Any, buffers: dict[int, Any], **bounds: float) -> None:
        """``proxy.map_buffers``."""
        self._in_loop(proxy.map_buffers, buffers, **bounds)

    def unmap_buffers(self, proxy: Any, ids: list[int], **bounds: float) -> None:
        """``proxy.unmap_buffers``."""
        self._in_loop(proxy.unmap_buffers, ids, **bounds)

    def status(self) -> Any:
        """The daemon's STATUS_REPLY."""
        return self._in_loop(self.client.status)

    def describe(self, module: str) -> Any:
        """The daemon's DESCRIPTION of ``module``."""
        return self._in_loop(self.client.describe, module)

    def attr(self, proxy: Any, name: str) -> Any:
        """An attribute of ``proxy``."""
        return self._sync(lambda: getattr(proxy, name))

    def tasks(self) -> int:
        """How many tasks or threads the client runs now."""
        return int(self._sync(lambda: len(self.client.nursery.child_tasks)))

    def release(self, proxy: Any) -> None:
        """Release ``proxy``."""
        self._in_loop(proxy.release)

    def events_lost(self, proxy: Any) -> int:
        """Module events dropped for ``proxy``."""
        return int(self._sync(lambda: proxy.module_events.dropped))

    def local_event(self, kind: str) -> dict[str, Any] | None:
        """The next LocalEvent of ``kind`` on ``client.events``: its details."""

        async def next_local() -> dict[str, Any]:
            with trio.fail_after(WAIT):
                async for event in self.client.events:
                    if isinstance(event, LocalEvent) and event.kind == kind:
                        return dict(event.details)
            raise AssertionError(f"the event stream ended before a {kind!r} event")

        return dict(self._in_loop(next_local))

    def events_until_lost(self) -> list[Any]:
        """Events until ``client.events`` ends."""

        async def until_end() -> list[Any]:
            with trio.fail_after(WAIT):
                return [event async for event in self.client.events]

        return list(self._in_loop(until_end))

    def close(self) -> None:
        """Close the client."""
        if self._thread.is_alive() and self._stop is not None:
            stop = self._stop
            self._sync(stop.set)
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the trio client did not close"
        if self.error is not None:
            raise self.error


Connect = Callable[..., Driver]


@pytest.fixture(params=["trio", "blocking"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """Open clients of one kind (each test runs once per kind); all are closed afterwards."""
    opened: list[Driver] = []

    def make(path: Path, **kwargs: Any) -> Driver:
        cls = TrioDriver if request.param == "trio" else BlockingDriver
        driver: Driver = cls(path, **kwargs)
        opened.append(driver)
        return driver

    yield make
    for driver in opened:
        driver.close()


def proxies_held(daemon: DaemonProcess) -> int:
    """How many proxies the daemon holds, from ``ipadctl --json status``."""
    return int(json.loads(daemon.ctl("--json", "status").stdout)["daemon"]["proxies"])
