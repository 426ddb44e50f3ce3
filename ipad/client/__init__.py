"""ipad's client library, run in the application's process: a trio API and a blocking API.

    async with ipad.client.open_client() as client:
        awb = await client.request_proxy("awb")
        gains = await awb.call("process_stats", {"frame": 1}, fds={"stats": make_buffer(stats)})

    with ipad.client.BlockingClient() as client:
        echo = client.request_proxy("echo")
        echo.call("echo", {"text": "hi"})

Only re-exports: the trio client lives in ipad.client._trio, the blocking one in
ipad.client._blocking (which does not import trio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ipad.client._blocking import BlockingClient, BlockingProxy
from ipad.client._buffers import DmaBuf, Output, Registered, make_buffer
from ipad.client._core import ProxyInfo
from ipad.client._describe import Record
from ipad.protocol.errors import (
    BadArguments,
    BadMessage,
    CallNotSent,
    Disconnected,
    IpadError,
    LimitExceeded,
    ModuleError,
    ModuleUnavailable,
    PermissionDenied,
    PipelineMismatch,
    TimedOut,
    UnknownMethod,
    UnknownModule,
    UnknownProxy,
    UnsupportedVersion,
    WorkerCrashed,
)

if TYPE_CHECKING:
    from ipad.client._trio import Client, Proxy, open_client

__all__ = [
    "BadArguments",
    "BadMessage",
    "BlockingClient",
    "BlockingProxy",
    "CallNotSent",
    "Client",
    "Disconnected",
    "DmaBuf",
    "IpadError",
    "LimitExceeded",
    "ModuleError",
    "ModuleUnavailable",
    "Output",
    "PermissionDenied",
    "PipelineMismatch",
    "Proxy",
    "ProxyInfo",
    "Record",
    "Registered",
    "TimedOut",
    "UnknownMethod",
    "UnknownModule",
    "UnknownProxy",
    "UnsupportedVersion",
    "WorkerCrashed",
    "make_buffer",
    "open_client",
]

#: The trio API is imported on first use, so blocking users never import trio.
_TRIO_NAMES = frozenset({"Client", "Proxy", "open_client"})


def __getattr__(name: str) -> Any:
    if name in _TRIO_NAMES:
        from ipad.client import _trio  # noqa: PLC0415 - lazy on purpose

        return getattr(_trio, name)
    raise AttributeError(f"module 'ipad.client' has no attribute {name!r}")
