"""Types shared by the shipped modules, and the checking of their tuning data.

The attrs classes here travel as call arguments: the worker host converts the
decoded msgpack value to the annotated class, which runs the validators, so a
bad value becomes an error reply naming the field.

The tuning helpers (:func:`read_tuning`, :class:`TuningError`, :class:`Number`,
:class:`Text`) live in ``ipad.tuning``, where every module, sandboxed or not,
can import them; they are re-exported here for the code that imported them
from this module.
"""

from __future__ import annotations

import math

import attrs

from ipad.tuning import SUGGESTION_CUTOFF, Number, Text, TuningError, read_tuning

__all__ = [
    "SUGGESTION_CUTOFF",
    "Number",
    "SensorInfo",
    "SensorLimits",
    "Text",
    "TuningError",
    "positive_finite",
    "read_tuning",
]


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
