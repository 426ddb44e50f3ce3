"""ipad.testing.daemon and the pytest plugin: a real daemon for a module's tests, and its end.

The plugin is tested the way a module author uses it: a project in a temporary
directory, its own tests run by a pytest subprocess (bounded), which finds the
fixtures through the installed entry point. Each inner test writes down the
processes its daemon started; afterwards none of them may be alive, whatever
the inner test did (pass, fail, kill or freeze the daemon).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio

import ipad.testing.pytest_plugin
from ipad.client import BlockingClient, open_client
from ipad.testing.daemon import (
    DaemonStartError,
    DaemonStopError,
    prepare_daemon,
    run_daemon,
    write_config,
)
from tests import conftest
from tests.daemon_process import TEST_MODULES
from tests.privileges import NOBODY, as_user, needs_setpriv, user_install

pytestmark = pytest.mark.timeout(120)

#: The bound of one inner pytest run (it starts a daemon or two, each in about a second).
INNER_TIMEOUT = 90

MANIFEST = """\
name = "af"
version = "0.2.0"
api_version = 1
worker = "ipad-worker"
entry_point = "ipa_af:Af"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""

MODULE = """\
__version__ = "0.2.0"

from ipad.ipa import IPAModule


class Af(IPAModule):
    def position(self, distance: float) -> float:
        return round(self.context.tuning["scale"] * distance, 3)
"""

#: What each inner test leaves for the outer one: its daemon and what the daemon started.
RECORD = '''
import json, os


def record(daemon):
    """Append the daemon's pid, cgroups and started processes to $$IPAD_TEST_RECORD."""
    cgroups = [r["cgroup"] for r in daemon.records("cgroup.ready")]
    entry = {"pid": daemon.pid, "started": daemon.started_processes(), "cgroups": cgroups,
             "runtime_dir": str(daemon.runtime_dir), "test": os.environ["PYTEST_CURRENT_TEST"]}
    with open(os.environ["IPAD_TEST_RECORD"], "a") as out:
        out.write(json.dumps(entry) + "\\n")
'''


def make_project(root: Path, tests: str, ini: str = "") -> Path:
    """A module project "af" (module dir af/, tuning af/tuning) with ``tests`` as its test file."""
    (root / "af" / "ipa_af").mkdir(parents=True)
    (root / "af" / "af.toml").write_text(MANIFEST)
    (root / "af" / "ipa_af" / "__init__.py").write_text(MODULE)
    (root / "af" / "tuning" / "af").mkdir(parents=True)
    (root / "af" / "tuning" / "af" / "uncalibrated.toml").write_text("scale = 2.5\n")
    (root / "tests").mkdir()
    (root / "tests" / "record.py").write_text(RECORD.replace("$$", "$"))
    (root / "tests" / "test_af.py").write_text(textwrap.dedent(tests))
    (root / "pytest.ini").write_text(f"[pytest]\n{ini}\n")
    return root


def run_inner(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The project's tests in a pytest subprocess, with a clean environment, bounded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
    env["IPAD_TEST_RECORD"] = str(project / "record.jsonl")
    env["PYTHONPATH"] = str(project / "tests")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=60",
         "--rootdir", str(project), *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=INNER_TIMEOUT, check=False,
    )  # fmt: skip


def recorded(project: Path) -> list[dict[str, Any]]:
    path = project / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


def assert_nothing_left(entries: list[dict[str, Any]]) -> None:
    """No daemon, worker or fork server the inner tests recorded is alive; no cgroup is left."""
    assert entries, "the inner tests recorded no daemon"
    for entry in entries:
        assert _start_time(entry["pid"]) is None, f"daemon {entry['pid']} left"
        assert entry["started"], "the daemon's log named no process it started"
        for pid, start in entry["started"].items():
            assert _start_time(int(pid)) != start, f"process {pid} of daemon {entry['pid']} left"
        for cgroup in entry["cgroups"]:
            assert not Path(cgroup).exists(), f"cgroup {cgroup} left"
        if "pytest_dies" not in entry["test"]:
            assert not Path(entry["runtime_dir"]).exists(), "runtime directory left"


def outcome(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def test_plugin_is_installed_with_the_package() -> None:
    """`pip install ipad` registers the plugin under pytest11, so no conftest is needed."""
    points = importlib.metadata.entry_points(group="pytest11")
    assert {p.name: p.value for p in points}.get("ipad") == "ipad.testing.pytest_plugin"


def test_plugin_fixtures_do_not_clash_with_the_suites(pytestconfig: pytest.Config) -> None:
    """The plugin is loaded in this suite too; its fixtures are ipad_*, none of the suite's."""
    assert pytestconfig.pluginmanager.get_plugin("ipad") is ipad.testing.pytest_plugin
    fixtures = {"ipad_daemon", "ipad_module", "ipad_project"}
    assert fixtures <= set(vars(ipad.testing.pytest_plugin))
    assert not fixtures & set(vars(conftest))


def test_module_test_passes_and_leaves_nothing(tmp_path: Path) -> None:
    """ipad_module runs the project's module sandboxed; calls see its tuning; all is reaped."""
    project = make_project(tmp_path, """
        from record import record

        def test_position(ipad_module):
            record(ipad_module.daemon)
            assert ipad_module.name == "af"
            assert ipad_module.proxy().call("position", {"distance": 2}) == 5.0
            status = ipad_module.daemon.status()["modules"]["af"]
            assert (status["state"], status["version"], status["proxy_kind"]) == (
                "running", "0.2.0", "sandboxed")
            assert "af" in ipad_module.daemon.ctl("status", "af").stdout

        def test_factory(ipad_daemon, ipad_project):
            daemon = ipad_daemon(module_dirs=ipad_project.module_dirs, modules={"af": {}},
                                 tuning_dirs=ipad_project.tuning_dirs)
            record(daemon)
            assert daemon.proxy("af").call("position", {"distance": 1}) == 2.5
    """)  # fmt: skip
    result = run_inner(project)
    assert result.returncode == 0, outcome(result)
    assert "2 passed" in result.stdout
    assert_nothing_left(recorded(project))


def test_module_crashing_at_start_is_a_clear_error(tmp_path: Path) -> None:
    """A module whose import fails errors the test with the daemon's reason, not a timeout."""
    project = make_project(tmp_path, """
        def test_never_runs(ipad_module):
            raise AssertionError("the module did not start: this must not run")
    """, ini=f"ipad_module_dirs = {TEST_MODULES}\nipad_tuning_dirs = {TEST_MODULES / 'tuning'}"
             "\nipad_modules = broken")  # fmt: skip
    result = run_inner(project)
    assert result.returncode == 1, outcome(result)
    assert "1 error" in result.stdout, outcome(result)
    assert "module broken did not start: cannot load ipad_test_modules.broken:Broken" in (
        result.stdout
    )
    assert "needs a library that is not installed" in result.stdout
    assert "this must not run" not in result.stdout


def test_failing_test_body_still_reaps_everything(tmp_path: Path) -> None:
    """A test that fails mid-way fails as itself; the daemon still stops and nothing is left."""
    project = make_project(tmp_path, """
        from record import record

        def test_fails(ipad_module):
            record(ipad_module.daemon)
            ipad_module.proxy().call("position", {"distance": 1})
            raise AssertionError("the test's own failure")
    """)  # fmt: skip
    result = run_inner(project)
    assert result.returncode == 1, outcome(result)
    assert "1 failed" in result.stdout
    assert "error" not in result.stdout.splitlines()[-1]  # the stop was clean
    assert "the test's own failure" in result.stdout
    assert_nothing_left(recorded(project))


def test_daemon_killed_mid_test_errors_and_leaves_nothing(tmp_path: Path) -> None:
    """A daemon SIGKILLed under a test errors at teardown, naming it; kill() on purpose does not."""
    project = make_project(tmp_path, """
        import os, signal
        from record import record

        def test_daemon_dies(ipad_module):
            record(ipad_module.daemon)
            ipad_module.proxy().call("position", {"distance": 1})
            os.kill(ipad_module.daemon.pid, signal.SIGKILL)

        def test_killed_on_purpose(ipad_module):
            record(ipad_module.daemon)
            ipad_module.daemon.kill()
    """)  # fmt: skip
    result = run_inner(project)
    assert result.returncode == 1, outcome(result)
    assert "2 passed, 1 error" in result.stdout, outcome(result)
    assert "ERROR at teardown of test_daemon_dies" in result.stdout
    assert "died during the test or its stop (killed by SIGKILL)" in result.stdout
    assert_nothing_left(recorded(project))


def test_daemon_that_does_not_stop_is_killed_and_reported(tmp_path: Path) -> None:
    """A frozen daemon (SIGSTOP) misses its stop bound: the test errors, everything is reaped."""
    project = make_project(tmp_path, """
        import os, signal
        from record import record

        def test_daemon_frozen(ipad_daemon, ipad_project):
            daemon = ipad_daemon(module_dirs=ipad_project.module_dirs, modules=["af"],
                                 tuning_dirs=ipad_project.tuning_dirs, stop_timeout=1.0)
            record(daemon)
            os.kill(daemon.pid, signal.SIGSTOP)
    """)  # fmt: skip
    result = run_inner(project)
    assert result.returncode == 1, outcome(result)
    assert "1 passed, 1 error" in result.stdout, outcome(result)
    assert "it had not exited 1.0 s after SIGTERM (killed)" in result.stdout
    assert_nothing_left(recorded(project))


def test_run_daemon_serves_both_clients_and_ctl(tmp_path: Path) -> None:
    """run_daemon's socket serves the blocking and the trio client and ipadctl; the stop is clean."""
    with run_daemon(module_dirs=[], modules=["echo"], log_dir=tmp_path) as daemon:
        with daemon.client() as client:
            assert client.request_proxy("echo").call("echo", {"text": "b"}) == {"text": "b"}

        async def trio_call() -> Any:
            async with open_client(daemon.socket) as client:
                echo = await client.request_proxy("echo")
                return await echo.call("echo", {"text": "t"})

        assert trio.run(trio_call) == {"text": "t"}
        assert json.loads(daemon.ctl("--json", "status").stdout)["modules"]["echo"]["state"] == (
            "running"
        )
        started = daemon.started_processes()
        socket = daemon.socket
    assert daemon.records("daemon.stopped")
    assert all(_start_time(pid) != start for pid, start in started.items())
    assert not socket.exists()
    assert (tmp_path / "ipad-daemon.log").exists()  # kept where the test asked


def test_environment_cannot_steer_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's IPAD_SOCKET, IPAD_MODULE_PATH and NOTIFY_SOCKET do not reach the daemon."""
    monkeypatch.setenv("IPAD_SOCKET", str(tmp_path / "elsewhere.sock"))
    monkeypatch.setenv("IPAD_MODULE_PATH", str(TEST_MODULES))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    daemon = prepare_daemon(module_dirs=[], modules=["echo"])
    try:
        assert "IPAD_MODULE_PATH" not in daemon.env
        assert "NOTIFY_SOCKET" not in daemon.env
        assert daemon.env["IPAD_SOCKET"] == str(daemon.socket)
        daemon.start()
        with BlockingClient(daemon.socket) as client:
            assert "broken" not in client.modules()  # a test module: only on IPAD_MODULE_PATH
        assert not (tmp_path / "elsewhere.sock").exists()
    finally:
        daemon.stop()


def test_daemon_never_started_leaves_no_runtime_directory() -> None:
    """A daemon prepared but never started is stopped without error, its directory removed."""
    daemon = prepare_daemon(module_dirs=[], modules=["echo"])
    assert daemon.config.exists()
    daemon.stop()
    assert not daemon.runtime_dir.exists()


def test_start_failure_of_the_daemon_names_the_problem(tmp_path: Path) -> None:
    """A configuration the daemon refuses is a DaemonStartError with its message, nothing left."""
    with pytest.raises(DaemonStartError, match="unknown proxy kind 'jail'"):  # noqa: SIM117
        with run_daemon(module_dirs=[], modules={"echo": {"proxy": "jail"}}, log_dir=tmp_path):
            pass


def test_stop_error_after_a_daemon_died(tmp_path: Path) -> None:
    """stop() of a daemon that died reports it as a DaemonStopError, after reaping."""
    daemon = prepare_daemon(module_dirs=[], modules=["echo"], log_dir=tmp_path).start()
    started = daemon.started_processes()
    os.kill(daemon.pid, signal.SIGKILL)
    with pytest.raises(
        DaemonStopError, match=r"died during the test or its stop \(killed by SIGKILL\)"
    ):
        daemon.stop()
    assert all(_start_time(pid) != start for pid, start in started.items())


def test_generated_config_is_valid(tmp_path: Path) -> None:
    """write_config's TOML (odd paths, nested tables) passes the daemon's own --check-config."""
    odd = tmp_path / 'dir "with" quotes'
    odd.mkdir()
    config = write_config(
        tmp_path / "config.toml",
        module_dirs=[odd, TEST_MODULES],
        modules={"echo": {"restart": {"max_failures": 3, "call_timeout": "2s"}, "env": ["LANG"]},
                 "probe": {"enabled": False}},
        extra='[restart]\nstop_timeout = "1s"',
    )  # fmt: skip
    data = tomllib.loads(config.read_text())
    assert data["daemon"]["module_dirs"] == [str(odd), str(TEST_MODULES)]
    assert data["modules"]["echo"]["restart"] == {"max_failures": 3, "call_timeout": "2s"}
    result = subprocess.run(
        [sys.executable, "-m", "ipad", "--check-config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "IPAD_CONFIG_PATH": str(TEST_MODULES / "tuning")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(ValueError, match="invalid module name 'a/b'"):
        write_config(tmp_path / "bad.toml", module_dirs=[], modules={"a/b": {}})


def test_extra_config_merges_with_the_generated_tables(tmp_path: Path) -> None:
    """extra_config may set keys of the tables write_config writes itself ([signatures], [daemon])."""
    key = tmp_path / "vendor.pub"
    config = write_config(
        tmp_path / "config.toml",
        module_dirs=[TEST_MODULES],
        modules={"echo": {"tuning": "echo.toml"}},
        trusted_keys=[key],
        extra='[signatures]\nrequire_signature = true\n[daemon]\nlog_level = "debug"\n'
        '[modules.echo]\ntuning = "other.toml"\nrestart = { max_failures = 2 }\n',
    )
    data = tomllib.loads(config.read_text())
    assert data["signatures"] == {"trusted_keys": [str(key)], "require_signature": True}
    assert data["daemon"] == {"module_dirs": [str(TEST_MODULES)], "log_level": "debug"}
    assert data["modules"]["echo"] == {
        "tuning": "echo.toml", "restart": {"max_failures": 2}, "proxy": "sandboxed"
    }  # fmt: skip
    with pytest.raises(ValueError, match="extra configuration is not valid TOML"):
        write_config(tmp_path / "bad.toml", module_dirs=[], modules={}, extra="[daemon")


#: run_daemon as another user: the probe module's report and what the daemon started.
AS_NOBODY = """
import json, sys
from ipad.testing.daemon import run_daemon

modules = sys.argv[1]
with run_daemon(module_dirs=[modules], modules=["probe"], tuning_dirs=[modules + "/tuning"]) as d:
    report = d.proxy("probe").call("report")
    status = d.status()["modules"]["probe"]
    started = d.started_processes()
print(json.dumps({"uid": report["uid"], "pid": report["pid"], "state": status["state"],
                  "kind": status["proxy_kind"], "started": started}))
"""


@needs_setpriv
def test_run_daemon_as_an_unprivileged_user() -> None:
    """As nobody, the same generated configuration runs a sandboxed module and stops cleanly."""
    install = user_install()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
    result = subprocess.run(
        [*as_user(), sys.executable, "-c", AS_NOBODY, str(install.test_modules)],
        env=env, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert (out["uid"], out["state"], out["kind"]) == (NOBODY, "running", "sandboxed")
    assert out["pid"] == 1  # its own PID namespace: the sandbox is in force, not skipped
    assert all(_start_time(int(pid)) != start for pid, start in out["started"].items())


def processes_named(name: str) -> list[int]:
    """The live processes whose comm is ``name``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name and _start_time(int(entry.name)):
                    found.append(int(entry.name))
    return found


@pytest.mark.parametrize("proxy", ["isolated", "sandboxed"])
def test_escaped_grandchild_is_reaped_after_the_daemon_is_killed(proxy: str) -> None:
    """A module's grandchild that left its group and session is gone after a SIGKILLed daemon."""
    marker = f"ipt-esc-{os.getpid() % 100000}"
    daemon = prepare_daemon(module_dirs=[TEST_MODULES], modules=["hostile"], proxy=proxy,
                            tuning_dirs=[TEST_MODULES / "tuning"]).start()  # fmt: skip
    try:
        escapee = daemon.proxy("hostile").call("escape", {"marker": marker})
        assert escapee > 0
        assert processes_named(marker), "the module's grandchild did not start"
        os.kill(daemon.pid, signal.SIGKILL)
        with pytest.raises(DaemonStopError, match="killed by SIGKILL"):
            daemon.stop()
    finally:
        daemon.cleanup()
    assert processes_named(marker) == []


def test_daemon_stops_when_the_test_process_dies(tmp_path: Path) -> None:
    """A pytest SIGKILLed mid-test (no teardown at all): its daemon stops by itself, and all of it."""
    project = make_project(tmp_path, """
        import os, signal
        from record import record

        def test_pytest_dies(ipad_module):
            record(ipad_module.daemon)
            ipad_module.proxy().call("position", {"distance": 1})
            os.kill(os.getpid(), signal.SIGKILL)
    """)  # fmt: skip
    result = run_inner(project)
    assert result.returncode == -signal.SIGKILL, outcome(result)
    [entry] = recorded(project)
    deadline = time.monotonic() + 30
    while _start_time(entry["pid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_nothing_left([entry])
    # Nobody was left to remove it; the daemon removed its socket when it stopped.
    runtime_dir = Path(entry["runtime_dir"])
    assert not (runtime_dir / "ipad.sock").exists()
    shutil.rmtree(runtime_dir)


def test_signed_module_needs_its_key(tmp_path: Path) -> None:
    """A signed module's daemon refuses it without the key, with a hint; ipad_trusted_keys fixes it."""
    project = make_project(tmp_path, """
        def test_position(ipad_module):
            assert ipad_module.proxy().call("position", {"distance": 2}) == 5.0
    """)  # fmt: skip
    for args in (["keygen", "vendor.pem", "vendor.pub"], ["sign", "af", "--key", "vendor.pem"]):
        subprocess.run([sys.executable, "-m", "ipad.cli.ctl", *args], cwd=project, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
    assert (project / "af" / "af.toml.sig").exists()
    refused = run_inner(project)
    assert refused.returncode == 1, outcome(refused)
    assert "which is not a trusted key" in refused.stdout
    assert "ini option ipad_trusted_keys" in refused.stdout
    (project / "pytest.ini").write_text("[pytest]\nipad_trusted_keys = vendor.pub\n")
    result = run_inner(project)
    assert result.returncode == 0, outcome(result)
    assert "1 passed" in result.stdout


def test_signature_start_failures_hint_at_their_own_fix(tmp_path: Path) -> None:
    """A stale signature hints at signing again, a missing one under require_signature at signing."""
    project = make_project(tmp_path, "")
    for args in (["keygen", "vendor.pem", "vendor.pub"], ["sign", "af", "--key", "vendor.pem"]):
        subprocess.run([sys.executable, "-m", "ipad.cli.ctl", *args], cwd=project, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
    module = project / "af" / "ipa_af" / "__init__.py"
    module.write_text(MODULE + "# edited after signing\n")
    dirs, tuning = [project / "af"], [project / "af" / "tuning"]
    keys = [project / "vendor.pub"]
    with pytest.raises(DaemonStartError) as stale, run_daemon(module_dirs=dirs, tuning_dirs=tuning,
                                                              modules=["af"], trusted_keys=keys):  # fmt: skip
        pass
    assert "tampered" in str(stale.value)
    assert "sign the module again" in str(stale.value)
    assert "ipad_trusted_keys" not in str(stale.value)
    (project / "af" / "af.toml.sig").unlink()
    required = "[signatures]\nrequire_signature = true\n"
    with pytest.raises(DaemonStartError) as unsigned, run_daemon(module_dirs=dirs, tuning_dirs=tuning,
                                                                 modules=["af"], extra_config=required):  # fmt: skip
        pass
    assert "not signed" in str(unsigned.value)
    assert "hint: signatures are required" in str(unsigned.value)


def test_loading_the_plugin_stays_light() -> None:
    """Loading the plugin, which pytest does in every session, imports no trio, client or daemon code."""
    heavy = ("trio", "structlog", "ipad.client", "ipad.daemon", "ipad.testing.daemon")
    code = (
        f"import sys, ipad.testing.pytest_plugin; print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=True)  # fmt: skip
    assert result.stdout.strip() == "[]"
