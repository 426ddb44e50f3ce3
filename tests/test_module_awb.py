"""Tests for the grey-world AWB module, run in-process with real memfd buffers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipa_modules.awb import AwbResult, AwbSettings, GrayWorldAwb, pack_zones
from ipa_modules.types import SensorInfo, SensorLimits

from ipad.ipa import Buffer, ModuleContext, is_setup
from tests.buffers import MakeBuffer, write_memfd

Zone = tuple[int, int, int, int]

#: Tuning that jumps to the target at once, so one frame shows the target gains.
JUMP = {"speed": 1.0}

SENSOR = SensorInfo("imx219", 1920, 1080, SensorLimits(100, 30000, 1.0, 16.0))


def make_awb(tuning: dict[str, Any] | None = None) -> GrayWorldAwb:
    """An instance with ``tuning`` (default: none, so every default applies)."""
    return GrayWorldAwb(ModuleContext({} if tuning is None else tuning, lambda _n, _d: None, 1))


def zone(r_mean: float, g_mean: float, b_mean: float, count: int = 100) -> Zone:
    """A zone record of ``count`` pixels with the given channel means."""
    return (round(r_mean * count), round(g_mean * count), round(b_mean * count), count)


def run(
    awb: GrayWorldAwb, make_buffer: MakeBuffer, zones: Sequence[Zone], frame: int = 0
) -> AwbResult:
    """Process one frame of ``zones``."""
    return awb.process_stats(frame, make_buffer(pack_zones(zones)))


# --- the buffer format ---------------------------------------------------------------


def test_pack_zones_writes_four_little_endian_uint32_per_zone() -> None:
    """The documented layout: r_sum, g_sum, b_sum, pixel_count, 16 bytes per zone."""
    zones = [(1, 2, 3, 4), (0xDEADBEEF, 0, 2**32 - 1, 7)]
    expected = b"".join(value.to_bytes(4, "little") for z in zones for value in z)
    assert pack_zones(zones) == expected
    assert len(expected) == 32
    assert pack_zones([]) == b""


@pytest.mark.parametrize(
    ("zones", "message"),
    [
        ([(1, 2, 3)], r"zone 0: expected 4 values, got 3"),
        ([(1, 2, 3, 4), (1, -2, 3, 4)], r"zone 1: \(1, -2, 3, 4\) is not four uint32 values"),
        ([(2**32, 0, 0, 1)], r"zone 0: .* is not four uint32 values"),
    ],
)
def test_pack_zones_refuses_what_does_not_fit(zones: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_zones(zones)


@pytest.mark.parametrize("size", [0, 1, 15, 17, 40])
def test_stats_buffer_must_be_a_non_zero_multiple_of_16(size: int, make_buffer: MakeBuffer) -> None:
    awb = make_awb()
    with pytest.raises(
        ValueError, match=rf"stats buffer has {size} bytes; expected a non-zero multiple of 16"
    ):
        awb.process_stats(0, make_buffer(bytes(size)))
    assert (awb.red_gain, awb.blue_gain) == (1.0, 1.0)


def test_the_module_keeps_no_view_of_the_buffer(make_buffer: MakeBuffer) -> None:
    """After the call the mapping can be closed: no memoryview outlives it."""
    buffer = make_buffer(pack_zones([zone(100, 200, 50)]))
    make_awb().process_stats(0, buffer)
    assert buffer._map is not None
    buffer._map.close()  # BufferError if the module still held an exported view


# --- the gains -------------------------------------------------------------------------


def test_one_zone_gives_green_over_red_and_green_over_blue(make_buffer: MakeBuffer) -> None:
    """Means 100/200/50: red gain 200/100 = 2, blue gain 200/50 = 4."""
    result = run(make_awb(JUMP), make_buffer, [zone(100, 200, 50)], frame=41)
    assert result == AwbResult(frame=41, red_gain=2.0, blue_gain=4.0, zones_used=1)


def test_zones_are_weighted_by_their_sums_not_averaged_as_ratios(make_buffer: MakeBuffer) -> None:
    """Sums (1000+3000, 2000+6000, 500+3000): red 8000/4000 = 2, blue 8000/3500 = 16/7."""
    zones = [(1000, 2000, 500, 10), (3000, 6000, 3000, 30)]
    result = run(make_awb(JUMP), make_buffer, zones)
    assert result.zones_used == 2
    assert result.red_gain == pytest.approx(2.0)
    assert result.blue_gain == pytest.approx(16 / 7)


def test_dark_zones_are_skipped(make_buffer: MakeBuffer) -> None:
    """Mean green below min_zone_green (default 16) is too dark; exactly 16 is used."""
    dark = (1000, 1590, 10, 100)  # mean green 15.9, and a wild red/blue ratio
    boundary = (800, 1600, 400, 100)  # mean green exactly 16
    result = run(make_awb(JUMP), make_buffer, [dark, boundary])
    assert result == AwbResult(0, 2.0, 4.0, 1)


def test_saturated_zones_are_skipped(make_buffer: MakeBuffer) -> None:
    """A channel mean at or above saturation (default 250) is clipped; just below is used."""
    clipped_red = (25000, 10000, 5000, 100)  # red mean exactly 250
    clipped_green = (5000, 30000, 5000, 100)  # green mean 300
    clipped_blue = (5000, 10000, 25500, 100)
    almost = (24990, 12495, 6247, 100)  # red mean 249.9
    result = run(make_awb(JUMP), make_buffer, [clipped_red, clipped_green, clipped_blue, almost])
    assert result.zones_used == 1
    assert result.red_gain == pytest.approx(12495 / 24990)
    assert result.blue_gain == pytest.approx(12495 / 6247)


def test_empty_zones_are_skipped(make_buffer: MakeBuffer) -> None:
    result = run(make_awb(JUMP), make_buffer, [(0, 0, 0, 0), (9, 9, 9, 0), zone(100, 200, 50)])
    assert result == AwbResult(0, 2.0, 4.0, 1)


def test_tuned_thresholds_are_used(make_buffer: MakeBuffer) -> None:
    """10-bit statistics: tuning raises both thresholds."""
    awb = make_awb({"speed": 1, "min_zone_green": 64, "saturation": 1000})
    dark = zone(10, 60, 10)  # fine for 8-bit defaults, dark for these
    bright = zone(300, 600, 900)  # clipped for 8-bit defaults, fine for these
    result = run(awb, make_buffer, [dark, bright])
    assert result.zones_used == 1
    assert (result.red_gain, result.blue_gain) == pytest.approx((600 / 300, 600 / 900))


def test_without_usable_zones_the_gains_stay(make_buffer: MakeBuffer) -> None:
    awb = make_awb({"speed": 0.5})
    first = run(awb, make_buffer, [zone(100, 200, 50)], frame=1)
    assert (first.red_gain, first.blue_gain) == (1.5, 2.5)
    nothing = run(awb, make_buffer, [zone(1, 2, 1), zone(255, 255, 255), (0, 0, 0, 0)], frame=2)
    assert nothing == AwbResult(2, 1.5, 2.5, 0)


@pytest.mark.parametrize(
    ("means", "tuning", "gains"),
    [
        ((10, 200, 50), {}, (8.0, 4.0)),  # red target 20 > default max_gain 8
        ((100, 20, 200), {}, (0.25, 0.25)),  # targets 0.2 and 0.1 < default min_gain 0.25
        ((10, 200, 50), {"max_gain": 3.0}, (3.0, 3.0)),
        ((150, 200, 50), {"min_gain": 1.5, "max_gain": 2.0}, (1.5, 2.0)),
    ],
)
def test_target_gains_are_clamped(
    means: tuple[int, int, int],
    tuning: dict[str, Any],
    gains: tuple[float, float],
    make_buffer: MakeBuffer,
) -> None:
    result = run(make_awb(JUMP | tuning), make_buffer, [zone(*means)])
    assert (result.red_gain, result.blue_gain) == gains


def test_a_channel_summing_to_zero_targets_max_gain(make_buffer: MakeBuffer) -> None:
    result = run(make_awb(JUMP), make_buffer, [(0, 5000, 2500, 100)])
    assert (result.red_gain, result.blue_gain) == (8.0, 2.0)


@pytest.mark.parametrize("speed", [0.1, 0.5, 0.8])
def test_gains_converge_geometrically(speed: float, make_buffer: MakeBuffer) -> None:
    """After n frames the distance to the target is (1 - speed)^n of where it started."""
    awb = make_awb({"speed": speed})
    zones = [zone(100, 200, 50), zone(60, 120, 30)]  # targets 2 and 4
    for n in range(1, 21):
        result = run(awb, make_buffer, zones, frame=n)
        left = (1 - speed) ** n
        assert result.red_gain == pytest.approx(2.0 + left * (1.0 - 2.0))
        assert result.blue_gain == pytest.approx(4.0 + left * (1.0 - 4.0))
        assert result.frame == n


def test_gains_follow_a_changing_scene(make_buffer: MakeBuffer) -> None:
    """Each frame moves speed of the way from the previous gains to this frame's target."""
    awb = make_awb({"speed": 0.25})
    red = blue = 1.0
    for means, target in [((100, 200, 50), (2.0, 4.0)), ((200, 100, 50), (0.5, 2.0))] * 3:
        result = run(awb, make_buffer, [zone(*means)])
        red += 0.25 * (target[0] - red)
        blue += 0.25 * (target[1] - blue)
        assert (result.red_gain, result.blue_gain) == pytest.approx((red, blue))


# --- init, configure and instances ----------------------------------------------------------


def test_init_sets_the_initial_gains(make_buffer: MakeBuffer) -> None:
    awb = make_awb({"speed": 0.25})
    awb.init(AwbSettings(initial_red_gain=3.0, initial_blue_gain=0.5))
    nothing = run(awb, make_buffer, [(0, 0, 0, 0)])
    assert (nothing.red_gain, nothing.blue_gain) == (3.0, 0.5)
    result = run(awb, make_buffer, [zone(100, 200, 50)])
    assert result.red_gain == pytest.approx(3.0 + 0.25 * (2.0 - 3.0))
    assert result.blue_gain == pytest.approx(0.5 + 0.25 * (4.0 - 0.5))
    awb.init()
    assert (awb.red_gain, awb.blue_gain) == (1.0, 1.0)


def test_initial_gains_are_clamped_to_the_tuned_range() -> None:
    awb = make_awb({"min_gain": 1.2, "max_gain": 2.0})
    assert (awb.red_gain, awb.blue_gain) == (1.2, 1.2)
    awb.init(AwbSettings(initial_red_gain=9.0, initial_blue_gain=1.5))
    assert (awb.red_gain, awb.blue_gain) == (2.0, 1.5)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan])
def test_initial_gains_must_be_positive_and_finite(value: float) -> None:
    with pytest.raises(ValueError, match="initial_red_gain must be a finite number > 0"):
        AwbSettings(initial_red_gain=value)
    with pytest.raises(ValueError, match="initial_blue_gain must be a finite number > 0"):
        AwbSettings(initial_blue_gain=value)


def test_configure_starts_converging_again(make_buffer: MakeBuffer) -> None:
    awb = make_awb({"speed": 0.5})
    awb.init(AwbSettings(initial_red_gain=1.5))
    run(awb, make_buffer, [zone(100, 200, 50)])
    awb.configure(SENSOR)
    assert (awb.red_gain, awb.blue_gain) == (1.5, 1.0)
    run(awb, make_buffer, [zone(100, 200, 50)])
    awb.configure()
    assert (awb.red_gain, awb.blue_gain) == (1.5, 1.0)


def test_instances_keep_their_own_gains(make_buffer: MakeBuffer) -> None:
    first, second = make_awb(JUMP), make_awb(JUMP)
    run(first, make_buffer, [zone(100, 200, 50)])
    run(second, make_buffer, [zone(200, 100, 50)])
    assert (first.red_gain, first.blue_gain) == (2.0, 4.0)
    assert (second.red_gain, second.blue_gain) == (0.5, 2.0)
    second.init(AwbSettings(3.0, 3.0))
    assert (first.red_gain, first.blue_gain) == (2.0, 4.0)


def test_setup_methods_are_marked() -> None:
    assert is_setup(GrayWorldAwb, "init")
    assert is_setup(GrayWorldAwb, "configure")
    assert is_setup(GrayWorldAwb, "start")
    assert not is_setup(GrayWorldAwb, "process_stats")


def test_arguments_and_results_convert_as_the_worker_host_does() -> None:
    """Plain msgpack values become the annotated attrs classes, and results plain values."""
    assert msgspec.convert({"initial_red_gain": 2}, AwbSettings) == AwbSettings(2.0, 1.0)
    with pytest.raises(ValueError, match="initial_blue_gain must be a finite number > 0"):
        msgspec.convert({"initial_blue_gain": -1}, AwbSettings)
    assert msgspec.to_builtins(AwbResult(3, 1.5, 2.5, 7)) == {
        "frame": 3,
        "red_gain": 1.5,
        "blue_gain": 2.5,
        "zones_used": 7,
    }


@settings(max_examples=60, deadline=None)
@given(
    zones=st.lists(
        st.tuples(
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
        ),
        min_size=1,
        max_size=20,
    ),
    speed=st.floats(0.01, 1.0),
)
def test_gains_always_stay_in_range(zones: list[Zone], speed: float) -> None:
    awb = make_awb({"speed": speed, "min_gain": 0.5, "max_gain": 4.0})
    buffer = Buffer(write_memfd(pack_zones(zones)))
    try:
        for frame in range(3):
            result = awb.process_stats(frame, buffer)
            assert 0.5 <= result.red_gain <= 4.0
            assert 0.5 <= result.blue_gain <= 4.0
            assert 0 <= result.zones_used <= len(zones)
    finally:
        buffer.close()


# --- tuning ---------------------------------------------------------------------------------


def test_missing_tuning_keys_take_the_documented_defaults() -> None:
    awb = make_awb()
    assert (awb.speed, awb.min_gain, awb.max_gain) == (0.5, 0.25, 8.0)
    assert (awb.min_zone_green, awb.saturation) == (16.0, 250.0)


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        ({"speed": 0}, r"tuning key 'speed': 0 is out of range; expected \(0, 1\]"),
        ({"speed": 1.5}, r"tuning key 'speed': 1.5 is out of range; expected \(0, 1\]"),
        ({"speed": math.nan}, r"tuning key 'speed': nan is out of range"),
        ({"speed": "fast"}, r"tuning key 'speed': got 'fast'; expected a number"),
        ({"speed": True}, r"tuning key 'speed': got True; expected a number"),
        ({"min_gain": 0.0}, r"tuning key 'min_gain': 0.0 is out of range; expected \(0, inf\)"),
        ({"max_gain": math.inf}, r"tuning key 'max_gain': inf is out of range"),
        (
            {"min_zone_green": -1},
            r"tuning key 'min_zone_green': -1 is out of range; expected \[0, inf\)",
        ),
        (
            {"min_gain": 2, "max_gain": 1},
            r"tuning key 'min_gain': 2.0 is greater than max_gain 1.0",
        ),
        (
            {"saturation": 16},
            r"tuning key 'saturation': 16.0 must be greater than min_zone_green 16.0",
        ),
        ({"sped": 0.5}, r"unknown tuning key 'sped' \(did you mean 'speed'\?\)"),
        ({"gamma": 2.2}, r"unknown tuning key 'gamma'; known keys: speed, min_gain"),
    ],
)
def test_bad_tuning_is_refused_naming_the_key(tuning: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_awb(tuning)
