"""A stand-in for systemd's notification socket: every message the daemon sends, parsed."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.daemon_process import WAIT

Message = dict[str, str]


class Manager:
    """The daemon's $NOTIFY_SOCKET: every datagram it receives, parsed."""

    def __init__(self) -> None:
        self.address = f"@ipad-test-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.messages: list[Message] = []

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float = WAIT) -> Message:
        """The first message (old or new) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such notification; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def index(self, message: Message) -> int:
        """Where ``message`` came in the order received."""
        return next(i for i, m in enumerate(self.messages) if m is message)


@pytest.fixture
def manager() -> Iterator[Manager]:
    """A stand-in service manager."""
    stand_in = Manager()
    yield stand_in
    stand_in.sock.close()
