"""The conformance kit's client contract (docs/conformance.md), with ipad's trio client.

Run by tests/test_conformance.py under ``python -m ipad.conformance client``,
as tests/conformance_client.py runs it with the blocking client.
"""

from __future__ import annotations

import os
import sys
import zlib

import trio

from ipad import client as ipc
from ipad.protocol import wire as p

#: How long one call may take, a recovery included.
CALL_TIMEOUT = 20.0
#: Tries of one call across worker crashes before giving up.
TRIES = 5


def frame_buffer(text: str) -> bytes:
    """``text`` repeated and cut to 4096 bytes."""
    data = text.encode()
    return (data * (4096 // len(data) + 1))[:4096]


async def call(
    proxy: ipc.Proxy, method: str, args: dict[str, object], data: bytes | None
) -> object:
    """A call retried across worker crashes: the trio client recovers the proxy in a task."""
    for attempt in range(TRIES):
        fd = ipc.make_buffer(data) if data is not None else None
        try:
            return await proxy.call(
                method, args, {"data": fd} if fd is not None else None, timeout=CALL_TIMEOUT
            )
        except ipc.WorkerCrashed:
            if attempt == TRIES - 1:
                raise
        finally:
            if fd is not None:
                os.close(fd)
    raise AssertionError("unreachable")


async def run() -> None:
    """HELLO and SUBSCRIBE (open_client), a proxy to echo, init, N frames, release, GOODBYE."""
    calls = int(os.environ.get("IPAD_CONFORMANCE_CALLS", "20"))
    async with ipc.open_client(os.environ["IPAD_SOCKET"], subscribe=True) as client:
        proxy = await client.request_proxy("echo")
        await call(proxy, "init", {}, None)
        for i in range(calls):
            text = f"frame-{i}"
            echoed = await call(proxy, "echo", {"text": text}, None)
            summed = await call(proxy, "checksum", {}, frame_buffer(text))
            assert isinstance(echoed, dict)
            assert isinstance(summed, dict)
            print(i, echoed["text"], summed["crc32"], flush=True)
            assert summed["crc32"] == zlib.crc32(frame_buffer(text))
        await proxy.release()
        # The trio client has no public GOODBYE: said on its connection by hand, id 0.
        assert client.conn is not None
        await client.conn.send(p.Goodbye("conformance run done"))


if __name__ == "__main__":
    trio.run(run)
    sys.exit(0)
