"""What the trio and the blocking client share: requests built and replies read, sans I/O."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs

from . import _protocol as p
from ._errors import IpadError, error_from_reply

#: Protocol versions this client library speaks, newest first.
CLIENT_VERSIONS = (p.PROTOCOL_VERSION,)


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
        )


@attrs.frozen
class SetupCall:
    """A setup call to replay on a new instance; ``fds`` are our own duplicates."""

    method: str
    args: dict[str, Any]
    fds: tuple[tuple[str, int], ...]


class SetupLog:
    """The setup calls a proxy made, in order, to bring a new instance to the same state.

    A setup method called again replaces its earlier call (the module keeps the
    latest configuration); a method that undoes one (``stop``) removes it.
    Passed descriptors are duplicated, since the caller may close its own.
    """

    def __init__(self, info: ProxyInfo) -> None:
        self.info = info
        self.calls: list[SetupCall] = []

    def record(
        self, method: str, args: Mapping[str, Any] | None, fds: Mapping[str, int] | None
    ) -> None:
        """Note a successful call, if it changes what a new instance must replay."""
        undone = self.info.undoes.get(method)
        if undone is not None:
            self._drop(undone)
        if method in self.info.setup_methods:
            self._drop(method)
            dups = tuple((name, os.dup(fd)) for name, fd in (fds or {}).items())
            self.calls.append(SetupCall(method, dict(args or {}), dups))

    def _drop(self, method: str) -> None:
        for call in [c for c in self.calls if c.method == method]:
            self.calls.remove(call)
            for _, fd in call.fds:
                os.close(fd)

    def close(self) -> None:
        """Close the duplicated descriptors."""
        for call in self.calls:
            for _, fd in call.fds:
                os.close(fd)
        self.calls.clear()


def build_call(
    method: str, args: Mapping[str, Any] | None, fds: Mapping[str, int] | None
) -> tuple[p.Call, list[int]]:
    """A CALL and the descriptors to pass with it, in the order ``fd_args`` names them."""
    fd_items = list((fds or {}).items())
    call = p.Call(method, dict(args or {}), tuple(name for name, _ in fd_items))
    return call, [fd for _, fd in fd_items]


M = TypeVar("M", bound=p.Message)


def expect(frame: p.Frame, kind: type[M]) -> M:
    """The reply's message if it is a ``kind``; raise the error it carries otherwise."""
    message = frame.message
    if isinstance(message, kind):
        return message
    frame.close_fds()
    if isinstance(message, p.Error):
        raise error_from_reply(message)
    raise IpadError(f"expected {kind.TYPE.name}, got {message.TYPE.name}")
