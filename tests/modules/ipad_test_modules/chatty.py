"""A module that talks: log records at every level, floods, exceptions, print() then a crash.

Also a liar: ``raw_log`` writes MODULE_LOG packets to the control socket
itself, past every bound the worker host keeps, as module code can.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import socket
from typing import Any

import msgspec

from ipad.ipa import IPAModule, ModuleContext
from ipad.protocol import wire as p
from ipad.protocol.fdpass import CONTROL_FD

__version__ = "1.0.0"

logger = logging.getLogger("chatty.lib")


class Unprintable(Exception):
    """An exception that cannot be made a string."""

    def __str__(self) -> str:
        """Fail, as a hostile module's exception may."""
        raise RuntimeError("no text for you")


class Chatty(IPAModule):
    """Every way a module's words reach the daemon's log."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        context.log.info("chatty.created", number=context.instance_id)
        logger.info("chatty.created by logging")

    def log(self, level: str, event: str, fields: dict[str, Any] | None = None) -> None:
        """One record through ``context.log`` at ``level``."""
        getattr(self.context.log, level)(event, **(fields or {}))

    def std_log(self, level: str, message: str) -> None:
        """One record through Python's ``logging``, as a library would write it."""
        logger.log(logging.getLevelName(level.upper()), "%s", message)

    def flood(self, count: int) -> int:
        """``count`` records as fast as it can; how many it wrote."""
        for n in range(count):
            self.context.log.info("flood", n=n)
        return count

    def divide(self, value: int) -> float:
        """Divide 1 by ``value``: raises ZeroDivisionError for 0."""
        return 1 / value

    def unprintable(self) -> None:
        """Raise an exception whose str() itself raises."""
        raise Unprintable

    def print_then_crash(self, text: str) -> None:
        """print() a line without flushing, then die of SIGSEGV (a real fault: pid 1 too)."""
        print(text)
        ctypes.string_at(0)

    def raw_malformed(self) -> None:
        """Write a MODULE_LOG whose field is a map, which the protocol does not allow."""
        payload = msgspec.msgpack.encode({"level": "info", "text": "x", "fields": {"a": {"b": 1}}})
        header = p.HEADER.pack(p.MAGIC, p.PROTOCOL_VERSION, p.MsgType.MODULE_LOG, 0, 0, 0,
                               len(payload))  # fmt: skip
        os.write(CONTROL_FD, header + payload)

    def raw_log(self, count: int, text_size: int = 10, fields: int = 0, wait: bool = False) -> int:
        """Write ``count`` MODULE_LOG packets to the control socket itself; how many went.

        ``wait``: when the socket is full, wait (up to a second) for the daemon to read
        instead of dropping the packet, so that all of them reach it however loaded
        the machine is (a tight loop otherwise fills the buffer before the daemon runs).
        """
        record = p.ModuleLog(
            "warning", "x" * text_size, {f"f{n}": n for n in range(fields)}, instance_id=1
        )
        packet = p.encode(record)
        control = socket.socket(fileno=os.dup(CONTROL_FD))
        sent = 0
        try:
            for _ in range(count):
                try:
                    control.send(packet, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if not (wait and select.select([], [control], [], 1.0)[1]):
                        continue
                    try:
                        control.send(packet, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                sent += 1
        finally:
            control.close()
        return sent
