"""``ipadctl new-module NAME DIR``: a module project to start from, with tests that pass.

It writes, under DIR (which must not exist, or be empty)::

    pyproject.toml                     pytest settings: where the module and tuning are
    NAME/NAME.toml                     the manifest (module directory: NAME/)
    NAME/ipa_NAME/__init__.py          the module: an IPAModule with __version__
    NAME/tuning/NAME/uncalibrated.toml its tuning file, where the daemon looks for it
    tests/test_NAME.py                 in-process tests (ipad.testing.ModuleHarness)
    tests/test_NAME_daemon.py          tests under a real daemon (the ipad_module fixture)

(``-`` in NAME becomes ``_`` in Python names.) The layout is docs/modules.md's
tutorial project's, so what the docs say applies as is. No daemon is needed.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

from ipad.config.manifest import MODULE_NAME

#: Exit statuses, as ipadctl's: 1 the project could not be written, 2 unusable arguments.
EXIT_FAILED = 1
EXIT_USAGE = 2

#: The version a new module starts at, in the manifest and in ``__version__``.
FIRST_VERSION = "0.1.0"

PYPROJECT = """\
# The $name IPA module's project. Its tests need ipad installed (pip install ipad),
# which brings the pytest plugin whose fixtures tests/test_${ident}_daemon.py uses.
[tool.pytest.ini_options]
testpaths = ["tests"]
# Where the ipad pytest plugin finds the module and its tuning files
# (docs/modules.md, "Testing under a real daemon").
ipad_module_dirs = ["$name"]
ipad_tuning_dirs = ["$name/tuning"]
"""

MANIFEST = """\
# The $name IPA module (docs/configuration.md, "Finding modules").
name = "$name"
version = "$version"          # keep equal to __version__ in $package/__init__.py
api_version = 1
worker = "ipad-worker"
entry_point = "$package:$cls"
description = "$name: describe what it does"

[pipeline]
handlers = ["simple"]        # the pipeline handlers it serves
min_version = 1
max_version = 1
"""

TUNING = """\
# $name tuning for a sensor nobody has calibrated yet; the values are the defaults.
# An unknown key or a bad value stops the module from starting, naming the key.

# Multiplies every estimate (a number > 0).
gain = 1.0
"""

MODULE = '''\
"""$name: an IPA module, started from ``ipadctl new-module``; say here what it does.

Calls, in the order a camera makes them: ``init(settings)``,
``configure(sensor_info)``, then ``process(frame, luminance)`` per frame.
Tuning keys (``tuning/$name/uncalibrated.toml``): ``gain``, a number > 0
(default 1.0) that multiplies every estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import msgspec
from ipad.ipa import IPAModule, ModuleContext, setup
from ipad.tuning import read_tuning

#: The module's version: the worker reports it (``ipadctl status``). Keep it equal to
#: the manifest's ``version``.
__version__ = "$version"


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The tuning file's keys, each optional; read_tuning refuses others, naming the key."""

    #: Multiplies every estimate.
    gain: Annotated[float, msgspec.Meta(gt=0)] = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``init`` takes: the brightness the estimate aims at, in [0, 1]."""

    target: float = 0.5


@dataclasses.dataclass(frozen=True)
class SensorInfo:
    """The sensor mode ``configure`` receives."""

    model: str
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What ``process`` returns for one frame."""

    frame: int
    correction: float


class $cls(IPAModule):
    """One instance per proxy: each camera's state is its own."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        self.gain = read_tuning(context.tuning, Tuning).gain
        self.settings = Settings()
        self.sensor: SensorInfo | None = None

    # The worker host converts each argument to the annotated type (a dict becomes a
    # Settings), so a module takes its own classes where the base class takes mappings.
    @setup
    def init(self, settings: Settings | None = None) -> None:  # type: ignore[override]
        """Start from ``settings`` (the defaults without)."""
        self.settings = Settings() if settings is None else settings

    @setup
    def configure(self, sensor_info: SensorInfo | None = None) -> None:  # type: ignore[override]
        """A new sensor mode."""
        self.sensor = sensor_info

    def process(self, frame: int, luminance: float) -> Estimate:
        """One frame's mean luminance in [0, 1]: the correction towards the target."""
        if self.sensor is None:
            raise RuntimeError("process before configure")
        return Estimate(frame, self.gain * (self.settings.target - luminance))
'''

HARNESS_TEST = '''\
"""$name in-process, with arguments and tuning as its worker has them.

ipad.testing.ModuleHarness converts arguments and reads the tuning file as the
worker host does, without a daemon.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ipad.client import ModuleError
from ipad.testing import ModuleHarness

PROJECT = Path(__file__).resolve().parent.parent
MANIFEST = PROJECT / "$name" / "$name.toml"
TUNING_DIRS = [PROJECT / "$name" / "tuning"]
SENSOR = {"model": "imx219", "width": 640, "height": 480}


def test_process_estimates_from_the_tuning() -> None:
    """init, configure, process: the correction is gain * (target - luminance)."""
    with ModuleHarness(
        MANIFEST, tuning="uncalibrated.toml", tuning_dirs=TUNING_DIRS
    ) as h:
        inst = h.open()
        inst.call("init", settings={"target": 0.5})
        inst.call("configure", sensor_info=SENSOR)
        result = inst.call("process", frame=1, luminance=0.25)
        assert result == {"frame": 1, "correction": 0.25}


def test_a_bad_tuning_value_stops_the_start(tmp_path: Path) -> None:
    """gain = 0: the module does not start, and the error names the key."""
    (tmp_path / "$name").mkdir()
    (tmp_path / "$name" / "bad.toml").write_text("gain = 0\\n")
    bad = ModuleHarness(MANIFEST, tuning="bad.toml", tuning_dirs=[tmp_path])
    with pytest.raises(ModuleError, match="tuning key 'gain'"), bad:
        pass
'''

DAEMON_TEST = '''\
"""$name under a real ipad daemon, sandboxed, as a camera uses it (fixture ipad_module)."""

from __future__ import annotations

import pytest
from ipad.client import ModuleError
from ipad.testing.pytest_plugin import ModuleUnderTest

SENSOR = {"model": "imx219", "width": 640, "height": 480}


def test_calls_reach_the_worker(ipad_module: ModuleUnderTest) -> None:
    """init, configure, process through a proxy: the worker converts and answers."""
    proxy = ipad_module.proxy()
    proxy.call("init", {"settings": {"target": 0.5}})
    proxy.call("configure", {"sensor_info": SENSOR})
    assert proxy.call("process", {"frame": 1, "luminance": 0.25}) == {
        "frame": 1,
        "correction": 0.25,
    }


def test_module_error_reaches_the_client(ipad_module: ModuleUnderTest) -> None:
    """process before configure fails with the module's message; the proxy lives on."""
    proxy = ipad_module.proxy()
    with pytest.raises(ModuleError, match="process before configure"):
        proxy.call("process", {"frame": 1, "luminance": 0.25})
    proxy.call("configure", {"sensor_info": SENSOR})
    assert proxy.call("process", {"frame": 2, "luminance": 0.5})["correction"] == 0.0


def test_status_shows_the_version(ipad_module: ModuleUnderTest) -> None:
    """ipadctl status shows the module running, with its __version__."""
    status = ipad_module.daemon.status()["modules"]["$name"]
    assert (status["state"], status["version"]) == ("running", "$version")
'''


def package_name(name: str) -> str:
    """The module's Python package: ``ipa_`` and the name, ``-`` as ``_``."""
    return "ipa_" + name.replace("-", "_")


def class_name(name: str) -> str:
    """The module's class: the name in CamelCase (``my-af`` -> ``MyAf``), starting with a letter."""
    words = name.replace("-", "_").split("_")
    joined = "".join(word[:1].upper() + word[1:] for word in words if word)
    return joined if joined[:1].isalpha() else "Ipa" + joined


def project_files(name: str) -> dict[str, str]:
    """Every file of the new project, by path relative to DIR."""
    ident = name.replace("-", "_")
    fields = {"name": name, "ident": ident, "package": package_name(name),
              "cls": class_name(name), "version": FIRST_VERSION}  # fmt: skip

    def fill(template: str) -> str:
        return string.Template(template).substitute(fields)

    return {
        "pyproject.toml": fill(PYPROJECT),
        f"{name}/{name}.toml": fill(MANIFEST),
        f"{name}/{package_name(name)}/__init__.py": fill(MODULE),
        f"{name}/tuning/{name}/uncalibrated.toml": fill(TUNING),
        f"tests/test_{ident}.py": fill(HARNESS_TEST),
        f"tests/test_{ident}_daemon.py": fill(DAEMON_TEST),
    }


class NewModuleError(Exception):
    """The project cannot be written; ``status`` is ipadctl's exit status for it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def write_project(name: str, directory: Path) -> list[Path]:
    """Write the project for module ``name`` into ``directory``; the files written."""
    if not MODULE_NAME.fullmatch(name):
        raise NewModuleError(
            f"invalid module name {name!r}: ASCII letters, digits, '_' and '-', "
            "starting with a letter or digit (as in a manifest)",
            EXIT_USAGE,
        )
    if directory.exists() and not directory.is_dir():
        raise NewModuleError(f"{directory} exists and is not a directory", EXIT_FAILED)
    if directory.is_dir() and any(directory.iterdir()):
        raise NewModuleError(f"{directory} is not empty: give a new or empty directory",
                             EXIT_FAILED)  # fmt: skip
    written = []
    for relative, text in project_files(name).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x") as out:  # never overwrite: the directory was empty
            out.write(text)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    """``ipadctl new-module NAME DIR``."""
    try:
        written = write_project(args.name, args.directory)
    except NewModuleError as exc:
        print(f"ipadctl: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:
        print(f"ipadctl: cannot write the project: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for path in written:
        print(path)
    print(f"module {args.name} in {args.directory}: run its tests with "
          f"'cd {args.directory} && python -m pytest'")  # fmt: skip
    return 0
