"""Sandboxed workers, proven from inside: the probe module reports what it sees and tries to escape.

Every measure the configuration asks for is checked against what the worker
itself reads (/proc/self/status, its limits, interfaces, descriptors,
environment and mounts) and against what ``ipadctl --json status`` reads from
outside. Each escape attempt is stopped, the daemon reports what it saw, and
the daemon and the other modules carry on. As root (CI) the worker drops to
``nobody``; as an unprivileged user it gets a user namespace instead
(tests/privileges.py's way of becoming nobody).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.config.sandbox_plan import memory_support
from tests.daemon_process import TEST_MODULES, DaemonProcess, of_module, write_config
from tests.privileges import NOBODY, as_user, user_install
from tests.test_e2e_unprivileged import nobody_dir, nobody_env

__all__ = ["nobody_dir", "nobody_env"]  # fixtures, used by name

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="the root path runs in CI as root; see below"),
]

Start = Callable[..., DaemonProcess]

#: The probe's limits: small enough to hit, large enough for a Python worker.
SANDBOX = """
[daemon]
module_dirs = ["{modules}"]

[sandbox]
address_space = "1G"
open_files = 64
processes = 16
oom_score_adj = 700
{extra}
"""

MODULES = """
[modules.probe]
proxy = "sandboxed"
env = ["LANG"]
[modules.probe.sandbox]
memory_max = "64M"
{probe_extra}
[modules.probe2]
proxy = "sandboxed"
[modules.probe2.sandbox]
address_space = "256M"
[modules.echo]
"""

#: Every memory limit needs a memory controller: CI here has cgroup v1's, as root.
MEMORY = memory_support().version is not None


def sandbox_config(
    directory: Path, extra: str = "", probe_extra: str = "", modules: Path = TEST_MODULES
) -> Path:
    """The probe, probe2 (its neighbour) and an isolated echo, from the test modules in ``modules``."""
    head = SANDBOX.format(modules=modules, extra=extra)
    return write_config(directory, head, modules=MODULES.format(probe_extra=probe_extra))


def probe_report(daemon: DaemonProcess, module: str = "probe") -> dict[str, Any]:
    """What the module's worker sees of itself."""
    with BlockingClient(daemon.socket) as client:
        report: dict[str, Any] = client.request_proxy(module).call("report")
    return report


def status_of(daemon: DaemonProcess, module: str) -> dict[str, Any]:
    """The module's entry in ``ipadctl --json status``."""
    entry: dict[str, Any] = json.loads(daemon.ctl("--json", "status").stdout)["modules"][module]
    return entry


def assert_confined(report: dict[str, Any], *, uid: int) -> None:
    """The measures every sandboxed worker has, root daemon or not."""
    status = report["status"]
    assert (report["uid"], report["gid"]) == (uid, uid)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert status["CapEff"] == status["CapBnd"] == "0" * 16
    assert report["pid"] == 1
    assert status["NSpid"] == "1"  # its own PID namespace
    assert report["interfaces"] == ["lo"]  # a network namespace with nothing in it
    assert report["rlimits"]["RLIMIT_NOFILE"] == [64, 64]
    assert report["rlimits"]["RLIMIT_NPROC"] == [16, 16]
    assert report["rlimits"]["RLIMIT_CORE"] == [0, 0]
    assert report["oom_score_adj"] == 700
    fds = report["fds"]
    assert fds["0"] == "/dev/null"
    assert fds["1"].startswith("pipe:")
    assert fds["1"] == fds["2"]
    assert fds["3"].startswith("socket:")
    # Above 3 only what the worker host opened itself: its epoll, its heartbeat board
    # (each of its two mappings, the beat and claim and the call statistics, keeps a
    # descriptor of it, and faulthandler writes crash stacks through a third), its
    # instances' channels.
    later = [target for fd, target in fds.items() if int(fd) > 3]
    own = ("anon_inode:[eventpoll]", "/memfd:ipad-heartbeat (deleted)")
    assert [later.count(target) for target in own] == [1, 3], later
    assert all(t.startswith("socket:") for t in later if t not in own), later
    writable = {m["point"] for m in report["mounts"] if "rw" in m["options"]}
    assert writable == {"/tmp", "/proc"}, writable
    assert report["root"] == sorted(report["root"])
    assert not {"home", "run", "var", "sys", "srv", "mnt"} & set(report["root"])


def test_root_daemon_workers_are_confined(
    start_daemon: Start, tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """As root: the worker runs as nobody, groups dropped, every measure in force inside and out."""
    env = {k: v for k, v in daemon_env.items() if k != "LANG"} | {"LANG": "C.UTF-8", "SECRET": "x"}
    daemon = start_daemon(sandbox_config(tmp_path), env=env)
    report = probe_report(daemon)
    assert_confined(report, uid=NOBODY)
    assert report["groups"] == []
    assert report["status"]["Groups"] == ""
    assert report["rlimits"]["RLIMIT_AS"] == [1 << 30, 1 << 30]
    assert report["environ"] == {"LANG": "C.UTF-8"}
    outside = status_of(daemon, "probe")["sandbox"]["in_force"]
    assert outside["uid"] == NOBODY
    assert outside["user"] is True
    for measure in ("pid_namespace", "network", "ipc", "mounts", "no_new_privs", "seccomp"):
        assert outside[measure] is True, measure
    assert outside["user_namespace"] is False  # root needs none: it drops to nobody
    assert outside["oom_score_adj"] == 700
    if MEMORY:
        assert outside["memory_max"] == 64 << 20
    assert status_of(daemon, "echo")["sandbox"] is None  # isolated: no sandbox


def test_escapes_are_stopped_and_the_rest_carries_on(start_daemon: Start, tmp_path: Path) -> None:
    """Network, writes outside /tmp, others' files, the daemon's pid: each attempt fails."""
    daemon = start_daemon(sandbox_config(tmp_path))
    own_tuning = TEST_MODULES / "tuning" / "probe" / "uncalibrated.toml"
    other_tuning = TEST_MODULES / "tuning" / "probe2" / "uncalibrated.toml"
    with BlockingClient(daemon.socket) as client:
        probe = client.request_proxy("probe")
        assert probe.call("connect", {"family": "AF_INET"}) == "EAFNOSUPPORT"
        assert probe.call("connect", {"family": "AF_INET6"}) == "EAFNOSUPPORT"
        assert probe.call("connect", {"family": "AF_UNIX"}).endswith("ENOENT")  # no /run here
        assert probe.call("write", {"path": "/etc/ipad-probe"}) == "EROFS"
        assert probe.call("write", {"path": str(TEST_MODULES / "x")}) == "EROFS"
        assert probe.call("write", {"path": "/tmp/ok"}) == "ok"
        assert probe.call("read", {"path": str(own_tuning)}) == "ok"
        assert probe.call("read", {"path": str(other_tuning)}) == "ENOENT"
        assert probe.call("read", {"path": "/etc/shadow"}) == "ENOENT"
        assert probe.call("read", {"path": str(Path(ipc.__file__).parents[1] / "workers" /
                                               "modules" / "awb.toml")}) == "ENOENT"  # fmt: skip
        assert probe.call("signal", {"pid": daemon.proc.pid}) == "ESRCH"
        bomb = probe.call("fork_bomb", {"most": 200})
        assert bomb["error"] == "EAGAIN"
        assert bomb["forked"] < 16, bomb
        echo = client.request_proxy("echo")
        assert echo.call("echo", {"text": "still here"}) == {"text": "still here"}
        neighbour = client.request_proxy("probe2")
        assert neighbour.call("allocate", {"mib": 512}).startswith("MemoryError")
        assert neighbour.call("read", {"path": str(other_tuning)}) == "ok"  # its own
    assert daemon.proc.poll() is None


def test_trace_attempt_kills_the_worker_and_is_reported(
    start_daemon: Start, tmp_path: Path
) -> None:
    """A ptrace attempt is one of the calls only an escape makes: the worker dies, the daemon says why."""
    daemon = start_daemon(sandbox_config(tmp_path))
    pid = daemon.worker_pids()["probe"]
    with BlockingClient(daemon.socket) as client:
        probe = client.request_proxy("probe")
        with pytest.raises(ipc.WorkerCrashed):
            probe.call("trace", {"pid": daemon.proc.pid})
        exited = daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == pid)
        assert (exited["cause"], exited["signal"]) == ("seccomp", "SIGSYS")
        daemon.wait_for("worker.ready", lambda r: r["module"] == "probe" and r["worker_pid"] != pid)
        assert probe.call("report", wait=10)["uid"] == NOBODY  # back, still confined
    assert daemon.proc.poll() is None


@pytest.mark.skipif(not MEMORY, reason="needs a writable memory cgroup controller (v2 or v1)")
def test_memory_limit_kill_is_reported_as_oom(start_daemon: Start, tmp_path: Path) -> None:
    """Past memory_max the kernel kills the worker; the crash reason is oom; it comes back."""
    daemon = start_daemon(sandbox_config(tmp_path))
    pid = daemon.worker_pids()["probe"]
    with BlockingClient(daemon.socket) as client:
        probe = client.request_proxy("probe")
        with pytest.raises(ipc.WorkerCrashed) as crashed:
            probe.call("allocate", {"mib": 256}, timeout=20)
    # The caller is told why: the daemon's cause, which names the OOM kill and the call.
    assert crashed.value.details["cause"].startswith("oom: over its memory limit")
    assert "in allocate()" in crashed.value.message
    report = daemon.wait_for("worker.crash_report", lambda r: r.get("worker_pid") == pid)
    assert (report["kind"], report["method"]) == ("oom", "allocate")
    exited = daemon.wait_for("worker.exited", lambda r: r.get("worker_pid") == pid)
    assert (exited["cause"], exited["signal"], exited["memory_max"]) == ("oom", "SIGKILL", 64 << 20)
    state = daemon.wait_for("module.state_changed",
                            lambda r: r["module"] == "probe" and r["state"] == "exited")  # fmt: skip
    assert state["reason"].startswith("oom: over its memory limit")
    daemon.wait_for("worker.ready", lambda r: r["module"] == "probe" and r["worker_pid"] != pid)


@pytest.mark.skipif(not MEMORY, reason="needs a writable memory cgroup controller (v2 or v1)")
def test_sandboxes_added_by_reload_are_as_confined(start_daemon: Start, tmp_path: Path) -> None:
    """The first sandboxed modules may come with a reload: their limits hold as at a start."""
    config = write_config(tmp_path, SANDBOX.format(modules=TEST_MODULES, extra=""),
                          modules="[modules.echo]\n")  # fmt: skip
    daemon = start_daemon(config)
    assert daemon.events("memory.ready") == []  # nothing needed a memory controller yet
    sandbox_config(tmp_path)
    result = daemon.ctl("reload").stdout
    assert "added: probe, probe2" in result
    assert_confined(probe_report(daemon), uid=NOBODY)
    in_force = status_of(daemon, "probe")["sandbox"]["in_force"]
    assert (in_force["memory_max"], in_force["pid_namespace"]) == (64 << 20, True)
    assert daemon.events("forkserver.fork_failed") == []  # forked into its cgroup, not spawned
    daemon.wait_for("memory.ready")


def test_spawned_workers_are_confined_too(start_daemon: Start, tmp_path: Path) -> None:
    """Without the fork server, the jail starts the worker as confined as a forked one, PID namespace too."""
    config = sandbox_config(tmp_path)
    config.write_text(config.read_text().replace("[daemon]\n", "[daemon]\nforkserver = false\n"))
    daemon = start_daemon(config)
    report = probe_report(daemon)
    assert_confined(report, uid=NOBODY)  # pid 1 of its own namespace, its own /proc
    with BlockingClient(daemon.socket) as client:
        probe = client.request_proxy("probe")
        assert probe.call("signal", {"pid": daemon.proc.pid}) == "ESRCH"
        assert probe.call("write", {"path": "/etc/ipad-probe"}) == "EROFS"
    assert status_of(daemon, "probe")["sandbox"]["in_force"]["pid_namespace"] is True
    # Its exec made it dumpable again; its worker host undoes that, so another process of
    # its user (nobody) cannot read its memory or environment through /proc.
    pid = status_of(daemon, "probe")["worker_pid"]
    assert Path(f"/proc/{pid}/environ").stat().st_uid == 0
    peek = subprocess.run([*as_user(), "head", "-c1", f"/proc/{pid}/environ"],
                          capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    assert peek.returncode != 0, peek
    assert "Permission denied" in peek.stderr, peek
    assert daemon.events("worker.forked") == []
    jailed = [r for r in daemon.events("worker.spawned") if r.get("module") == "probe"]
    assert jailed
    # Cloned straight into its cgroup, as a forked worker is, where ipad makes cgroups.
    assert all(r["in_cgroup"] for r in jailed) == bool(daemon.events("cgroup.ready"))


def test_unprivileged_daemon_workers_get_a_user_namespace(
    start_daemon: Start, nobody_dir: Path, nobody_env: dict[str, str]
) -> None:
    """As nobody: a user namespace; the worker cannot signal or trace the daemon of its own uid."""
    # The test modules as nobody can read them: the checkout's may be out of its reach.
    modules = user_install().test_modules
    config = sandbox_config(nobody_dir, extra='optional = ["memory_max"]', modules=modules)
    daemon = start_daemon(config, env=nobody_env, prefix=as_user())
    daemon.socket = Path(daemon.wait_for("daemon.started")["socket"])
    report = probe_report(daemon)
    assert_confined(report, uid=NOBODY)
    outside = status_of(daemon, "probe")["sandbox"]
    assert outside["in_force"]["user_namespace"] is True
    assert outside["in_force"]["pid_namespace"] is True
    if "memory_max" in outside["unavailable"]:  # nobody has no memory controller here: said once
        gaps = daemon.events("sandbox.measure_unavailable")
        assert [(g["measure"], g["modules"]) for g in gaps] == [("memory_max", ["probe"])]
    pid = daemon.worker_pids()["probe"]
    with BlockingClient(daemon.socket) as client:
        probe = client.request_proxy("probe")
        assert probe.call("signal", {"pid": daemon.proc.pid}) == "ESRCH"
        with pytest.raises(ipc.WorkerCrashed):
            probe.call("trace", {"pid": daemon.proc.pid})
    exited = daemon.wait_for("worker.exited", of_module("probe"))
    assert (exited["worker_pid"], exited["cause"]) == (pid, "seccomp")
    assert daemon.proc.poll() is None
