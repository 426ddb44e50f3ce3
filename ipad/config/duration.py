"""Durations written the way systemd writes them: "10ms", "1.5s", "2min 30s"."""

from __future__ import annotations

import re

import attrs

#: Seconds per unit; the names follow systemd.time(7) so operators need learn nothing new.
UNITS: dict[str, float] = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
}

_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")

DURATION_EXPECTED = 'a duration such as "10ms", "1.5s" or "2min 30s"; units: us, ms, s, min, h'


@attrs.frozen(order=True)
class Duration:
    """A non-negative span of time; kept apart from float so configs cannot mix up units."""

    seconds: float = attrs.field(validator=attrs.validators.ge(0.0))

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse a duration string; raise ValueError naming what was wrong."""
        stripped = text.strip()
        if stripped == "0":
            return cls(0.0)
        if not stripped:
            raise ValueError("empty duration")
        total = 0.0
        pos = 0
        while pos < len(stripped):
            match = _PART.match(stripped, pos)
            if match is None or match.end() == pos:
                if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
                    raise ValueError(f"duration {text!r} has no unit")
                raise ValueError(f"cannot read duration {text!r}")
            number, unit = match.groups()
            if unit not in UNITS:
                raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
            total += float(number) * UNITS[unit]
            pos = match.end()
        return cls(total)

    def __str__(self) -> str:
        if self.seconds == 0:
            return "0"
        for unit, scale in (("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3)):
            value = self.seconds / scale
            if value >= 1 and abs(value - round(value)) < 1e-9:
                return f"{round(value)}{unit}"
        return f"{self.seconds * 1e6:g}us"
