"""Sizes written the way systemd writes them: "512M", "2G", "64K", or "infinity"."""

from __future__ import annotations

import re

import attrs

#: Bytes per suffix; like systemd's MemoryMax= and LimitAS=, K, M, G, T are powers of 1024.
SUFFIXES: dict[str, int] = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?")

SIZE_EXPECTED = 'a size such as "64M", "2G" or "infinity"; suffixes K, M, G, T (powers of 1024)'


@attrs.frozen(order=True)
class Size:
    """A number of bytes, or no limit at all (``None``, written "infinity")."""

    bytes: int | None = attrs.field(default=None)

    @classmethod
    def parse(cls, text: str) -> Size:
        """Parse a size string; raise ValueError naming what was wrong."""
        stripped = text.strip()
        if stripped == "infinity":
            return cls(None)
        match = _SIZE.fullmatch(stripped)
        if match is None:
            raise ValueError(f"cannot read size {text!r}")
        number, suffix = match.groups()
        value = int(float(number) * SUFFIXES[suffix])
        if value <= 0:
            raise ValueError(f"size {text!r} is not positive")
        return cls(value)

    @property
    def limited(self) -> bool:
        """Whether this is a limit (not "infinity")."""
        return self.bytes is not None

    def __str__(self) -> str:
        if self.bytes is None:
            return "infinity"
        for suffix in ("T", "G", "M", "K"):
            scale = SUFFIXES[suffix]
            if self.bytes % scale == 0:
                return f"{self.bytes // scale}{suffix}"
        return str(self.bytes)
