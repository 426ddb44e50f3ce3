"""ipad.ipa.Buffer, a descriptor passed with a call: an empty file is an empty buffer.

docs/protocol.md ("How a buffer is read") says a zero-length file is an empty
buffer; mmap(2) refuses a length of 0, so ``map`` must not pass it on.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipad.client import Output, _buffers
from ipad.ipa import Buffer, BufferRefused
from tests.buffers import write_memfd


@pytest.fixture
def buffers() -> Iterator[list[Buffer]]:
    """Buffers a test made, closed when it ends as the worker host closes them."""
    made: list[Buffer] = []
    yield made
    for buffer in made:
        buffer.close()


def test_an_empty_input_maps_to_an_empty_read_only_view(buffers: list[Buffer]) -> None:
    """A sealed 0-byte input maps to a view of no bytes, read-only; writable is refused."""
    buffers.append(Buffer(write_memfd(b""), "stats"))
    view = buffers[-1].map()
    assert (len(view), view.readonly) == (0, True)
    buffers.append(Buffer(write_memfd(b""), "stats"))
    with pytest.raises(BufferRefused, match="sealed against writes"):
        buffers[-1].map(writable=True)


def test_an_empty_output_maps_to_an_empty_writable_view(buffers: list[Buffer]) -> None:
    """A 0-byte output (sealed against resizing only) maps writable, with no bytes."""
    fd = os.memfd_create("ipad-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    buffers.append(Buffer(fd, "params"))
    _buffers.protect("params", Output(fd))
    view = buffers[-1].map(writable=True)
    assert (len(view), view.readonly) == (0, False)


def test_an_empty_unsealed_memfd_is_still_refused(buffers: list[Buffer]) -> None:
    """Being empty does not skip the F_SEAL_SHRINK check: it could grow, then shrink."""
    fd = os.memfd_create("ipad-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    buffers.append(Buffer(fd, "stats"))
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == 0
    with pytest.raises(BufferRefused, match="F_SEAL_SHRINK"):
        buffers[-1].map()


@pytest.mark.parametrize("where", ["disk", "tmpfs", "devnull"])
def test_an_empty_file_that_is_not_a_memfd_is_refused_clearly(
    where: str, tmp_path: Path, buffers: list[Buffer]
) -> None:
    """An empty regular file (on disk or tmpfs) or a device is BufferRefused, never OSError."""
    if where == "devnull":
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    else:
        base = Path("/dev/shm") if where == "tmpfs" else tmp_path
        if not base.is_dir():
            pytest.skip("no /dev/shm here")
        path = base / f"ipad-empty-{os.getpid()}"
        path.write_bytes(b"")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        path.unlink()
    buffers.append(Buffer(fd, "stats"))
    with pytest.raises(BufferRefused, match="buffer 'stats' cannot be mapped"):
        buffers[-1].map()
