"""Types shared by the shipped modules, and the checking of their tuning data.

The attrs classes here travel as call arguments: the worker host converts the
decoded msgpack value to the annotated class, which runs the validators, so a
bad value becomes an error reply naming the field.

Tuning data is the parsed tuning TOML file. Every module reads it once, when an
instance is created, with :func:`read_tuning`: a missing key takes its
documented default; an unknown key, a value of the wrong type or one out of
range raises ValueError naming the key, so a typo never silently leaves a
default in force.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

import attrs

#: How close a misspelt tuning key must be to a known one to be suggested (difflib ratio).
SUGGESTION_CUTOFF = 0.6


class TuningError(ValueError):
    """A module's tuning data is unusable; the message names the key."""


def positive_finite(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    """Attrs validator: a finite number greater than zero."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


@attrs.frozen
class SensorLimits:
    """The exposure time and analogue gain range of a sensor mode."""

    min_exposure_us: int = attrs.field(validator=attrs.validators.ge(1))
    max_exposure_us: int = attrs.field(validator=attrs.validators.ge(1))
    min_gain: float = attrs.field(validator=positive_finite)
    max_gain: float = attrs.field(validator=positive_finite)

    def __attrs_post_init__(self) -> None:
        if self.min_exposure_us > self.max_exposure_us:
            raise ValueError(
                f"min_exposure_us {self.min_exposure_us} is greater than "
                f"max_exposure_us {self.max_exposure_us}"
            )
        if self.min_gain > self.max_gain:
            raise ValueError(f"min_gain {self.min_gain} is greater than max_gain {self.max_gain}")


@attrs.frozen
class SensorInfo:
    """The sensor and mode a camera was configured for, as ``configure`` receives it."""

    model: str
    width: int = attrs.field(validator=attrs.validators.ge(1))
    height: int = attrs.field(validator=attrs.validators.ge(1))
    limits: SensorLimits


@attrs.frozen
class Number:
    """A numeric tuning key: its default and the range it must lie in.

    TOML integers are accepted as well as floats; booleans are not numbers here.
    """

    default: float
    low: float = -math.inf
    high: float = math.inf
    #: Whether ``low`` itself is excluded from the range.
    low_open: bool = False
    #: Whether ``high`` itself is excluded from the range.
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The range in interval notation, such as ``(0, 1]``."""
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"


@attrs.frozen
class Text:
    """A string tuning key and its default."""

    default: str


def read_tuning(tuning: Mapping[str, Any], keys: Mapping[str, Number | Text]) -> dict[str, Any]:
    """Check ``tuning`` against ``keys`` and return every key's value, defaults filled in.

    Raise TuningError (a ValueError) on the first unknown key (suggesting the
    closest known one), value of the wrong type or number out of range; the
    message names the key.
    """
    for key in tuning:
        if key not in keys:
            close = difflib.get_close_matches(str(key), list(keys), n=1, cutoff=SUGGESTION_CUTOFF)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(keys) or "none"
            raise TuningError(f"unknown tuning key {key!r}{hint}; known keys: {known}")
    values: dict[str, Any] = {}
    for key, spec in keys.items():
        value = tuning.get(key, spec.default)
        if isinstance(spec, Text):
            if not isinstance(value, str):
                raise TuningError(f"tuning key {key!r}: got {value!r}; expected a string")
            values[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TuningError(f"tuning key {key!r}: got {value!r}; expected a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isnan(number) or not spec.contains(number):
            raise TuningError(
                f"tuning key {key!r}: {value!r} is out of range; expected {spec.describe()}"
            )
        values[key] = number
    return values
