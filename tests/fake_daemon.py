"""A daemon and worker of another minor revision, by hand, for the clients' compatibility tests.

``FakeDaemon(path, newer=True)`` speaks like a daemon of a later minor: every
message it and its fake worker send carries fields this revision does not
know, method entries included, and its events use a kind and a proxy state no
revision defines. ``newer=False`` speaks like minor 0: no ``minor``, and none of
the optional fields (``served_by``, ``call_timeout``, ``details``...). It
serves one module, ``echo``, whose ``echo`` method returns its arguments.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from ipad.protocol import wire as p
from ipad.protocol.fdpass import recv_packet, send_packet

#: What a newer peer adds to every message: values of every msgpack kind, nested.
NEWER_FIELDS: dict[str, Any] = {
    "zz_future": {"nested": [1, 2.5, "x", None, b"\x00", {"deep": [True]}]},
    "zz_flag": True,
}
#: The minor revision the fake newer daemon says it speaks.
NEWER_MINOR = 7
#: How often a serving thread looks whether it should stop.
POLL = 0.05


def packet(kind: p.MsgType, payload: dict[str, Any], request_id: int = 0, nfds: int = 0) -> bytes:
    """A packet around any map: fields the codec does not know, or without optional ones."""
    body = msgspec.msgpack.encode(payload)
    return p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, kind, 0, nfds, request_id, len(body)) + body


def as_map(message: msgspec.Struct) -> dict[str, Any]:
    """A message as the map it travels as."""
    payload: dict[str, Any] = msgspec.msgpack.decode(msgspec.msgpack.encode(message))
    return payload


def newer(message: p.Message, **fields: Any) -> dict[str, Any]:
    """``message`` as a newer peer sends it: with ``fields`` and NEWER_FIELDS added."""
    return {**as_map(message), **fields, **NEWER_FIELDS}


class FakeDaemon:
    """A listening socket served in threads; closed, and its threads joined, on exit."""

    def __init__(self, path: Path, *, newer: bool) -> None:
        self.path = path
        self.newer = newer
        self.stop = threading.Event()
        #: Every message type a client sent, in order, for the test to look at.
        self.received: list[p.MsgType] = []
        #: The CALLs the fake worker answered.
        self.calls = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen()
        self.listener.settimeout(POLL)
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = [self.listener]
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def __enter__(self) -> FakeDaemon:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
        for sock in self.sockets:
            sock.close()
        assert not any(t.is_alive() for t in self.threads), "a fake daemon thread did not stop"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(POLL)
            self.sockets.append(conn)
            self._start(self._serve, conn)

    def _receive(self, sock: socket.socket) -> p.Frame | None:
        """The next frame, or None at end of stream or when told to stop."""
        while not self.stop.is_set():
            try:
                received = recv_packet(sock)
            except TimeoutError:
                continue
            except OSError:
                return None
            return None if received is None else p.decode(*received)
        return None

    def _send(self, sock: socket.socket, message: p.Message, request_id: int = 0,
              fds: tuple[int, ...] = (), **fields: Any) -> None:  # fmt: skip
        """Send ``message`` as this daemon's revision would (newer: with unknown fields)."""
        payload = newer(message, **fields) if self.newer else self._older(message)
        with contextlib.suppress(OSError):
            send_packet(sock, packet(message.TYPE, payload, request_id, len(fds)), fds)

    def _older(self, message: p.Message) -> dict[str, Any]:
        """Only the fields minor 0 requires: every optional one left out."""
        info = msgspec.inspect.type_info(type(message))
        assert isinstance(info, msgspec.inspect.StructType)
        # A result's value and an event's data are the payload itself, not an added field.
        kept = {f.name for f in info.fields if f.required} | {"value", "data"}
        payload = {k: v for k, v in as_map(message).items() if k in kept}
        if isinstance(message, p.ProxyGranted):  # method entries: name only
            payload["methods"] = [{"name": m.name} for m in message.methods]
        return payload

    def _serve(self, conn: socket.socket) -> None:
        while (frame := self._receive(conn)) is not None:
            frame.close_fds()
            message, rid = frame.message, frame.request_id
            self.received.append(message.TYPE)
            if isinstance(message, p.Hello):
                minor = min(message.minor, NEWER_MINOR) if self.newer else 0
                self._send(conn, p.Welcome(1, "9.9", os.getpid(), minor), rid)
            elif isinstance(message, p.Subscribe):
                self._send(conn, p.Subscribed(5, 0), rid)
            elif isinstance(message, p.RequestProxy):
                self._grant(conn, rid)
            elif isinstance(message, p.Status):
                # Events first: the client has handled them when it holds the reply.
                self._send(conn, p.Event(6, "camera", "echo", state="dozing"))
                self._send(conn, p.Event(7, "proxy", "echo", proxy_id=1, state="dozing"))
                self._send(conn, p.Event(8, "module", "echo", state="napping", worker_pid=1))
                self._send(conn, p.StatusReply({"pid": os.getpid()}, {"echo": {}}), rid)
            elif isinstance(message, p.ReleaseProxy):
                self._send(conn, p.Released(message.proxy_id), rid)
            elif isinstance(message, p.Goodbye):
                break
            else:
                self._send(conn, p.Error("zz_unknown_code", f"not faked: {message.TYPE.name}"), rid)

    def _grant(self, conn: socket.socket, request_id: int) -> None:
        client_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker_end.settimeout(POLL)
        self.sockets.append(worker_end)
        with client_end:
            methods = (p.MethodSpec("echo"), p.MethodSpec("init", setup=True))
            granted = p.ProxyGranted(1, "echo", "1.0", os.getpid(), methods, "valid", 5,
                                     call_timeout=30.0)  # fmt: skip
            payload_methods = [{**as_map(m), "zz_signature": {"params": []}} for m in methods]
            if self.newer:
                self._send(conn, granted, request_id, (client_end.fileno(),),
                           methods=payload_methods)  # fmt: skip
            else:
                self._send(conn, granted, request_id, (client_end.fileno(),))
        self._start(self._worker, worker_end)

    def _worker(self, channel: socket.socket) -> None:
        """The module instance: MODULE_EVENT then RESULT for each CALL, of this revision."""
        while (frame := self._receive(channel)) is not None:
            frame.close_fds()
            call = frame.message
            assert isinstance(call, p.Call)
            self.calls += 1
            self._send(channel, p.ModuleEvent("news", {"calls": self.calls}))
            self._send(channel, p.Result(call.args), frame.request_id)
