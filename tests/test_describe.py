"""Modules describe themselves: generated from annotations, bounded by the daemon, used by clients.

The first tests read descriptions and bounds as functions; the rest run a
real daemon, real workers and both clients (the ``connect`` fixture), and
attack the description with modules that describe themselves badly
(tests/modules/ipad_test_modules/describer.py).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import os
import signal
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import attrs
import msgspec
import pytest

from ipad import client as ipc
from ipad.client._describe import Description, Record
from ipad.daemon.bounds import MAX_DESCRIPTION, MAX_DOC, MAX_PARAMS, bound_worker_message
from ipad.ipa import Buffer, IPAModule
from ipad.protocol import wire as p
from ipad.worker import host
from ipad.worker.host import method_specs
from tests.client_drivers import Connect, Start, connect
from tests.daemon_process import REPO, TEST_MODULES, write_config

__all__ = ["connect"]  # the fixture

pytestmark = pytest.mark.timeout(120)

SHIPPED = REPO / "workers" / "modules"
sys.path.insert(0, str(SHIPPED))  # the shipped modules' classes, read as the worker reads them

from ipa_modules.agc import MeanLuminanceAgc  # noqa: E402
from ipa_modules.awb import GrayWorldAwb, pack_zones  # noqa: E402

SENSOR = {
    "model": "imx219", "width": 1920, "height": 1080,
    "limits": {"min_exposure_us": 100, "max_exposure_us": 30000, "min_gain": 1.0,
               "max_gain": 16.0},
}  # fmt: skip


def described(cls: type[IPAModule]) -> tuple[dict[str, p.MethodSpec], dict[str, Any]]:
    """A class's READY methods by name, and its types."""
    methods, types = method_specs(cls)
    return {m.name: m for m in methods}, types


# --- generation -----------------------------------------------------------------------


def test_shipped_modules_describe_parameters_results_buffers_and_docs() -> None:
    """The awb and agc modules announce typed params (SensorInfo), buffers, results, docs."""
    awb, types = described(GrayWorldAwb)
    (sensor,) = awb["configure"].params or ()
    assert sensor.name == "sensor_info"
    assert not sensor.required
    assert sensor.default is None
    assert sensor.schema == {"anyOf": [{"$ref": "#/$defs/SensorInfo"}, {"type": "null"}]}
    frame, stats = awb["process_stats"].params or ()
    assert (frame.name, frame.schema, frame.buffer) == ("frame", {"type": "integer"}, False)
    assert (stats.name, stats.buffer, stats.required) == ("stats", True, True)
    assert awb["process_stats"].result == {"$ref": "#/$defs/AwbResult"}
    assert awb["process_stats"].doc.startswith("Take one frame's zone statistics")
    assert awb["configure"].setup
    assert awb["stop"].undoes == "start"
    assert types["SensorInfo"]["properties"]["limits"] == {"$ref": "#/$defs/SensorLimits"}
    assert types["SensorLimits"]["required"] == [
        "min_exposure_us", "max_exposure_us", "min_gain", "max_gain"
    ]  # fmt: skip
    assert types["AwbSettings"]["properties"]["initial_red_gain"] == {
        "type": "number", "default": 1.0
    }  # fmt: skip
    agc, _ = described(MeanLuminanceAgc)
    assert agc["configure"].params == (p.ParamSpec("sensor_info", {"$ref": "#/$defs/SensorInfo"}),)
    assert method_specs(GrayWorldAwb) is method_specs(GrayWorldAwb)  # built once per class


class Mode(enum.Enum):
    """A sensor mode."""

    FAST = "fast"
    SLOW = "slow"


class Point(msgspec.Struct):
    """A msgspec Struct."""

    x: int
    y: int = 0


class Opaque:
    """A class msgspec cannot describe."""


@attrs.frozen
class Wrapped:
    """An attrs class holding others."""

    points: list[Point]
    mode: Mode | None = None


class Varied(IPAModule):
    """Every kind of annotation the description must handle."""

    def varied(  # type: ignore[no-untyped-def]
        self, mode: Mode, points: Mapping[str, Point], maybe: int | None = 3,
        wrapped: Wrapped | None = None, opaque: Opaque | None = None, raw=None,  # noqa: ANN001 - unannotated on purpose
        data: Buffer | None = None,
    ) -> tuple[int, str]:  # fmt: skip
        """Varied."""
        return (1, "")


def test_enums_optional_mappings_structs_attrs_and_undescribable_types() -> None:
    """Each annotation gets its schema; one msgspec cannot describe is ``{}``, not a failure."""
    methods, types = described(Varied)
    params = {prm.name: prm for prm in methods["varied"].params or ()}
    assert params["mode"].schema == {"$ref": "#/$defs/Mode"}
    assert types["Mode"]["enum"] == ["fast", "slow"]
    assert params["points"].schema == {
        "type": "object", "additionalProperties": {"$ref": "#/$defs/Point"}
    }  # fmt: skip
    assert params["maybe"].default == 3
    assert not params["maybe"].required
    assert types["Wrapped"]["properties"]["points"]["items"] == {"$ref": "#/$defs/Point"}
    assert params["opaque"].schema == {}
    assert params["raw"].schema == {}
    assert methods["varied"].result is not None
    assert methods["varied"].result["prefixItems"] == [{"type": "integer"}, {"type": "string"}]


def test_a_class_that_cannot_be_described_is_served_undescribed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Describing fails for whatever reason: READY lists the methods bare, and the load goes on."""

    class Unlucky(IPAModule):
        """A module whose description fails."""

        def ping(self) -> str:
            """Answer."""
            return "pong"

    def fail(signatures: object) -> None:
        raise RuntimeError("no description today")

    monkeypatch.setattr(host, "describe", fail)
    methods, types = method_specs(Unlucky)
    assert {m.name: m.params for m in methods}["ping"] is None
    assert types == {}
    assert "ping" in host.method_table(Unlucky)


# --- the daemon's bounds ----------------------------------------------------------------


def ready_of(methods: tuple[p.MethodSpec, ...], types: dict[str, Any] | None = None) -> p.Ready:
    """A READY as a worker sends it."""
    return p.Ready("m", "1", methods, 1, types=types or {})


def test_a_good_description_passes_the_bounds_unchanged() -> None:
    """The shipped modules' descriptions are far inside every bound: kept as they came."""
    methods, types = method_specs(GrayWorldAwb)
    ready = ready_of(methods, types)
    bounded = bound_worker_message(ready)
    assert isinstance(bounded, p.Ready)
    assert bounded.methods is ready.methods
    assert bounded.types == types


@pytest.mark.parametrize(
    "attack",
    ["deep", "wide", "params", "big", "long_name"],
)
def test_a_description_breaking_a_bound_is_dropped_whole(attack: str) -> None:
    """Too deep, too many values, parameters, bytes or too long a name: the methods stay, bare."""
    deep: dict[str, Any] = {}
    for _ in range(100):
        deep = {"items": deep}
    params: tuple[p.ParamSpec, ...] = (p.ParamSpec("x", {"type": "integer"}),)
    types: dict[str, Any] = {}
    if attack == "deep":
        params = (p.ParamSpec("x", deep),)
    elif attack == "wide":
        types = {"Wide": {"enum": list(range(100_000))}}
    elif attack == "params":
        params = tuple(p.ParamSpec(f"p{n}") for n in range(MAX_PARAMS + 1))
    elif attack == "big":
        types = {"Big": {"description": "x" * (MAX_DESCRIPTION + 1)}}
    else:
        params = (p.ParamSpec("x" * 1000),)
    ready = ready_of((p.MethodSpec("call", True, params=params, result={}, doc="why"),), types)
    bounded = bound_worker_message(ready)
    assert isinstance(bounded, p.Ready)
    assert bounded.methods == (p.MethodSpec("call", True, doc="why"),)
    assert bounded.types == {}


def test_a_huge_docstring_is_cut() -> None:
    """A method's doc is cut to MAX_DOC characters, and marked; the rest of it is kept."""
    spec = p.MethodSpec("m", params=(), result={"type": "null"}, doc="d" * 200_000)
    bounded = bound_worker_message(ready_of((spec,)))
    assert isinstance(bounded, p.Ready)
    (method,) = bounded.methods
    assert method.doc.startswith("d" * MAX_DOC)
    assert method.doc.endswith("bytes]")
    assert len(method.doc) < MAX_DOC + 40
    assert method.params == ()
    assert method.result == {"type": "null"}


# --- the clients' checks, as functions --------------------------------------------------


def awb_description() -> Description:
    """The awb description as a client holds it."""
    methods, types = method_specs(GrayWorldAwb)
    return Description(methods, types)


def test_arguments_are_checked_against_the_schema_naming_the_parameter() -> None:
    """Unknown, missing, wrong-typed (nested too) or misplaced arguments: BadArguments, named."""
    awb = awb_description()
    awb.check("awb", "configure", {"sensor_info": SENSOR}, None)
    awb.check("awb", "configure", {}, None)  # optional
    awb.check("awb", "process_stats", {"frame": 1}, {"stats": 5})
    cases: dict[str, tuple[str, dict[str, Any], dict[str, int] | None]] = {
        "configure() has no argument 'sensor'": ("configure", {"sensor": SENSOR}, None),
        "process_stats() is missing 'frame'": ("process_stats", {}, {"stats": 5}),
        "process_stats() argument 'frame': expected an integer, got float": (
            "process_stats", {"frame": 1.5}, {"stats": 5}),
        "process_stats() argument 'frame': expected an integer, got a boolean": (
            "process_stats", {"frame": True}, {"stats": 5}),
        "process_stats() argument 'stats': is a Buffer: pass it in fds": (
            "process_stats", {"frame": 1, "stats": 5}, None),
        "process_stats() argument 'frame': is not a Buffer: pass it in args": (
            "process_stats", {}, {"frame": 1, "stats": 5}),
        "configure() argument 'sensor_info': field 'limits': field 'max_gain': "
        "expected a number, got str": (
            "configure", {"sensor_info": {**SENSOR, "limits": {**SENSOR["limits"],  # type: ignore[dict-item]
                                                               "max_gain": "high"}}}, None),
        "configure() argument 'sensor_info': missing field 'model'": (
            "configure", {"sensor_info": {k: v for k, v in SENSOR.items() if k != "model"}}, None),
    }  # fmt: skip
    for message, (method, args, fds) in cases.items():
        with pytest.raises(ipc.BadArguments) as bad:
            awb.check("awb", method, args, fds)
        assert bad.value.message == message
        assert bad.value.details["sent"] is False
    with pytest.raises(ipc.UnknownMethod, match="awb has no method 'shout'; methods: configure"):
        awb.check("awb", "shout", {}, None)


class Constrained(IPAModule):
    """A parameter with a msgspec constraint, as a module may annotate it."""

    def scale(self, gain: Annotated[float, msgspec.Meta(gt=0)]) -> float:
        """Twice the gain."""
        return 2 * gain


def test_msgspec_constraints_on_a_parameter_are_described_and_enforced() -> None:
    """Annotated[float, Meta(gt=0)]: the worker refuses 0 naming the argument; clients check it."""
    method = host.method_table(Constrained)["scale"]
    assert method.bind(p.Call("scale", {"gain": 2}), ()) == {"gain": 2.0}
    with pytest.raises(ValueError, match=r"scale\(\) argument 'gain': Expected `float` > 0"):
        method.bind(p.Call("scale", {"gain": 0}), ())
    specs, types = method_specs(Constrained)
    (param,) = next(m for m in specs if m.name == "scale").params or ()
    assert param.schema == {"type": "number", "exclusiveMinimum": 0}
    description = Description(specs, types)
    with pytest.raises(ipc.BadArguments, match="argument 'gain'"):
        description.check("constrained", "scale", {"gain": 0}, None)


def test_attrs_instances_pass_as_arguments() -> None:
    """An attrs instance of the described type, nested in a dict too, is checked as sent."""
    from ipa_modules.types import SensorInfo, SensorLimits  # noqa: PLC0415 - the shipped types

    limits = SensorLimits(1, 2, 1.0, 2.0)
    info = SensorInfo("imx219", 640, 480, limits)
    awb_description().check("awb", "configure", {"sensor_info": info}, None)
    nested = {"model": "imx219", "width": 640, "height": 480, "limits": limits}
    awb_description().check("awb", "configure", {"sensor_info": nested}, None)


class Timed(IPAModule):
    """Parameters msgspec describes as strings but msgpack carries as themselves."""

    def at(
        self, when: datetime.datetime, ident: uuid.UUID, price: decimal.Decimal,
        log: dict[str, datetime.datetime] | None = None,
    ) -> None:  # fmt: skip
        """Nothing."""


def test_datetimes_uuids_and_decimals_pass_where_the_schema_says_string() -> None:
    """The client is never stricter than the worker: such objects pass; a number does not."""
    methods, types = method_specs(Timed)
    timed = Description(methods, types)
    args = {"when": datetime.datetime.now(datetime.UTC), "ident": uuid.uuid4(),
            "price": decimal.Decimal("1.5")}  # fmt: skip
    timed.check("timed", "at", args, None)
    timed.check("timed", "at", {**args, "log": {"start": args["when"]}}, None)  # nested too
    timed.check("timed", "at", {k: str(v) for k, v in args.items()}, None)
    with pytest.raises(ipc.BadArguments, match="argument 'when': expected a string, got int"):
        timed.check("timed", "at", {**args, "when": 5}, None)


def test_results_are_records_with_attribute_and_dict_access() -> None:
    """An object result is a Record named after its type; nested objects and lists too."""
    awb = awb_description()
    result = awb.typed("process_stats", {"frame": 1, "red_gain": 1.5, "blue_gain": 0.5,
                                         "zones_used": 3})  # fmt: skip
    assert type(result).__name__ == "AwbResult"
    assert isinstance(result, Record)
    assert result.red_gain == 1.5
    assert result["zones_used"] == 3
    assert result == {"frame": 1, "red_gain": 1.5, "blue_gain": 0.5, "zones_used": 3}
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(result)) == dict(result)
    with pytest.raises(AttributeError, match="AwbResult has no field 'nope'"):
        _ = result.nope
    methods, types = method_specs(Varied)
    nested = Description(methods, types)
    assert nested.typed("varied", [1, "x"]) == [1, "x"]
    schema = {"type": "array", "items": {"$ref": "#/$defs/Wrapped"}}
    listing = Description((p.MethodSpec("w", params=(), result=schema),), types)
    (wrapped,) = listing.typed("w", [{"points": [{"x": 1, "y": 2}], "mode": "fast"}])
    assert type(wrapped).__name__ == "Wrapped"
    assert wrapped.points[0].x == 1
    assert type(wrapped.points[0]).__name__ == "Point"


def test_a_lying_or_broken_description_costs_the_client_nothing() -> None:
    """Self-referring types, junk schemas and refs to nothing: checks and typing end, lenient."""
    sys.path.insert(0, str(TEST_MODULES))
    from ipad_test_modules.describer import (  # type: ignore[import-not-found]  # noqa: PLC0415
        Lying,  # a test module, imported by path
    )

    methods, types = method_specs(Lying)
    lying = Description(methods, types)
    lying.check("lying", "junk", {"x": object()}, None)  # a schema it cannot read checks nothing
    deep: Any = None
    for _ in range(200):
        deep = {"next": deep}
    assert lying.typed("loop", deep) == deep  # ends: typing stops at its depth
    lying.check("lying", "echo", {"text": 5}, None)  # the lie is believed: the worker refuses
    with pytest.raises(ipc.BadArguments):
        lying.check("lying", "echo", {"text": "truth"}, None)
    refs = Description((p.MethodSpec("m", params=(p.ParamSpec("x", {"$ref": "#/$defs/No"}),),
                                     result={"$ref": "elsewhere"}),), {})  # fmt: skip
    refs.check("m", "m", {"x": 1}, None)
    assert refs.typed("m", {"a": 1}) == {"a": 1}
    undescribed = Description((p.MethodSpec("m"),), {})
    undescribed.check("m", "anything", {"at": "all"}, None)  # an older worker: nothing checked


# --- with a daemon ----------------------------------------------------------------------


def test_calls_are_checked_before_sending_and_results_come_typed(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A stopped worker cannot answer, yet bad calls fail at once: no round trip. Results typed."""
    daemon = start_daemon(write_config(tmp_path))
    client = connect(daemon.socket)
    echo = client.request_proxy("echo")
    awb = client.request_proxy("awb")
    pids = {client.attr(echo, "info").worker_pid, client.attr(awb, "info").worker_pid}
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(ipc.BadArguments, match=r"echo\(\) argument 'text': expected a str"):
            client.call(echo, "echo", {"text": 5}, timeout=10)
        with pytest.raises(ipc.BadArguments, match="field 'width': expected an integer"):
            client.call(awb, "configure", {"sensor_info": {**SENSOR, "width": "wide"}}, timeout=10)
        with pytest.raises(ipc.UnknownMethod) as unknown:
            client.call(echo, "shout", timeout=10)
        assert unknown.value.details["sent"] is False
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    reply = client.call(echo, "echo", {"text": "hi"})
    assert type(reply).__name__ == "EchoReply"
    assert reply.text == "hi"
    assert reply == {"text": "hi"}
    client.call(awb, "configure", {"sensor_info": SENSOR})
    stats = pack_zones([(2000, 2000, 2000, 10)] * 4)
    fd = ipc.make_buffer(stats)
    try:
        result = client.call(awb, "process_stats", {"frame": 7}, {"stats": fd})
    finally:
        os.close(fd)
    assert type(result).__name__ == "AwbResult"
    assert result.frame == 7
    assert result["zones_used"] == 4
    assert client.call(echo, "count") == 1  # none of the refused calls reached the worker


def test_describe_answers_without_a_proxy(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """DESCRIBE gives a module's methods and types; an unknown module is UnknownModule."""
    daemon = start_daemon(write_config(tmp_path))
    client = connect(daemon.socket)
    description = client.describe("awb")
    assert description.module == "awb"
    assert description.version == "1.0.0"
    assert description.note == ""
    methods = {m.name: m for m in description.methods}
    assert methods["process_stats"].result == {"$ref": "#/$defs/AwbResult"}
    assert set(description.types) >= {"AwbResult", "AwbSettings", "SensorInfo", "SensorLimits"}
    assert client.status().daemon["proxies"] == 0
    with pytest.raises(ipc.UnknownModule, match="no module 'nope'"):
        client.describe("nope")


def test_ipadctl_describe_prints_methods_and_json(start_daemon: Start, tmp_path: Path) -> None:
    """Text form lists signatures, docs and types; --json (either place) is DESCRIPTION."""
    daemon = start_daemon(write_config(tmp_path))
    text = daemon.ctl("describe", "awb").stdout
    assert "awb 1.0.0: 5 methods" in text
    assert "  configure(sensor_info: SensorInfo | null = null) -> null  [setup]" in text
    assert "  process_stats(frame: integer, stats: Buffer) -> AwbResult" in text
    assert "      Take one frame's zone statistics; return the gains to apply." in text
    assert "  stop() -> null  [undoes start]" in text
    assert "  AwbSettings {initial_red_gain?: number, initial_blue_gain?: number}" in text
    after = json.loads(daemon.ctl("describe", "echo", "--json").stdout)
    before = json.loads(daemon.ctl("--json", "describe", "echo").stdout)
    assert after == before
    methods = {m["name"]: m for m in after["methods"]}
    assert methods["checksum"]["params"][0] == {
        "name": "data", "schema": {}, "required": True, "default": None, "buffer": True
    }  # fmt: skip
    assert after["types"]["Checksum"]["required"] == ["size", "crc32"]
    unknown = daemon.ctl("describe", "nope", check=False)
    assert unknown.returncode == 4  # unknown module, as status (docs/operations.md)
    assert unknown.stderr == "ipadctl: no module 'nope'; modules: agc, awb, echo\n"
    unknown_json = daemon.ctl("--json", "describe", "nope", check=False)
    assert unknown_json.returncode == 4
    assert json.loads(unknown_json.stdout)["error"]["code"] == "unknown_module"


@pytest.fixture
def hostile(start_daemon: Start, tmp_path: Path) -> Any:
    """A daemon serving the badly describing modules next to echo."""
    dirs = f'[daemon]\nmodule_dirs = ["{TEST_MODULES}", "{SHIPPED}"]'
    modules = "".join(f"[modules.describer_{n}]\n" for n in ("huge", "nested", "lying"))
    return start_daemon(write_config(tmp_path, dirs, modules=modules + "[modules.echo]\n"))


def test_a_description_too_big_or_too_deep_is_dropped_and_calls_still_work(
    hostile: Any, connect: Connect
) -> None:
    """The daemon drops it (journal says why), cuts the 200 KB doc; the worker still checks."""
    client = connect(hostile.socket)
    for module, why in (("describer_huge", "more than 64 parameters"),
                        ("describer_nested", "nested more than 16 deep")):  # fmt: skip
        description = client.describe(module)
        assert description.note.startswith("not described")
        assert all(m.params is None for m in description.methods)
        assert description.types == {}
        records = [r for r in hostile.events("worker.description_dropped")
                   if r.get("module") == module]  # fmt: skip
        assert records
        assert why in str(records[0]["reason"])
    huge = {m.name: m for m in client.describe("describer_huge").methods}
    assert len(huge["ping"].doc) < MAX_DOC + 40
    proxy = client.request_proxy("describer_huge")
    assert client.call(proxy, "ping") == "pong"
    assert client.call(proxy, "many", {"p1": 1, "p2": 2}) == 2
    with pytest.raises(ipc.UnknownMethod):  # undescribed: the worker says it
        client.call(proxy, "nothing")
    nested = client.request_proxy("describer_nested")
    assert client.call(nested, "deep") == 1
    echo = client.request_proxy("echo")
    assert client.call(echo, "echo", {"text": "unharmed"}).text == "unharmed"


def test_a_lying_description_harms_only_its_own_calls(hostile: Any, connect: Connect) -> None:
    """Its lie refuses its own good calls; what passes it the worker refuses; others unharmed."""
    client = connect(hostile.socket)
    lying = client.request_proxy("describer_lying")
    with pytest.raises(ipc.BadArguments) as local:
        client.call(lying, "echo", {"text": "truth"})
    assert local.value.details["sent"] is False
    with pytest.raises(ipc.BadArguments) as remote:
        client.call(lying, "echo", {"text": 5})
    assert "Expected `str`, got `int`" in remote.value.message
    assert client.call(lying, "loop") == {"next": {"next": {"next": None}}}
    with pytest.raises(ipc.UnknownMethod):
        client.call(lying, "junk", {"x": 1})
    assert client.attr(lying, "valid")
    echo = client.request_proxy("echo")
    assert client.call(echo, "echo", {"text": "unharmed"}) == {"text": "unharmed"}
    assert hostile.ctl("describe", "describer_lying").returncode == 0
