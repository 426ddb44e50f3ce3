"""Durations as written in configuration files."""

from __future__ import annotations

import pytest

from ipad.config.duration import Duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10ms", 0.01),
        ("1.5s", 1.5),
        ("2min 30s", 150.0),
        ("1h", 3600.0),
        ("250us", 250e-6),
        ("0", 0.0),
        ("1min30s", 90.0),
        (" 3 s ", 3.0),
    ],
)
def test_parse_accepts_systemd_style(text: str, seconds: float) -> None:
    """Units from systemd.time(7) parse to seconds, alone or combined."""
    assert Duration.parse(text).seconds == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("3", "has no unit"),
        ("", "empty"),
        ("1 parsec", "unknown unit 'parsec'"),
        ("-5s", "cannot read"),
        ("ms", "cannot read"),
        ("5s garbage!", "cannot read"),
    ],
)
def test_parse_rejects_with_reason(text: str, fragment: str) -> None:
    """A bad duration says what is wrong with it."""
    with pytest.raises(ValueError, match=fragment):
        Duration.parse(text)


@pytest.mark.parametrize("text", ["10ms", "30s", "2min", "1h", "250us", "0"])
def test_str_round_trips(text: str) -> None:
    """A duration prints in a form that parses back to the same value."""
    assert str(Duration.parse(text)) == text


def test_ordering_and_negative() -> None:
    """Durations compare by length and cannot be negative."""
    assert Duration(0.01) < Duration(1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        Duration(-1.0)
