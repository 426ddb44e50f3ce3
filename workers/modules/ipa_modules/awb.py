"""Grey-world auto white balance: make the average of the scene grey.

Statistics buffer (the ``stats`` argument of ``process_stats``): an array of
zone records, each four little-endian uint32 values, 16 bytes per zone::

    r_sum, g_sum, b_sum, pixel_count

the sums of the red, green and blue values of the zone's pixels and how many
pixels were summed. The buffer's size must be a non-zero multiple of 16;
:func:`pack_zones` builds one.

A zone is used unless its pixel count is 0, its mean green is below
``min_zone_green`` (too dark to trust) or the mean of any channel reaches
``saturation`` (clipped). Over the used zones, with R, G and B the sums of their
channel sums, the target gains are ``G / R`` (red) and ``G / B`` (blue),
clamped to [``min_gain``, ``max_gain``]; a channel whose sum is 0 targets
``max_gain``. Each frame moves the gains ``speed`` of the way to the target:
``new = old + speed * (target - old)``. With no usable zone the gains stay
as they are.

Tuning keys (all optional; see ``workers/tuning/awb/uncalibrated.toml``):

- ``speed`` (0.5, in (0, 1]): fraction of the way to the target gains moved
  per frame; 1 jumps at once;
- ``min_gain`` (0.25) and ``max_gain`` (8.0), both > 0, ``min_gain <= max_gain``:
  the range of the red and blue gains;
- ``min_zone_green`` (16.0, >= 0): zones whose mean green is below it are too dark;
- ``saturation`` (250.0, > ``min_zone_green``): zones with a channel mean at or
  above it are clipped. Both are in the statistics' pixel scale; the defaults
  suit 8-bit statistics (0..255).
"""

from __future__ import annotations

#: The module version the worker host reports; equal to the manifest's `version`.
__version__ = "1.0.0"

import math
import struct
from collections.abc import Sequence

import attrs

from ipa_modules.types import SensorInfo, positive_finite
from ipad.ipa import Buffer, IPAModule, ModuleContext, setup
from ipad.tuning import Number, TuningError, read_tuning

#: One zone record: r_sum, g_sum, b_sum, pixel_count as little-endian uint32.
ZONE = struct.Struct("<4I")

#: The tuning keys, their defaults and ranges.
TUNING = {
    "speed": Number(0.5, low=0.0, high=1.0, low_open=True),
    "min_gain": Number(0.25, low=0.0, low_open=True, high_open=True),
    "max_gain": Number(8.0, low=0.0, low_open=True, high_open=True),
    "min_zone_green": Number(16.0, low=0.0, high_open=True),
    "saturation": Number(250.0, low=0.0, low_open=True, high_open=True),
}


@attrs.frozen
class AwbSettings:
    """What ``init`` takes: the gains to start from (clamped to the tuning's gain range)."""

    initial_red_gain: float = attrs.field(default=1.0, validator=positive_finite)
    initial_blue_gain: float = attrs.field(default=1.0, validator=positive_finite)


@attrs.frozen
class AwbResult:
    """The gains to apply after one frame's statistics, and how many zones were used."""

    frame: int
    red_gain: float
    blue_gain: float
    zones_used: int


def pack_zones(zones: Sequence[tuple[int, int, int, int]]) -> bytes:
    """Build a statistics buffer from ``(r_sum, g_sum, b_sum, pixel_count)`` tuples."""
    out = bytearray()
    for index, zone in enumerate(zones):
        if len(zone) != 4:
            raise ValueError(f"zone {index}: expected 4 values, got {len(zone)}")
        try:
            out += ZONE.pack(*zone)
        except struct.error as exc:
            raise ValueError(f"zone {index}: {zone!r} is not four uint32 values") from exc
    return bytes(out)


def _clamp(value: float, low: float, high: float) -> float:
    """``value`` limited to [low, high]."""
    return min(max(value, low), high)


class GrayWorldAwb(IPAModule):
    """Grey-world auto white balance; each instance converges its own gains."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        tuning = read_tuning(context.tuning, TUNING)
        if tuning["min_gain"] > tuning["max_gain"]:
            raise TuningError(
                f"tuning key 'min_gain': {tuning['min_gain']} is greater than "
                f"max_gain {tuning['max_gain']}"
            )
        if tuning["saturation"] <= tuning["min_zone_green"]:
            raise TuningError(
                f"tuning key 'saturation': {tuning['saturation']} must be greater than "
                f"min_zone_green {tuning['min_zone_green']}"
            )
        self.speed: float = tuning["speed"]
        self.min_gain: float = tuning["min_gain"]
        self.max_gain: float = tuning["max_gain"]
        self.min_zone_green: float = tuning["min_zone_green"]
        self.saturation: float = tuning["saturation"]
        self._settings = AwbSettings()
        self.red_gain = 1.0
        self.blue_gain = 1.0
        self._reset()

    def _reset(self) -> None:
        """Go back to the initial gains."""
        self.red_gain = _clamp(self._settings.initial_red_gain, self.min_gain, self.max_gain)
        self.blue_gain = _clamp(self._settings.initial_blue_gain, self.min_gain, self.max_gain)

    # The worker host converts each argument to the annotated type, so a module
    # takes its own attrs classes where the base class takes plain mappings.
    @setup
    def init(self, settings: AwbSettings | None = None) -> None:  # type: ignore[override]
        """Set the initial gains (1.0 each without settings) and start from them."""
        self._settings = AwbSettings() if settings is None else settings
        self._reset()

    @setup
    def configure(self, sensor_info: SensorInfo | None = None) -> None:  # type: ignore[override]
        """A new sensor mode: converge again from the initial gains."""
        self._reset()

    def process_stats(self, frame: int, stats: Buffer) -> AwbResult:
        """Take one frame's zone statistics; return the gains to apply."""
        size = stats.size
        if size == 0 or size % ZONE.size:
            raise ValueError(
                f"stats buffer has {size} bytes; expected a non-zero multiple of {ZONE.size} "
                "(per zone: r_sum, g_sum, b_sum, pixel_count as little-endian uint32)"
            )
        red = green = blue = used = 0
        with stats.map() as view:
            for r_sum, g_sum, b_sum, count in ZONE.iter_unpack(view):
                if count == 0 or g_sum / count < self.min_zone_green:
                    continue  # empty, or too dark to trust
                if max(r_sum, g_sum, b_sum) / count >= self.saturation:
                    continue  # clipped
                red += r_sum
                green += g_sum
                blue += b_sum
                used += 1
        if used:
            self.red_gain = self._step(self.red_gain, green, red)
            self.blue_gain = self._step(self.blue_gain, green, blue)
        return AwbResult(frame, self.red_gain, self.blue_gain, used)

    def _step(self, old: float, green: int, channel: int) -> float:
        """Move a gain ``speed`` of the way to its clamped target ``green / channel``."""
        target = green / channel if channel else math.inf
        target = _clamp(target, self.min_gain, self.max_gain)
        return old + self.speed * (target - old)
