"""Tests for the diagnostic echo module, and for every shipped manifest and tuning file."""

from __future__ import annotations

import importlib
import math
import os
import time
import tomllib
import typing
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from ipa_modules.echo import Checksum, Echo, EchoReply

from ipad.config.manifest import load_manifest
from ipad.config.paths import install_module_dir
from ipad.config.tuning import find_tuning_file
from ipad.ipa import Buffer, IPAModule, ModuleContext, callable_methods, is_setup
from tests.buffers import write_memfd

Event = tuple[str, object]

#: The modules ipad ships; a new one is added here, so it gets the checks below.
SHIPPED = ["agc", "awb", "echo"]


@pytest.fixture
def events() -> list[Event]:
    """The events the ``echo`` fixture's instance sent, in order."""
    return []


@pytest.fixture
def echo(events: list[Event]) -> Echo:
    """An instance whose events go to the ``events`` list."""
    return Echo(ModuleContext({}, lambda name, data: events.append((name, data)), 1))


@pytest.fixture
def buffers() -> Iterator[list[Buffer]]:
    """Buffers a test made, closed when it ends as the worker host closes them."""
    made: list[Buffer] = []
    yield made
    for buffer in made:
        buffer.close()


# --- echo --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello", "ünïcødé ✓", "x" * 100_000])
def test_echo_returns_the_text(text: str, echo: Echo) -> None:
    assert echo.echo(text) == EchoReply(text)
    assert msgspec.to_builtins(echo.echo(text)) == {"text": text}


def test_sleep_blocks_and_returns_the_seconds(echo: Echo) -> None:
    start = time.monotonic()
    assert echo.sleep(0.05) == 0.05
    assert time.monotonic() - start >= 0.05
    assert echo.sleep(0) == 0


@pytest.mark.parametrize("seconds", [-0.001, 60.001, math.inf, math.nan])
def test_sleep_refuses_negative_or_long_waits(seconds: float, echo: Echo) -> None:
    with pytest.raises(ValueError, match="seconds must be between 0 and 60"):
        echo.sleep(seconds)


def test_count_is_per_instance(echo: Echo) -> None:
    other = Echo(ModuleContext({}, lambda _n, _d: None, 2))
    assert [echo.count() for _ in range(3)] == [1, 2, 3]
    assert other.count() == 1
    assert echo.count() == 4


def test_fail_raises_the_message(echo: Echo) -> None:
    with pytest.raises(RuntimeError, match=r"^boom: as asked$"):
        echo.fail("boom: as asked")


def test_emit_sends_an_event_through_the_context(echo: Echo, events: list[Event]) -> None:
    echo.emit("tick", {"n": 1, "nested": {"ok": True}})
    echo.emit("bare")
    assert events == [("tick", {"n": 1, "nested": {"ok": True}}), ("bare", None)]


def test_emit_is_a_module_method_not_a_base_class_one() -> None:
    """The base class sends events through ``context.emit``; ``Echo.emit`` shadows nothing."""
    assert not hasattr(IPAModule, "emit")
    assert "emit" in callable_methods(Echo)


def test_checksum_of_the_standard_check_string(echo: Echo, buffers: list[Buffer]) -> None:
    """CRC-32 of b"123456789" is 0xCBF43926, the check value of the algorithm."""
    buffers.append(Buffer(write_memfd(b"123456789")))
    assert echo.checksum(buffers[-1]) == Checksum(size=9, crc32=0xCBF43926)


def test_checksum_of_an_empty_buffer(echo: Echo, buffers: list[Buffer]) -> None:
    buffers.append(Buffer(write_memfd(b"")))
    assert echo.checksum(buffers[-1]) == Checksum(0, 0)


def test_checksum_of_a_large_buffer(echo: Echo, buffers: list[Buffer]) -> None:
    data = os.urandom(4 * 1024 * 1024 + 3)
    buffers.append(Buffer(write_memfd(data)))
    assert echo.checksum(buffers[-1]) == Checksum(len(data), zlib.crc32(data))
    mapping = buffers[-1]._map
    assert mapping is not None
    mapping.close()  # BufferError if the module still held an exported view


def test_pid_is_the_serving_process(echo: Echo) -> None:
    assert echo.pid() == os.getpid()


def test_label_comes_from_the_tuning() -> None:
    assert Echo(ModuleContext({}, lambda _n, _d: None, 1)).label() == ""
    assert Echo(ModuleContext({"label": "imx219"}, lambda _n, _d: None, 1)).label() == "imx219"


@pytest.mark.parametrize(
    ("tuning", "message"),
    [
        ({"label": 3}, r"tuning key 'label': got 3; expected a string"),
        ({"lable": "x"}, r"unknown tuning key 'lable' \(did you mean 'label'\?\)"),
    ],
)
def test_bad_tuning_is_refused_naming_the_key(tuning: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Echo(ModuleContext(tuning, lambda _n, _d: None, 1))


def test_echo_has_no_setup_methods_of_its_own() -> None:
    assert is_setup(Echo, "init")
    for name in ("echo", "sleep", "count", "fail", "emit", "checksum", "pid", "label"):
        assert not is_setup(Echo, name)


# --- every shipped module ------------------------------------------------------------------------


def test_the_shipped_manifests_are_the_expected_ones() -> None:
    assert sorted(path.stem for path in install_module_dir().glob("*.toml")) == SHIPPED


def entry_class(name: str) -> type[IPAModule]:
    """Load ``name``'s manifest and import the class its entry point names."""
    manifest = load_manifest(install_module_dir() / f"{name}.toml")
    assert manifest.entry_point is not None
    module_name, _, class_name = manifest.entry_point.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    assert isinstance(cls, type)
    assert issubclass(cls, IPAModule)
    return cls


@pytest.mark.parametrize("name", SHIPPED)
def test_manifest_loads_and_names_an_ipa_module(name: str) -> None:
    manifest = load_manifest(install_module_dir() / f"{name}.toml")
    assert manifest.name == name
    assert manifest.worker == "ipad-worker"
    assert manifest.version == "1.0.0"
    assert manifest.pipeline.supports("simple", 1)
    assert manifest.pipeline.supports("rkisp1", 1)
    assert not manifest.pipeline.supports("simple", 2)
    cls = entry_class(name)
    # The worker host reports the module's __version__; it must agree with the manifest.
    assert importlib.import_module(cls.__module__).__version__ == manifest.version


@pytest.mark.parametrize("name", SHIPPED)
def test_uncalibrated_tuning_parses_and_is_accepted(name: str) -> None:
    path: Path = find_tuning_file(name, environ={}, privileged=False)
    assert path.name == "uncalibrated.toml"
    tuning = tomllib.loads(path.read_text(encoding="utf-8"))
    entry_class(name)(ModuleContext(tuning, lambda _n, _d: None, 1))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_method_annotation_resolves_for_the_worker_host(name: str) -> None:
    """The host converts arguments with typing.get_type_hints; no name may be unresolvable."""
    cls = entry_class(name)
    methods = callable_methods(cls)
    assert {"init", "configure", "start", "stop"} <= set(methods)
    assert "close" not in methods
    for method_name, method in methods.items():
        hints = typing.get_type_hints(method)
        assert "return" in hints, method_name
        code = method.__code__
        parameters = code.co_varnames[1 : code.co_argcount]
        assert set(parameters) <= set(hints), method_name
