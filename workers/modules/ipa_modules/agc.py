"""Mean-luminance auto exposure: steer exposure time and gain toward a target brightness.

Statistics buffer (the ``stats`` argument of ``process_stats``): a luminance
histogram, an array of little-endian uint32 bin counts, bin 0 the darkest. Any
number of bins >= 2 is accepted, so the size must be a multiple of 4 and at
least 8 bytes; :func:`pack_histogram` builds one.

The mean luminance, normalised to [0, 1], takes each bin at its centre:
``mean = sum((i + 0.5) * h[i]) / (bins * sum(h))``; a histogram whose counts
are all 0 is an error. From the exposure time and gain the frame was taken
with, ``total = exposure_us * gain``, the wanted total is
``total * target / mean``, and each frame moves ``speed`` of the way there:
``new_total = total + speed * (wanted - total)``. The new total is split
exposure first, as sensors are least noisy at their lowest gain::

    exposure = clamp(new_total / min_gain, min_exposure_us, max_exposure_us)
    gain = clamp(new_total / exposure, min_gain, max_gain)
    exposure_us = round(exposure)

with the limits ``configure`` was given. The gain is computed before the
exposure time is rounded, so it is exactly ``min_gain`` whenever the exposure
time alone can reach the wanted total (rounding costs at most half a
microsecond), instead of wobbling by a few parts per million. When the (exposure_us, gain) pair
differs from the previous result (the first result after ``configure``
always does), the instance also sends the event ``sensor_controls`` with
``{"exposure_us": ..., "gain": ...}``.

Tuning keys (all optional; see ``workers/tuning/agc/uncalibrated.toml``):

- ``target`` (0.18, in (0, 1)): the wanted mean luminance; 0.18 is middle grey
  on linear data;
- ``speed`` (0.5, in (0, 1]): fraction of the way to the wanted total exposure
  moved per frame; 1 jumps at once.
"""

from __future__ import annotations

#: The module version the worker host reports; equal to the manifest's `version`.
__version__ = "1.0.0"

import math
import struct
from collections.abc import Sequence

import attrs

from ipa_modules.types import SensorInfo, SensorLimits
from ipad.ipa import Buffer, IPAModule, ModuleContext, setup
from ipad.tuning import Number, read_tuning

#: Size of one histogram bin count: a little-endian uint32.
BIN_SIZE = 4

#: The fewest bins a histogram may have.
MIN_BINS = 2

#: The event sent when the sensor controls change.
SENSOR_CONTROLS_EVENT = "sensor_controls"

#: The tuning keys, their defaults and ranges.
TUNING = {
    "target": Number(0.18, low=0.0, high=1.0, low_open=True, high_open=True),
    "speed": Number(0.5, low=0.0, high=1.0, low_open=True),
}


@attrs.frozen
class AgcResult:
    """The sensor controls to apply after one frame, and the mean luminance measured."""

    frame: int
    exposure_us: int
    gain: float
    mean: float


def pack_histogram(bins: Sequence[int]) -> bytes:
    """Build a statistics buffer from histogram bin counts."""
    try:
        return struct.pack(f"<{len(bins)}I", *bins)
    except struct.error as exc:
        raise ValueError(f"histogram bins must be uint32 values: {exc}") from exc


def _clamp(value: float, low: float, high: float) -> float:
    """``value`` limited to [low, high]."""
    return min(max(value, low), high)


def _mean_luminance(stats: Buffer) -> float:
    """The histogram's mean, bins taken at their centres, normalised to [0, 1]."""
    size = stats.size
    if size % BIN_SIZE or size < MIN_BINS * BIN_SIZE:
        raise ValueError(
            f"stats buffer has {size} bytes; expected a multiple of {BIN_SIZE} holding "
            f"at least {MIN_BINS} bins (little-endian uint32 counts)"
        )
    bins = size // BIN_SIZE
    with stats.map() as view:
        counts: tuple[int, ...] = struct.unpack(f"<{bins}I", view)
    pixels = sum(counts)
    if pixels == 0:
        raise ValueError("stats histogram is empty: every bin count is 0")
    # (i + 0.5) / bins as (2i + 1) / (2 bins): exact integers up to the one division.
    weighted = sum((2 * i + 1) * count for i, count in enumerate(counts))
    return weighted / (2 * bins * pixels)


class MeanLuminanceAgc(IPAModule):
    """Mean-luminance auto exposure; each instance keeps its own sensor limits and last result."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        tuning = read_tuning(context.tuning, TUNING)
        self.target: float = tuning["target"]
        self.speed: float = tuning["speed"]
        self.limits: SensorLimits | None = None
        self._last: tuple[int, float] | None = None

    # The worker host converts each argument to the annotated type, so a module
    # takes its own attrs classes where the base class takes plain mappings.
    @setup
    def configure(self, sensor_info: SensorInfo) -> None:  # type: ignore[override]
        """Take the sensor mode's exposure and gain limits; required before ``process_stats``."""
        self.limits = sensor_info.limits
        self._last = None

    def process_stats(self, frame: int, stats: Buffer, exposure_us: int, gain: float) -> AgcResult:
        """Take one frame's histogram and the controls it was taken with; return new controls."""
        limits = self.limits
        if limits is None:
            raise RuntimeError("configure() must be called first")
        if exposure_us <= 0:
            raise ValueError(f"exposure_us must be > 0, got {exposure_us}")
        if not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be a finite number > 0, got {gain!r}")
        mean = _mean_luminance(stats)
        total = exposure_us * gain
        wanted = total * self.target / mean
        new_total = total + self.speed * (wanted - total)
        exposure = _clamp(
            new_total / limits.min_gain, limits.min_exposure_us, limits.max_exposure_us
        )
        new_gain = _clamp(new_total / exposure, limits.min_gain, limits.max_gain)
        new_exposure = round(exposure)
        if self._last != (new_exposure, new_gain):
            self._last = (new_exposure, new_gain)
            self.context.emit(
                SENSOR_CONTROLS_EVENT, {"exposure_us": new_exposure, "gain": new_gain}
            )
        return AgcResult(frame, new_exposure, new_gain, mean)
