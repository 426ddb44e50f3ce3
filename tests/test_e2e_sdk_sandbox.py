"""A sandboxed third-party module uses the public tuning helpers, and sees what docs/modules.md says.

The module lives outside workers/modules, in a module directory of its own,
as a vendor's would; it is served by a real daemon under ``proxy =
"sandboxed"``. From inside its worker it reports what it can import: ipad's
public helpers, the daemon's Python environment, a package vendored in its
own directory, but not the shipped modules' ``ipa_modules`` nor a package on the
daemon's ``$PYTHONPATH``. A tuning file
with a misspelt key fails its start, with the key named in the error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ipad.client import BlockingClient, ModuleUnavailable
from tests.daemon_process import DaemonProcess, write_config

pytestmark = pytest.mark.timeout(60)

MODULE = '''
"""A third-party autofocus stand-in: reads its tuning with ipad.tuning, reports its imports."""

import importlib

import attrs

from ipad.ipa import IPAModule, ModuleContext
from ipad.tuning import Number, TuningError, read_tuning

__version__ = "0.3.0"


@attrs.frozen
class Lens:
    steps: int = attrs.field(default=100, validator=attrs.validators.ge(1))


@attrs.frozen
class Tuning:
    speed: float = 0.5
    lens: Lens = attrs.field(factory=Lens)


class Vendor(IPAModule):
    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        self.tuning = read_tuning(context.tuning, Tuning)
        assert issubclass(TuningError, ValueError) and Number(1.0).default == 1.0

    def settings(self) -> dict[str, float]:
        return {"speed": self.tuning.speed, "steps": self.tuning.lens.steps}

    def imports(self, names: list[str]) -> dict[str, str]:
        seen = {}
        for name in names:
            try:
                importlib.import_module(name)
                seen[name] = "ok"
            except Exception as exc:
                seen[name] = type(exc).__name__
        return seen
'''

MANIFEST = """\
name = "{name}"
version = "0.3.0"
api_version = 1
worker = "ipad-worker"
entry_point = "ipa_vendor:Vendor"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""

CONFIG = """
[daemon]
module_dirs = ["{modules}"]
"""

MODULES = """
[modules.vendor]
proxy = "sandboxed"
[modules.vendorbad]
proxy = "sandboxed"
[modules.vendorbad.restart]
restart = "never"    # failed, with its reason, rather than starting again and again
[modules.echo]
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.write_text(text)
    path.chmod(0o644)


def _vendor_tree(root: Path) -> tuple[Path, Path]:
    """A module directory with two manifests of one package, and a tuning directory."""
    modules, tuning = root / "vendor-modules", root / "vendor-tuning"
    for name in ("vendor", "vendorbad"):
        _write(modules / f"{name}.toml", MANIFEST.format(name=name))
    _write(modules / "ipa_vendor" / "__init__.py", MODULE)
    _write(modules / "vendored_dep" / "__init__.py", "VALUE = 1\n")
    _write(tuning / "vendor" / "uncalibrated.toml", "speed = 0.25\n[lens]\nsteps = 7\n")
    _write(tuning / "vendorbad" / "uncalibrated.toml", "[lens]\nstpes = 7\n")
    for directory in (root, modules, tuning):
        directory.chmod(0o755)
    return modules, tuning


def test_a_sandboxed_third_party_module_uses_the_public_tuning_helpers(
    tmp_path: Path,
    start_daemon: Callable[..., DaemonProcess],
    daemon_env: dict[str, str],
) -> None:
    """ipad.tuning imports in the sandbox and reads the file; a misspelt key fails the start."""
    modules, tuning = _vendor_tree(tmp_path / "tree")
    # A dependency on the daemon's $PYTHONPATH: workers run python -I, which ignores it.
    elsewhere = tmp_path / "tree" / "pythonpath"
    _write(elsewhere / "pythonpath_dep" / "__init__.py", "VALUE = 1\n")
    elsewhere.chmod(0o755)
    config = write_config(tmp_path, CONFIG.format(modules=modules), modules=MODULES)
    pythonpath = os.pathsep.join(filter(None, [str(elsewhere), daemon_env.get("PYTHONPATH")]))
    env = {**daemon_env, "IPAD_CONFIG_PATH": f"{tuning}:{daemon_env['IPAD_CONFIG_PATH']}",
           "PYTHONPATH": pythonpath}  # fmt: skip
    daemon = start_daemon(config, env=env)
    daemon.wait_for("worker.ready", lambda r: r.get("module") == "vendor")
    # Asked while its start still loads, vendorbad would answer "starting".
    daemon.wait_for("worker.start_failed", lambda r: r.get("module") == "vendorbad")
    with BlockingClient(daemon.socket) as client:
        vendor = client.request_proxy("vendor")
        assert vendor.call("settings") == {"speed": 0.25, "steps": 7}
        seen = vendor.call(
            "imports",
            {"names": ["ipad.tuning", "ipad.ipa", "attrs", "msgspec", "vendored_dep",
                       "ipa_modules.types", "ipad.testing", "pythonpath_dep"]},
        )  # fmt: skip
        # The daemon's Python environment and the module's own directory are in its view;
        # the shipped modules' directory is shown empty to it. (With awb or agc enabled,
        # a forked worker would find ipa_modules.types already imported by the fork
        # server's preload: docs/modules.md says not to rely on either outcome.)
        assert seen == {
            "ipad.tuning": "ok", "ipad.ipa": "ok", "attrs": "ok", "msgspec": "ok",
            "vendored_dep": "ok", "ipa_modules.types": "ModuleNotFoundError",
            "ipad.testing": "ok", "pythonpath_dep": "ModuleNotFoundError",
        }  # fmt: skip
        assert vendor.info.module_version == "0.3.0"  # __version__, as status shows it
        with pytest.raises(ModuleUnavailable, match=r"lens\.stpes") as refused:
            client.request_proxy("vendorbad")
        assert "did you mean 'lens.steps'" in str(refused.value)
    status = json.loads(daemon.ctl("--json", "status").stdout)["modules"]
    bad = status["vendorbad"]
    assert "lens.stpes" in (bad["reason"] or bad["last_failure_reason"])
    assert status["vendor"]["state"] == "running"
