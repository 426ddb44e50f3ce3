"""Tests for the mean-luminance AGC module, run in-process with real memfd buffers."""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipa_modules.agc import AgcResult, MeanLuminanceAgc, pack_histogram
from ipa_modules.types import SensorInfo, SensorLimits

from ipad.ipa import Buffer, ModuleContext, is_setup
from tests.buffers import MakeBuffer, write_memfd

Event = tuple[str, object]

LIMITS = SensorLimits(min_exposure_us=100, max_exposure_us=30000, min_gain=1.0, max_gain=16.0)
SENSOR = SensorInfo("imx219", 1920, 1080, LIMITS)

#: Mean 0.5: one pixel in the first and one in the last of four bins, (0.5 + 3.5) / (4 * 2).
HALF = [1, 0, 0, 1]


def make_agc(
    tuning: dict[str, Any] | None = None,
    events: list[Event] | None = None,
    sensor: SensorInfo | None = SENSOR,
) -> MeanLuminanceAgc:
    """An instance with ``tuning``, its events appended to ``events``, configured for ``sensor``."""
    sink: list[Event] = [] if events is None else events
    context = ModuleContext(
        {} if tuning is None else tuning, lambda name, data: sink.append((name, data)), 7
    )
    agc = MeanLuminanceAgc(context)
    if sensor is not None:
        agc.configure(sensor)
    return agc


def bins_to_bytes(bins: Sequence[int]) -> bytes:
    """The documented layout, written out by hand: little-endian uint32 per bin."""
    return b"".join(count.to_bytes(4, "little") for count in bins)


def reference(
    bins: Sequence[int],
    exposure_us: int,
    gain: float,
    *,
    target: float,
    speed: float,
    limits: SensorLimits = LIMITS,
) -> tuple[int, float, float]:
    """The documented algorithm in plain arithmetic: (exposure_us, gain, mean)."""
    mean = sum((i + 0.5) * h for i, h in enumerate(bins)) / (len(bins) * sum(bins))
    total = exposure_us * gain
    new_total = total + speed * (total * target / mean - total)
    exposure = new_total / limits.min_gain
    exposure = max(exposure, limits.min_exposure_us)
    exposure = min(exposure, limits.max_exposure_us)
    new_gain = min(max(new_total / exposure, limits.min_gain), limits.max_gain)
    return round(exposure), new_gain, mean


# --- the buffer format -------------------------------------------------------------------


def test_pack_histogram_writes_little_endian_uint32() -> None:
    bins = [0, 1, 0xDEADBEEF, 2**32 - 1]
    assert pack_histogram(bins) == bins_to_bytes(bins)
    with pytest.raises(ValueError, match="histogram bins must be uint32 values"):
        pack_histogram([1, -1])
    with pytest.raises(ValueError, match="histogram bins must be uint32 values"):
        pack_histogram([2**32])


@pytest.mark.parametrize("size", [0, 1, 4, 6, 9, 4098])
def test_stats_buffer_must_hold_whole_uint32_bins_at_least_two(
    size: int, make_buffer: MakeBuffer
) -> None:
    with pytest.raises(
        ValueError,
        match=rf"stats buffer has {size} bytes; expected a multiple of 4 holding at least 2 bins",
    ):
        make_agc().process_stats(0, make_buffer(bytes(size)), 1000, 1.0)


def test_an_empty_histogram_is_refused(make_buffer: MakeBuffer) -> None:
    with pytest.raises(ValueError, match="stats histogram is empty: every bin count is 0"):
        make_agc().process_stats(0, make_buffer(bins_to_bytes([0] * 16)), 1000, 1.0)


def test_the_module_keeps_no_view_of_the_buffer(make_buffer: MakeBuffer) -> None:
    """After the call the mapping can be closed: no memoryview outlives it."""
    buffer = make_buffer(bins_to_bytes(HALF))
    make_agc().process_stats(0, buffer, 1000, 1.0)
    assert buffer._map is not None
    buffer._map.close()  # BufferError if the module still held an exported view


@pytest.mark.parametrize(
    ("bins", "mean"),
    [
        ([1, 0], 0.25),
        ([0, 1], 0.75),
        ([1, 1], 0.5),
        ([1, 0, 0, 1], 0.5),
        ([0, 0, 3, 1], (2.5 * 3 + 3.5) / (4 * 4)),
        ([5] + [0] * 255, 0.5 / 256),
        ([0] * 255 + [2**32 - 1], 255.5 / 256),
    ],
)
def test_mean_takes_each_bin_at_its_centre(
    bins: list[int], mean: float, make_buffer: MakeBuffer
) -> None:
    result = make_agc().process_stats(0, make_buffer(bins_to_bytes(bins)), 1000, 1.0)
    assert result.mean == pytest.approx(mean)


# --- exposure and gain -----------------------------------------------------------------------


def test_one_step_to_target(make_buffer: MakeBuffer) -> None:
    """Mean 0.5, target 0.25: the total halves, from 10 ms at gain 1 to 5 ms at gain 1."""
    agc = make_agc({"target": 0.25, "speed": 1})
    result = agc.process_stats(12, make_buffer(bins_to_bytes(HALF)), 10000, 1.0)
    assert result == AgcResult(frame=12, exposure_us=5000, gain=1.0, mean=0.5)
    assert type(result.exposure_us) is int


def test_the_step_is_damped_by_speed(make_buffer: MakeBuffer) -> None:
    """Speed 0.5: halfway from 10000 to the wanted 5000."""
    agc = make_agc({"target": 0.25, "speed": 0.5})
    result = agc.process_stats(0, make_buffer(bins_to_bytes(HALF)), 10000, 1.0)
    assert (result.exposure_us, result.gain) == (7500, 1.0)


def test_exposure_goes_up_to_its_limit_before_gain(make_buffer: MakeBuffer) -> None:
    """Mean 0.25, target 0.5: total 20000 doubles; 30000 us is the most, the rest is gain."""
    agc = make_agc({"target": 0.5, "speed": 1})
    result = agc.process_stats(0, make_buffer(bins_to_bytes([1, 0])), 20000, 1.0)
    assert result.exposure_us == 30000
    assert result.gain == pytest.approx(40000 / 30000)


def test_gain_goes_down_before_exposure(make_buffer: MakeBuffer) -> None:
    """At 30000 us x 4, halving the total gives 30000 us x 2, not 15000 us x 4."""
    agc = make_agc({"target": 0.25, "speed": 1})
    result = agc.process_stats(0, make_buffer(bins_to_bytes(HALF)), 30000, 4.0)
    assert (result.exposure_us, result.gain) == (30000, 2.0)


def test_exposure_is_new_total_over_min_gain(make_buffer: MakeBuffer) -> None:
    """With min_gain 2, the new total 2000 is split as 1000 us x 2."""
    limits = SensorLimits(100, 30000, 2.0, 8.0)
    agc = make_agc({"target": 0.25, "speed": 1}, sensor=SensorInfo("ov5640", 640, 480, limits))
    result = agc.process_stats(0, make_buffer(bins_to_bytes(HALF)), 1000, 4.0)
    assert (result.exposure_us, result.gain) == (1000, 2.0)


def test_both_clamp_at_their_maximum(make_buffer: MakeBuffer) -> None:
    agc = make_agc({"target": 0.5, "speed": 1})
    dark = bins_to_bytes([1] + [0] * 99)  # mean 0.005: wants 100 times more
    result = agc.process_stats(0, make_buffer(dark), 30000, 16.0)
    assert (result.exposure_us, result.gain) == (30000, 16.0)


def test_both_clamp_at_their_minimum(make_buffer: MakeBuffer) -> None:
    agc = make_agc({"target": 0.18, "speed": 1})
    bright = bins_to_bytes([0] * 99 + [1])  # mean 0.995
    result = agc.process_stats(0, make_buffer(bright), 200, 1.0)
    assert (result.exposure_us, result.gain) == (100, 1.0)


@pytest.mark.parametrize(("exposure_us", "rounded"), [(1334, 800), (1336, 802)])
def test_exposure_is_rounded_after_the_gain_is_chosen(
    exposure_us: int, rounded: int, make_buffer: MakeBuffer
) -> None:
    """Totals 1334 or 1336 x 0.3 / 0.5 = 800.4 or 801.6 us: rounded, gain exactly min_gain."""
    agc = make_agc({"target": 0.3, "speed": 1})
    result = agc.process_stats(0, make_buffer(bins_to_bytes(HALF)), exposure_us, 1.0)
    assert (result.exposure_us, result.gain) == (rounded, 1.0)
    assert type(result.exposure_us) is int


@pytest.mark.parametrize(
    ("bins", "exposure_us", "gain", "tuning"),
    [
        ([3, 9, 27, 1, 0, 0, 5, 2], 4321, 1.7, {}),
        ([0, 0, 0, 0, 0, 1, 8, 100], 29000, 3.3, {"target": 0.4, "speed": 0.3}),
        ([1000] * 64, 123, 15.9, {"speed": 0.9}),
        ([7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 2500, 1.0, {"target": 0.05}),
    ],
)
def test_results_match_the_documented_formula(
    bins: list[int],
    exposure_us: int,
    gain: float,
    tuning: dict[str, float],
    make_buffer: MakeBuffer,
) -> None:
    agc = make_agc(tuning)
    result = agc.process_stats(3, make_buffer(bins_to_bytes(bins)), exposure_us, gain)
    want_exposure, want_gain, want_mean = reference(
        bins,
        exposure_us,
        gain,
        target=tuning.get("target", 0.18),
        speed=tuning.get("speed", 0.5),
    )
    assert result.frame == 3
    assert result.exposure_us == want_exposure
    assert result.gain == pytest.approx(want_gain)
    assert result.mean == pytest.approx(want_mean)


def test_feeding_back_its_controls_converges_on_a_linear_scene(make_buffer: MakeBuffer) -> None:
    """A scene whose brightness is proportional to exposure x gain settles at the target."""
    bins = 256
    brightness = 1e-5  # mean luminance per microsecond of unit-gain exposure
    agc = make_agc({"target": 0.18, "speed": 0.5})
    exposure_us, gain = 1000, 1.0
    result = None
    for frame in range(40):
        level = min(brightness * exposure_us * gain, 1.0)
        histogram = [0] * bins
        histogram[min(int(level * bins), bins - 1)] = 1000
        result = agc.process_stats(frame, make_buffer(bins_to_bytes(histogram)), exposure_us, gain)
        exposure_us, gain = result.exposure_us, result.gain
    assert result is not None
    assert result.mean == pytest.approx(0.18, abs=1 / bins)
    assert exposure_us * gain == pytest.approx(0.18 / brightness, rel=0.03)
    assert gain == 1.0  # about 18000 us fits without gain


@settings(max_examples=80, deadline=None)
@given(
    bins=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=64).filter(any),
    exposure_us=st.integers(1, 10**6),
    gain=st.floats(0.01, 100.0),
    target=st.floats(0.01, 0.99),
    speed=st.floats(0.01, 1.0),
)
def test_results_always_respect_the_sensor_limits(
    bins: list[int], exposure_us: int, gain: float, target: float, speed: float
) -> None:
    agc = make_agc({"target": target, "speed": speed})
    buffer = Buffer(write_memfd(bins_to_bytes(bins)))
    try:
        result = agc.process_stats(0, buffer, exposure_us, gain)
    finally:
        buffer.close()
    assert type(result.exposure_us) is int
    assert LIMITS.min_exposure_us <= result.exposure_us <= LIMITS.max_exposure_us
    assert LIMITS.min_gain <= result.gain <= LIMITS.max_gain
    assert 0 < result.mean < 1


# --- events ------------------------------------------------------------------------------------


def test_sensor_controls_are_sent_only_when_they_change(make_buffer: MakeBuffer) -> None:
    events: list[Event] = []
    agc = make_agc({"target": 0.25, "speed": 1}, events)
    half = bins_to_bytes(HALF)
    agc.process_stats(0, make_buffer(half), 10000, 1.0)
    assert events == [("sensor_controls", {"exposure_us": 5000, "gain": 1.0})]
    agc.process_stats(1, make_buffer(half), 10000, 1.0)  # the same answer again
    assert len(events) == 1
    brighter = bins_to_bytes([0, 0, 1, 0])  # mean 2.5 / 4 = 0.625
    agc.process_stats(2, make_buffer(brighter), 10000, 1.0)
    assert events[1:] == [("sensor_controls", {"exposure_us": 4000, "gain": 1.0})]
    agc.process_stats(3, make_buffer(brighter), 10000, 1.0)
    assert len(events) == 2
    agc.process_stats(4, make_buffer(half), 30000, 4.0)
    assert events[2:] == [("sensor_controls", {"exposure_us": 30000, "gain": 2.0})]
    agc.process_stats(5, make_buffer(half), 30000, 6.0)  # the same exposure, a new gain
    assert events[3:] == [("sensor_controls", {"exposure_us": 30000, "gain": 3.0})]


def test_configure_makes_the_next_result_be_sent(make_buffer: MakeBuffer) -> None:
    events: list[Event] = []
    agc = make_agc({"target": 0.25, "speed": 1}, events)
    half = bins_to_bytes(HALF)
    agc.process_stats(0, make_buffer(half), 10000, 1.0)
    agc.configure(SENSOR)
    agc.process_stats(1, make_buffer(half), 10000, 1.0)
    assert [data for _, data in events] == [{"exposure_us": 5000, "gain": 1.0}] * 2


def test_events_go_to_the_instance_that_computed_them(make_buffer: MakeBuffer) -> None:
    first_events: list[Event] = []
    second_events: list[Event] = []
    first = make_agc({"target": 0.25, "speed": 1}, first_events)
    narrow = SensorInfo("imx219", 640, 480, SensorLimits(100, 2000, 1.0, 2.0))
    second = make_agc({"target": 0.25, "speed": 1}, second_events, sensor=narrow)
    half = bins_to_bytes(HALF)
    assert first.process_stats(0, make_buffer(half), 10000, 1.0).exposure_us == 5000
    assert second.process_stats(0, make_buffer(half), 10000, 1.0).exposure_us == 2000
    assert first_events == [("sensor_controls", {"exposure_us": 5000, "gain": 1.0})]
    assert second_events == [("sensor_controls", {"exposure_us": 2000, "gain": 2.0})]


# --- errors -------------------------------------------------------------------------------------


def test_process_stats_needs_configure_first(make_buffer: MakeBuffer) -> None:
    configured = make_agc()
    unconfigured = make_agc(sensor=None)
    with pytest.raises(RuntimeError, match=r"^configure\(\) must be called first$"):
        unconfigured.process_stats(0, make_buffer(bins_to_bytes(HALF)), 1000, 1.0)
    configured.process_stats(0, make_buffer(bins_to_bytes(HALF)), 1000, 1.0)


@pytest.mark.parametrize(
    ("exposure_us", "gain", "message"),
    [
        (0, 1.0, "exposure_us must be > 0, got 0"),
        (-5, 1.0, "exposure_us must be > 0, got -5"),
        (1000, 0.0, "gain must be a finite number > 0, got 0.0"),
        (1000, -1.0, "gain must be a finite number > 0, got -1.0"),
        (1000, math.nan, "gain must be a finite number > 0, got nan"),
        (1000, math.inf, "gain must be a finite number > 0, got inf"),
    ],
)
def test_current_controls_must_make_sense(
    exposure_us: int, gain: float, message: str, make_buffer: MakeBuffer
) -> None:
    with pytest.raises(ValueError, match=message):
        make_agc().process_stats(0, make_buffer(bins_to_bytes(HALF)), exposure_us, gain)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_exposure_us": 0}, "'min_exposure_us' must be >= 1"),
        ({"min_exposure_us": 40000}, "min_exposure_us 40000 is greater than max_exposure_us 30000"),
        ({"min_gain": 0.0}, "min_gain must be a finite number > 0"),
        ({"max_gain": math.inf}, "max_gain must be a finite number > 0"),
        ({"min_gain": 20.0}, "min_gain 20.0 is greater than max_gain 16.0"),
    ],
)
def test_sensor_limits_are_checked(fields: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {
        "min_exposure_us": 100,
        "max_exposure_us": 30000,
        "min_gain": 1.0,
        "max_gain": 16.0,
    }
    with pytest.raises(ValueError, match=message):
        SensorLimits(**(values | fields))


def test_configure_arguments_convert_as_the_worker_host_does(make_buffer: MakeBuffer) -> None:
    """The host converts the msgpack map to the annotation, which runs the checks."""
    annotation = typing.get_type_hints(MeanLuminanceAgc.configure)["sensor_info"]
    raw = {
        "model": "imx219",
        "width": 1920,
        "height": 1080,
        "limits": {"min_exposure_us": 100, "max_exposure_us": 30000, "min_gain": 1, "max_gain": 16},
    }
    assert msgspec.convert(raw, annotation) == SENSOR
    raw["limits"] = {"min_exposure_us": 100, "max_exposure_us": 30, "min_gain": 1, "max_gain": 16}
    with pytest.raises(ValueError, match="min_exposure_us 100 is greater than max_exposure_us 30"):
        msgspec.convert(raw, annotation)
    result = make_agc().process_stats(0, make_buffer(bins_to_bytes(HALF)), 1000, 1.0)
    assert msgspec.to_builtins(result) == {
        "frame": 0,
        "exposure_us": result.exposure_us,
        "gain": result.gain,
        "mean": 0.5,
    }


def test_setup_methods_are_marked() -> None:
    assert is_setup(MeanLuminanceAgc, "configure")
    assert not is_setup(MeanLuminanceAgc, "process_stats")


# --- tuning -----------------------------------------------------------------------------------


def test_missing_tuning_keys_take_the_documented_defaults() -> None:
    agc = make_agc()
    assert (agc.target, agc.speed) == (0.18, 0.5)


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        ({"target": 0}, r"tuning key 'target': 0 is out of range; expected \(0, 1\)"),
        ({"target": 1}, r"tuning key 'target': 1 is out of range; expected \(0, 1\)"),
        ({"target": "0.18"}, r"tuning key 'target': got '0.18'; expected a number"),
        ({"speed": 0.0}, r"tuning key 'speed': 0.0 is out of range; expected \(0, 1\]"),
        ({"speed": [1]}, r"tuning key 'speed': got \[1\]; expected a number"),
        ({"targte": 0.2}, r"unknown tuning key 'targte' \(did you mean 'target'\?\)"),
    ],
)
def test_bad_tuning_is_refused_naming_the_key(tuning: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_agc(tuning, sensor=None)
