"""Memfds for tests: stats buffers as clients pass them, closed when the test ends."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from ipad.client import _buffers
from ipad.ipa import Buffer

MakeFd = Callable[[bytes], int]
MakeBuffer = Callable[[bytes], Buffer]


def write_memfd(data: bytes) -> int:
    """A memfd holding ``data``, sealed as the client library seals an input; the caller closes it."""
    fd = _buffers.make_buffer(data, "ipad-test")
    _buffers.protect("test", fd)
    return fd


@pytest.fixture
def memfd() -> Iterator[MakeFd]:
    """Make memfds holding given bytes; every one is closed after the test."""
    fds: list[int] = []

    def make(data: bytes) -> int:
        fds.append(write_memfd(data))
        return fds[-1]

    yield make
    for fd in fds:
        os.close(fd)


@pytest.fixture
def make_buffer() -> Iterator[MakeBuffer]:
    """Make Buffers over memfds, closed when the test ends as the worker host closes them."""
    buffers: list[Buffer] = []

    def make(data: bytes) -> Buffer:
        buffers.append(Buffer(write_memfd(data)))
        return buffers[-1]

    yield make
    for buffer in buffers:
        buffer.close()
