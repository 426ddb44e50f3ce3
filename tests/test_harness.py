"""ipad.testing.ModuleHarness: a module served in-process by the worker host's own code."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ipa_modules.agc import pack_histogram
from ipa_modules.awb import pack_zones

from ipad.client import (
    BadArguments,
    Disconnected,
    ModuleError,
    Record,
    Registered,
    TimedOut,
    UnknownMethod,
    WorkerCrashed,
    make_buffer,
)
from ipad.config.problems import ManifestError
from ipad.config.tuning import TuningFileNotFound
from ipad.testing import ModuleHarness

from .helpers_fs import write_file

ROOT = Path(__file__).resolve().parents[1]
AWB = ROOT / "workers" / "modules" / "awb.toml"
AGC = ROOT / "workers" / "modules" / "agc.toml"
ECHO = ROOT / "workers" / "modules" / "echo.toml"
TEST_MODULES = Path(__file__).resolve().parent / "modules"

SENSOR = {
    "model": "imx219",
    "width": 1920,
    "height": 1080,
    "limits": {"min_exposure_us": 100, "max_exposure_us": 30000, "min_gain": 1.0, "max_gain": 16.0},
}


def test_a_dict_argument_becomes_the_annotated_class() -> None:
    """configure() gets a SensorInfo (agc reads ``.limits`` from it), and events are kept."""
    with ModuleHarness(AGC) as harness:
        assert harness.version == harness.manifest.version == "1.0.0"
        inst = harness.open()
        assert inst.call("configure", sensor_info=SENSOR) is None
        result = inst.call(
            "process_stats", frame=1, stats=pack_histogram([0, 10]), exposure_us=150, gain=1.0
        )
        assert isinstance(result, Record)  # what a client decodes, typed as it types it
        assert result.frame == 1
        assert result.exposure_us == 100  # clamped to the limits configure was given
        assert inst.events == [("sensor_controls", {"exposure_us": 100, "gain": 1.0})]


def test_open_with_arguments_calls_init() -> None:
    """``open(settings=...)`` is OPEN_INSTANCE, then init with the settings, converted."""
    with ModuleHarness(AWB) as harness:
        inst = harness.open(settings={"initial_red_gain": 2.0, "initial_blue_gain": 3.0})
        result = inst.call("process_stats", frame=7, stats=pack_zones([(0, 0, 0, 0)]))
        assert result == {"frame": 7, "red_gain": 2.0, "blue_gain": 3.0, "zones_used": 0}


def test_a_bad_value_is_the_error_a_client_gets() -> None:
    """The description's check and the worker's own conversion both raise BadArguments."""
    with ModuleHarness(AGC) as harness:
        inst = harness.open()
        with pytest.raises(BadArguments, match="missing field 'min_exposure_us'") as early:
            inst.call("configure", sensor_info={**SENSOR, "limits": {}})
        assert early.value.code == "bad_arguments"
        assert early.value.details == {"argument": "sensor_info", "sent": False}
        # A value only the attrs validator refuses goes to the worker host, as with a client.
        with pytest.raises(BadArguments, match="'width' must be >= 1") as late:
            inst.call("configure", sensor_info={**SENSOR, "width": 0})
        assert late.value.code == "bad_arguments"
        with pytest.raises(UnknownMethod):
            inst.call("no_such_method")
        with pytest.raises(ModuleError, match="configure\\(\\) must be called first") as failed:
            inst.call(
                "process_stats", frame=1, stats=pack_histogram([1, 1]), exposure_us=1, gain=1.0
            )
        assert failed.value.details["exception"] == "RuntimeError"
        assert "agc.py" in failed.value.details["traceback"]


def test_buffers_pass_as_a_client_passes_them(tmp_path: Path) -> None:
    """Bytes, a memfd (sealed as a client seals it) and an empty buffer; a plain file is refused."""
    with ModuleHarness(ECHO) as harness:
        inst = harness.open()
        fd = make_buffer(b"abc")
        try:
            assert inst.call("checksum", data=fd).size == 3
            assert inst.call("checksum", data=fd).size == 3  # still ours, still open
        finally:
            os.close(fd)
        assert inst.call("checksum", data=b"").size == 0  # an empty buffer maps to b""
        plain = write_file(tmp_path / "plain.bin", "xyz")
        with plain.open("rb") as file, pytest.raises(BadArguments, match="not a memfd") as refused:
            inst.call("checksum", data=file)
        assert refused.value.details["fd_arg"] == "data"


def test_registered_buffers_are_mapped_once_and_named_by_id() -> None:
    """map_buffers/unmap_buffers as a client's: a call names the buffer with Registered(id)."""
    with ModuleHarness(ECHO) as harness:
        inst = harness.open()
        inst.map_buffers({3: b"abcd"})
        assert inst.call("checksum", data=Registered(3)).size == 4
        with pytest.raises(BadArguments, match="already registered"):
            inst.map_buffers({3: b"again"})
        inst.unmap_buffers([3])
        with pytest.raises(BadArguments, match="not registered"):
            inst.call("checksum", data=Registered(3))


def test_the_tuning_file_is_found_in_tuning_dirs_and_read(tmp_path: Path) -> None:
    """A named tuning file in ``tuning_dirs`` is what the module reads (speed 1 jumps at once)."""
    write_file(tmp_path / "awb" / "fast.toml", "speed = 1.0\n")
    stats = pack_zones([(100, 200, 50, 1)])
    with ModuleHarness(AWB, tuning="fast.toml", tuning_dirs=[tmp_path]) as harness:
        assert harness.tuning_file == tmp_path / "awb" / "fast.toml"
        fast = harness.open().call("process_stats", frame=1, stats=stats)
    with ModuleHarness(AWB, tuning_dirs=[tmp_path]) as harness:
        assert harness.tuning_file.name == "uncalibrated.toml"  # none in tmp_path: installed one
        slow = harness.open().call("process_stats", frame=1, stats=stats)
    assert (fast.red_gain, fast.blue_gain) == (2.0, 4.0)
    assert (slow.red_gain, slow.blue_gain) == (1.5, 2.5)


def test_a_bad_tuning_key_fails_the_load_naming_it(tmp_path: Path) -> None:
    """The worker host's probe instance rejects the file: the error names the key."""
    write_file(tmp_path / "awb" / "typo.toml", "sped = 1.0\n")
    with pytest.raises(
        ModuleError, match="unknown tuning key 'sped' \\(did you mean 'speed'\\?\\)"
    ):
        ModuleHarness(AWB, tuning="typo.toml", tuning_dirs=[tmp_path]).start()


def test_a_tuning_file_that_is_not_toml_fails_the_load_naming_the_file(tmp_path: Path) -> None:
    """Invalid TOML: the load fails with the file's path, not only the parser's line and column."""
    bad = write_file(tmp_path / "awb" / "broken.toml", "[grid\n")
    with pytest.raises(ModuleError, match=f"tuning file {bad} is not valid TOML: Expected"):
        ModuleHarness(AWB, tuning="broken.toml", tuning_dirs=[tmp_path]).start()


def test_a_missing_tuning_file_lists_the_paths_tried(tmp_path: Path) -> None:
    """With no tuning file anywhere the harness says where it looked, as the daemon does."""
    write_file(tmp_path / "mods" / "orphan.toml", _manifest("orphan", "ipa_orphan:Orphan"))
    with pytest.raises(TuningFileNotFound, match="orphan") as caught:
        ModuleHarness(tmp_path / "mods" / "orphan.toml", tuning_dirs=[tmp_path / "tuning"])
    assert tmp_path / "tuning" / "orphan" / "uncalibrated.toml" in caught.value.tried
    assert "pass tuning_dirs=[<dir>]" in str(
        caught.value
    )  # the harness's arguments, not the daemon's
    assert "[daemon] tuning_dirs" not in str(caught.value)


def test_a_bad_manifest_is_refused_with_its_problems(tmp_path: Path) -> None:
    """The manifest is validated as the daemon validates it."""
    bad = write_file(tmp_path / "bad.toml", 'name = "bad"\nversion = "one"\n')
    with pytest.raises(ManifestError, match="version"):
        ModuleHarness(bad)


def test_a_module_that_fails_to_import_fails_the_harness() -> None:
    """An import error is the ModuleError the daemon reports for a failed load."""
    manifest = TEST_MODULES / "broken.toml"
    with pytest.raises(ModuleError, match="needs a library that is not installed") as caught:
        ModuleHarness(manifest, tuning_dirs=[TEST_MODULES / "tuning"]).start()
    assert "traceback" in caught.value.details


HOSTILE = '''
"""A module that misbehaves in every way the in-process harness must survive."""

import sys

from ipad.ipa import IPAModule, ModuleContext

__version__ = "2.0.0"


class Unencodable:
    """Not something msgpack can carry."""


class Hostile(IPAModule):
    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        sys.path.append("/nonexistent/hostile")  # the harness puts sys.path back
        if context.instance_id == 2:
            raise RuntimeError("instance 2 refuses to exist")

    def weird(self) -> object:
        return Unencodable()

    def bad_event(self) -> int:
        self.context.emit("bad", Unencodable())
        return 1

    def raise_system_exit(self) -> None:
        raise SystemExit(3)

    def close(self) -> None:
        if self.context.instance_id:  # not the load's probe: that would fail the load
            raise RuntimeError("close fails too")
'''


def _manifest(name: str, entry_point: str, version: str = "2.0.0") -> str:
    return textwrap.dedent(f"""\
        name = "{name}"
        version = "{version}"
        api_version = 1
        worker = "ipad-worker"
        entry_point = "{entry_point}"

        [pipeline]
        handlers = ["simple"]
        min_version = 1
        max_version = 1
        """)


def test_a_hostile_module_gets_the_errors_a_worker_gives(tmp_path: Path) -> None:
    """Unencodable results and events, a failing constructor or close: errors, not a dead harness."""
    manifest = write_file(tmp_path / "mods" / "hostile_h.toml",
                          _manifest("hostile_h", "ipa_hostile_h:Hostile"))  # fmt: skip
    write_file(tmp_path / "mods" / "ipa_hostile_h.py", HOSTILE)
    write_file(tmp_path / "tuning" / "hostile_h" / "uncalibrated.toml", "")
    path_before, modules_before = list(sys.path), set(sys.modules)
    with ModuleHarness(manifest, tuning_dirs=[tmp_path / "tuning"]) as harness:
        assert harness.version == "2.0.0"
        first = harness.open()
        with pytest.raises(ModuleError, match="instance 2 refuses"):
            harness.open()
        with pytest.raises(ModuleError):
            first.call("weird")
        with pytest.raises(ModuleError):
            first.call("bad_event")
        with pytest.raises(WorkerCrashed, match="SystemExit\\(3\\)") as crashed:
            first.call("raise_system_exit")  # not an Exception: it ends a worker
        assert crashed.value.details["exception"] == "SystemExit"
        with pytest.raises(WorkerCrashed):
            harness.open()
    assert sys.path == path_before
    assert "ipa_hostile_h" not in sys.modules  # imported afresh by the next harness
    assert not [n for n in set(sys.modules) - modules_before if n.startswith("ipa_hostile")]


def test_a_call_past_its_timeout_is_timed_out_and_the_harness_still_closes() -> None:
    """A call that outlasts ``timeout`` raises TimedOut; closing waits for the host to finish."""
    with ModuleHarness(ECHO, timeout=0.5) as harness:
        inst = harness.open()
        with pytest.raises(TimedOut):
            inst.call("sleep", seconds=0.8)
    assert harness._thread is None


def test_a_new_harness_runs_the_module_as_edited(tmp_path: Path) -> None:
    """Each harness imports the module afresh, as a new worker does: an edit is seen at once."""
    manifest = write_file(
        tmp_path / "mods" / "edited.toml", _manifest("edited", "ipa_edited:Edited")
    )
    write_file(tmp_path / "tuning" / "edited" / "uncalibrated.toml", "")
    code = "from ipad.ipa import IPAModule\n\nclass Edited(IPAModule):\n    def value(self) -> int:\n        return {}\n"
    for value in (1, 22, 333):
        write_file(tmp_path / "mods" / "ipa_edited.py", code.format(value))
        with ModuleHarness(manifest, tuning_dirs=[tmp_path / "tuning"]) as harness:
            assert harness.open().call("value") == value


FLOOD = """
import threading

from ipad.ipa import IPAModule


class Flood(IPAModule):
    def burst(self, count: int) -> int:
        for n in range(count):
            self.context.emit("e", n)
        return count

    def later(self) -> None:
        threading.Thread(target=self.context.emit, args=("late", 1), daemon=True).start()
"""


def test_events_after_a_call_and_a_flood_of_events(tmp_path: Path) -> None:
    """An event sent after the call returned is seen; a flood closes the instance, saying why."""
    manifest = write_file(tmp_path / "mods" / "flood.toml", _manifest("flood", "ipa_flood:Flood"))
    write_file(tmp_path / "mods" / "ipa_flood.py", FLOOD)
    write_file(tmp_path / "tuning" / "flood" / "uncalibrated.toml", "")
    with ModuleHarness(manifest, tuning_dirs=[tmp_path / "tuning"]) as harness:
        late = harness.open()
        late.call("later")
        deadline = time.monotonic() + 10
        while not late.events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert late.events == [("late", 1)]
        # A worker drops a client that does not keep up with its events (its channel is
        # full): the harness, which reads them as a client does, is told so.
        flooded = harness.open()
        with pytest.raises(Disconnected, match="client does not read its channel"):
            flooded.call("burst", count=20_000)
        with pytest.raises(Disconnected, match="client does not read its channel"):
            flooded.call("later")
        assert late.call("later") is None  # the other instance is unharmed
