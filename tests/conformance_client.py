"""The conformance kit's client contract (docs/conformance.md), with ipad's blocking client.

Run by tests/test_conformance.py under ``python -m ipad.conformance client``.
Two flags make it a broken client: with ``--hang-on-error``, instead of
failing when the daemon sends something it cannot read, it hangs; with
``--no-retry``, a call that fails because its worker died is not made again.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import zlib

from ipad import client as ipc
from ipad.protocol import wire as p

#: How long the whole run may wait for one call, a recovery included.
CALL_TIMEOUT = 20.0
#: Tries of one call across worker crashes before giving up.
TRIES = 5


def frame_buffer(text: str) -> bytes:
    """``text`` repeated and cut to 4096 bytes."""
    data = text.encode()
    return (data * (4096 // len(data) + 1))[:4096]


def call(
    proxy: ipc.BlockingProxy, method: str, args: dict[str, object], data: bytes | None
) -> object:
    """A call retried across worker crashes: the client recovers on the next call by itself."""
    for attempt in range(TRIES):
        fd = ipc.make_buffer(data) if data is not None else None
        try:
            return proxy.call(method, args, {"data": fd} if fd is not None else None,
                              timeout=CALL_TIMEOUT)  # fmt: skip
        except ipc.WorkerCrashed:
            if attempt == TRIES - 1 or "--no-retry" in sys.argv:
                raise
        finally:
            if fd is not None:
                os.close(fd)
    raise AssertionError("unreachable")


def main() -> int:
    """HELLO, SUBSCRIBE, a proxy to echo, init, N frames, RELEASE_PROXY, GOODBYE."""
    calls = int(os.environ.get("IPAD_CONFORMANCE_CALLS", "20"))
    try:
        with ipc.BlockingClient(os.environ["IPAD_SOCKET"]) as client:
            client.subscribe()
            proxy = client.request_proxy("echo")
            call(proxy, "init", {}, None)
            for i in range(calls):
                text = f"frame-{i}"
                echoed = call(proxy, "echo", {"text": text}, None)
                summed = call(proxy, "checksum", {}, frame_buffer(text))
                assert isinstance(echoed, dict)
                assert isinstance(summed, dict)
                assert summed["crc32"] == zlib.crc32(frame_buffer(text))
                print(i, echoed["text"], summed["crc32"], flush=True)
            proxy.release()
            # The blocking client has no public GOODBYE: said on its socket by hand, id 0.
            goodbye = p.encode(p.Goodbye("conformance run done"))
            client._conn.sock.send(goodbye, socket.MSG_NOSIGNAL)
    except (ipc.IpadError, p.ProtocolError, OSError):
        if "--hang-on-error" in sys.argv:
            time.sleep(3600)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
