"""The client contract's numbers: what frame i is, and the line a client prints for it."""

from __future__ import annotations

import zlib

#: Bytes of each frame's buffer: "frame-<i>" repeated and cut to this size.
BUFFER_SIZE = 4096


def frame_text(i: int) -> str:
    """The text of frame ``i``."""
    return f"frame-{i}"


def frame_bytes(i: int) -> bytes:
    """The buffer of frame ``i``: its text repeated, cut to BUFFER_SIZE bytes."""
    text = frame_text(i).encode()
    return (text * (BUFFER_SIZE // len(text) + 1))[:BUFFER_SIZE]


def expected_line(i: int) -> str:
    """The line the client must print for frame ``i``."""
    return f"{i} {frame_text(i)} {zlib.crc32(frame_bytes(i))}"


def check_lines(lines: list[str], count: int) -> tuple[bool, str]:
    """Whether ``lines`` are exactly the ``count`` expected ones, and what was seen."""
    for i, line in enumerate(lines[:count]):
        if line != expected_line(i):
            return False, f"line {i} is {line!r}, want {expected_line(i)!r}"
    if len(lines) != count:
        return False, f"{len(lines)} lines, want {count}"
    return True, f"{count} lines, each `<i> frame-<i> <crc32>` correct, in order"
