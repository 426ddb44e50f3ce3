"""Changed module code runs at the first restart, crash or reload (real daemons and workers).

A module ``af`` lives in a temporary module directory; the test edits its
code while its worker and standby run, then restarts it (``ipadctl restart``,
a SIGKILL, ``ipadctl reload``) and asks it which code it runs. Its directory is
trusted (its code preloaded by the fork server) or not, and its workers are
per module or per proxy. Every daemon stops cleanly (the fixture).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipad.client import BlockingClient
from ipad.config import code_identity
from tests.daemon_process import DaemonProcess, alive, wait_until

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., DaemonProcess]

MANIFEST = """\
name = "af"
version = "1.0.0"
api_version = 1
worker = "ipad-worker"
entry_point = "af_pkg.af:AF"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""

CODE = '''\
"""A module whose answer is the code it runs."""

import os

from ipad.ipa import IPAModule, ModuleContext

VALUE = 1


class AF(IPAModule):
    """Says VALUE, its tuning and its worker's pid."""

    def __init__(self, context: ModuleContext) -> None:
        super().__init__(context)
        self._tuning = context.tuning

    def tuning(self) -> str:
        """The ``value`` key of its tuning file."""
        return str(self._tuning.get("value", ""))

    def value(self) -> int:
        """The VALUE of the code this worker loaded."""
        return VALUE

    def pid(self) -> int:
        """The worker's pid."""
        return os.getpid()
'''

#: A module that rewrites its own file each time it is imported (hostile to identities).
SELF_REWRITING = CODE.replace(
    "VALUE = 1\n",
    "VALUE = 1\n\nwith open(__file__, 'a') as _me:\n    _me.write('# loaded\\n')\n",
)


class Module:
    """``af`` in a module directory of its own, and a config running it beside echo."""

    def __init__(self, root: Path, *, trusted: bool = False, isolation: str = "module",
                 code: str = CODE) -> None:  # fmt: skip
        self.root = root
        self.dir = root / "modules"
        (self.dir / "af_pkg").mkdir(parents=True)
        (self.dir / "af_pkg" / "__init__.py").write_text("")
        self.code = self.dir / "af_pkg" / "af.py"
        self.code.write_text(code)
        (self.dir / "af.toml").write_text(MANIFEST)
        self.tuning = root / "af-tuning.toml"
        self.tuning.write_text("")
        self.config = root / "config.toml"
        self.trusted = trusted
        self.isolation = isolation
        #: The shipped modules run sandboxed, as in the shipped config: their sandboxes hide
        #: every other module directory, so a module_dirs change touches their plans.
        self.sandboxed = False
        self.write_config()

    def write_config(
        self, extra_dirs: tuple[Path, ...] = (), tuning_dirs: tuple[Path, ...] | None = None
    ) -> None:
        """The daemon's config: af (and its directory, plus ``extra_dirs``), echo, awb, agc."""
        dirs = ", ".join(f'"{d}"' for d in (self.dir, *extra_dirs))
        if tuning_dirs is not None:
            dirs += "]\ntuning_dirs = [" + ", ".join(f'"{d}"' for d in tuning_dirs)
        trusted = f'trusted_module_dirs = ["{self.dir}"]\n' if self.trusted else ""
        kind = 'proxy = "sandboxed"\n' if self.sandboxed else ""
        self.config.write_text(
            f"[daemon]\nmodule_dirs = [{dirs}]\n{trusted}"
            f'[modules.af]\nisolation = "{self.isolation}"\n{kind}'
            + "".join(f"[modules.{name}]\n{kind}" for name in ("echo", "awb", "agc"))
        )

    def env(self, daemon_env: dict[str, str]) -> dict[str, str]:
        """The daemon's environment: af's tuning file."""
        return {**daemon_env, "IPAD_AF_TUNING_FILE": str(self.tuning)}

    def edit(self, value: int) -> None:
        """Make the module's code answer ``value``."""
        text = self.code.read_text()
        self.code.write_text(text.replace("VALUE = ", f"VALUE = {value}  # was ", 1))


def status(daemon: DaemonProcess, module: str = "af") -> dict[str, Any]:
    """One module's entry of ``ipadctl status --json``."""
    return dict(json.loads(daemon.ctl("status", "--json", check=False).stdout)["modules"][module])


def value_of_new_proxy(daemon: DaemonProcess) -> int:
    """What a fresh proxy to af answers."""
    with BlockingClient(daemon.socket) as client:
        answer: int = client.request_proxy("af").call("value")
        return answer


def wait_standby(daemon: DaemonProcess) -> dict[str, Any]:
    """The status of af once its standby is loaded."""
    wait_until(lambda: status(daemon)["standby_code_id"] is not None)
    return status(daemon)


@pytest.mark.parametrize("trusted", [False, True], ids=["imported", "preloaded"])
def test_restart_after_an_edit_runs_the_new_code_the_first_time(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], trusted: bool
) -> None:
    """``ipadctl restart`` after an edit: the stale standby is discarded, the new code answers."""
    module = Module(tmp_path, trusted=trusted)
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("af")
        assert proxy.call("value") == 1
        before = wait_standby(daemon)
        assert before["code_id"].startswith("sha256:")
        assert before["standby_code_id"] == before["code_id"]
        module.edit(2)
        daemon.ctl("restart", "af")
        assert proxy.call("value") == 2  # the same proxy, recovered onto the new code
        after = status(daemon)
        assert after["code_id"] != before["code_id"]
        assert after["worker_pid"] != before["standby_pid"]  # not the promoted standby
        stale = daemon.wait_for("worker.standby_stale", lambda r: r.get("module") == "af")
        assert stale["code_id"] == after["code_id"]
        assert stale["standby_code"] == before["code_id"]
        if trusted:  # the fork server's copy was stale too: spawned, and the server renewed
            daemon.wait_for("worker.preload_stale", lambda r: r.get("module") == "af")
            daemon.wait_for("forkserver.replaced")
        # The next standby loads the new code, and is promoted as before.
        assert wait_standby(daemon)["standby_code_id"] == after["code_id"]
        assert status(daemon, "echo")["state"] == "running"


@pytest.mark.parametrize("trusted", [False, True], ids=["imported", "preloaded"])
def test_a_crash_after_an_edit_runs_the_new_code(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str], trusted: bool
) -> None:
    """A crash restart after an edit does not promote the stale standby; unedited, it does."""
    module = Module(tmp_path, trusted=trusted)
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("af")
        first = wait_standby(daemon)
        os.kill(first["worker_pid"], signal.SIGKILL)  # unedited: the standby takes over
        wait_until(lambda: status(daemon)["worker_pid"] == first["standby_pid"])
        assert proxy.call("value") == 1
        second = wait_standby(daemon)
        module.edit(3)
        os.kill(second["worker_pid"], signal.SIGKILL)
        assert proxy.call("value") == 3
        third = status(daemon)
        assert third["worker_pid"] != second["standby_pid"]
        wait_until(lambda: not alive(second["standby_pid"]))  # the stale standby is reaped


def test_reload_restarts_exactly_the_module_whose_code_changed(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """An edit, an unchanged config: reload restarts af alone and says "code_changed"."""
    module = Module(tmp_path)
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    others = {name: status(daemon, name)["worker_pid"] for name in ("echo", "awb", "agc")}
    assert value_of_new_proxy(daemon) == 1
    quiet = json.loads(daemon.ctl("reload", "--json").stdout)
    assert quiet["changed"] == []
    assert quiet["code_changed"] == []
    module.edit(4)
    result = json.loads(daemon.ctl("reload", "--json").stdout)
    assert result["changed"] == ["af"]
    assert result["code_changed"] == ["af"]
    assert "af" not in result["unchanged"]
    logged = daemon.wait_for("daemon.code_changed")
    assert logged["modules"] == ["af"]
    assert value_of_new_proxy(daemon) == 4
    assert {name: status(daemon, name)["worker_pid"] for name in others} == others


def test_a_module_dirs_change_restarts_no_module_whose_code_is_the_same(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """Adding a module directory on reload leaves the shipped modules' and af's workers alone."""
    module = Module(tmp_path)
    module.sandboxed = True
    module.write_config()
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    assert status(daemon, "awb")["proxy_kind"] == "sandboxed"
    names = ("af", "echo", "awb", "agc")
    before = {name: status(daemon, name)["worker_pid"] for name in names}
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    module.write_config(extra_dirs=(vendor,))
    result = json.loads(daemon.ctl("reload", "--json").stdout)
    assert result["changed"] == []
    assert sorted(result["unchanged"]) == sorted(names)
    assert {name: status(daemon, name)["worker_pid"] for name in names} == before
    # Moving af to another directory restarts af, and only af.
    (module.dir / "af.toml").rename(vendor / "af.toml")
    (module.dir / "af_pkg").rename(vendor / "af_pkg")
    result = json.loads(daemon.ctl("reload", "--json").stdout)
    assert result["changed"] == ["af"]
    assert value_of_new_proxy(daemon) == 1
    after = {name: status(daemon, name)["worker_pid"] for name in names}
    assert after["af"] != before["af"]
    assert {n: after[n] for n in names[1:]} == {n: before[n] for n in names[1:]}


def test_per_proxy_workers_show_their_code_and_new_proxies_get_the_edit(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """Per-proxy workers show their code_id; a spare loaded before an edit is replaced."""
    module = Module(tmp_path, isolation="proxy")
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    with BlockingClient(daemon.socket) as client:
        old = client.request_proxy("af")
        assert old.call("value") == 1
        wait_until(lambda: status(daemon)["code_id"] is not None)  # the next spare is loaded
        before = status(daemon)
        assert [w["code_id"] for w in before["workers"]] == [before["code_id"]]
        module.edit(5)
        new = client.request_proxy("af")
        assert new.call("value") == 5
        assert old.call("value") == 1  # a running proxy's worker is not restarted behind it
        daemon.wait_for("worker.standby_stale", lambda r: r.get("isolation") == "proxy")
        codes = {w["proxy_id"]: w["code_id"] for w in status(daemon)["workers"]}
        assert len(set(codes.values())) == 2
        assert before["code_id"] in codes.values()
        # The old proxy's worker crashes: its restart loads the code on disk.
        os.kill(old.call("pid"), signal.SIGKILL)
        assert old.call("value") == 5
        assert len({w["code_id"] for w in status(daemon)["workers"]}) == 1


def test_a_module_that_rewrites_itself_as_it_loads_is_never_promoted_stale(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """Its files move during every load: no code identity, its standby is never promoted.

    The daemon keeps serving it (each restart loads a fresh worker) and everything else.
    """
    module = Module(tmp_path, code=SELF_REWRITING)
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("af")
        assert proxy.call("value") == 1
        daemon.wait_for("worker.code_changed_during_load", lambda r: r.get("module") == "af")
        wait_until(lambda: status(daemon)["standby_pid"] is not None)
        first = status(daemon)
        assert first["standby_code_id"] is None
        daemon.ctl("restart", "af")
        assert proxy.call("value") == 1
        assert status(daemon)["worker_pid"] != first["standby_pid"]
        assert status(daemon, "echo")["state"] == "running"


def test_tuning_dirs_added_on_reload_restart_only_the_module_whose_tuning_changed(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A vendor tuning directory put first in ``tuning_dirs``: af restarts onto its file, alone."""
    module = Module(tmp_path)
    module.sandboxed = True  # the sandbox binds the resolved tuning file, hides the others
    first, vendor = tmp_path / "tuning1", tmp_path / "vendor"
    for directory, value in ((first, "one"), (vendor, "two")):
        (directory / "af").mkdir(parents=True)
        (directory / "af" / "uncalibrated.toml").write_text(f'value = "{value}"\n')
    module.write_config(tuning_dirs=(first,))
    daemon = start_daemon(module.config, env=daemon_env)  # no $IPAD_AF_TUNING_FILE
    with BlockingClient(daemon.socket) as client:
        assert client.request_proxy("af").call("tuning") == "one"
    assert status(daemon)["tuning"] == str(first / "af" / "uncalibrated.toml")
    names = ("echo", "awb", "agc")
    before = {name: status(daemon, name)["worker_pid"] for name in names}
    module.write_config(tuning_dirs=(vendor, first))
    result = json.loads(daemon.ctl("reload", "--json").stdout)
    assert result["changed"] == ["af"]
    assert result["code_changed"] == []
    with BlockingClient(daemon.socket) as client:
        assert client.request_proxy("af").call("tuning") == "two"
    assert status(daemon)["tuning"] == str(vendor / "af" / "uncalibrated.toml")
    assert {name: status(daemon, name)["worker_pid"] for name in names} == before
    # Taken away again, and none left: the reload fails, naming every try, key and variables.
    module.write_config(tuning_dirs=())
    failed = daemon.ctl("reload", check=False)
    assert failed.returncode != 0
    said = failed.stdout + failed.stderr
    assert "no tuning file found" in said
    assert "[daemon] tuning_dirs" in said
    assert "$IPAD_CONFIG_PATH" in said
    assert "$IPAD_AF_TUNING_FILE" in said
    with BlockingClient(daemon.socket) as client:
        assert client.request_proxy("af").call("tuning") == "two"  # the old config runs on


def test_a_module_past_the_hashing_bounds_runs_without_an_identity(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """A huge package: one clear error, no code_id, spawned not forked, no fork-server churn."""
    module = Module(tmp_path, trusted=True)
    for index in range(code_identity.MAX_FILES + 1):
        (module.dir / "af_pkg" / f"f{index}.py").write_text("")
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("af")
        assert proxy.call("value") == 1
        error = daemon.wait_for("module.code_too_large", lambda r: r.get("module") == "af")
        assert f"more than {code_identity.MAX_FILES} files" in error["error"]
        assert str(module.dir / "af_pkg") in error["error"]
        first = status(daemon)
        assert first["code_id"] is None
        assert f"more than {code_identity.MAX_FILES} files" in first["code_error"]
        daemon.ctl("restart", "af")
        assert proxy.call("value") == 1
        os.kill(status(daemon)["worker_pid"], signal.SIGKILL)
        assert proxy.call("value") == 1
        assert len(daemon.events("module.code_too_large")) == 1  # said once, not per start
        assert daemon.events("forkserver.renewing") == []
        assert status(daemon, "echo")["state"] == "running"


def test_reload_restarts_a_per_proxy_module_whose_code_changed(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """Per-proxy workers that loaded the old code: reload restarts the module, proxies recover."""
    module = Module(tmp_path, isolation="proxy")
    daemon = start_daemon(module.config, env=module.env(daemon_env))
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("af")
        assert proxy.call("value") == 1
        assert json.loads(daemon.ctl("reload", "--json").stdout)["code_changed"] == []
        module.edit(6)
        result = json.loads(daemon.ctl("reload", "--json").stdout)
        assert result["code_changed"] == ["af"]
        assert proxy.call("value") == 6
