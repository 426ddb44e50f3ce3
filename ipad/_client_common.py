"""What the trio and the blocking client share: requests built and replies read, sans I/O."""

from __future__ import annotations

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
    seq: int

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
            seq=granted.seq,
        )


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
