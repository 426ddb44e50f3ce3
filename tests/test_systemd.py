"""ipad as a real systemd service: the shipped units, under a real systemd, read back from its journal.

One systemd boots as PID 1 of its own namespaces for this module
(tests/systemd_namespace.py). The checkout's units are installed in it as
docs/operations.md says, its user made by systemd-sysusers from the shipped
sysusers.d file, and /opt/ipad/venv (a tmpfs /opt, in the namespace only) is
this checkout's venv, so ExecStart= and ExecReload= run as shipped. A drop-in
adds only what a test instance needs: no default dependencies, and the
checkout and its interpreter bound back where the sandbox hides them.
Tests then drive it with systemctl and read journalctl -o json.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from ipad import client as ipc
from ipad.client import BlockingClient
from ipad.client._trio import LocalEvent
from tests.daemon_process import REPO, TEST_MODULES, WAIT, wait_until
from tests.journal_reader import Entry
from tests.privileges import root_subtrees
from tests.systemd_namespace import SystemdNamespace, missing_requirements

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

UNIT = "ipad.service"
SOCKET_UNIT = "ipad.socket"
#: The socket inside the namespace, and where the host reaches it.
SOCKET = "/run/ipad/ipad.sock"

CONFIG = f"""
[daemon]
module_dirs = ["{TEST_MODULES}"]

[modules.awb]
[modules.agc]
[modules.echo]
[modules.faulty]
[modules.probe]
proxy = "sandboxed"
"""

#: In the namespace, /root becomes a world-searchable tmpfs with just these subtrees bound in.
OPEN_ROOT = """
keep=$(mktemp -d /run/root-keep.XXXXXX)
for sub in {subtrees}; do mkdir -p "$keep/$sub"; mount --bind "/root/$sub" "$keep/$sub"; done
mount -t tmpfs -o mode=0755 tmpfs /root
for sub in {subtrees}; do mkdir -p "/root/$sub"; mount --bind "$keep/$sub" "/root/$sub"; done
"""

#: Directories systemd hides from the service (ProtectHome=, PrivateTmp=) that a checkout or
#: its interpreter may live in; the drop-in binds those it needs back, read-only.
HIDDEN = (Path("/root"), Path("/home"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))


def needed_paths() -> list[str]:
    """The checkout, its venv and the base interpreter, where the unit's sandbox hides them."""
    wanted = {REPO, Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable))}
    hidden = sorted(str(p) for p in wanted if any(p.is_relative_to(h) for h in HIDDEN))
    return [p for p in hidden if not any(p != q and p.startswith(q + "/") for q in hidden)]


def service_drop_in() -> str:
    """The only changes to the shipped ipad.service: no default dependencies, hidden paths."""
    binds = needed_paths()
    lines = [
        "[Unit]",
        "DefaultDependencies=no",
        "[Service]",
        f"Environment=IPAD_CONFIG_PATH={TEST_MODULES / 'tuning'}",
    ]
    if binds:
        # A tmpfs instead of the hidden home directories, with just these bound back.
        lines += ["ProtectHome=tmpfs", f"BindReadOnlyPaths={' '.join(binds)}"]
    return "\n".join(lines) + "\n"


class Service:
    """The namespaced systemd with ipad installed, and what the tests ask of it."""

    def __init__(self, ns: SystemdNamespace) -> None:
        self.ns = ns
        self.socket = str(ns.root / SOCKET.lstrip("/"))

    def is_active(self, unit: str = UNIT) -> str:
        """``systemctl is-active``: active, inactive, failed, activating..."""
        return self.ns.systemctl("is-active", unit, check=False)

    def main_pid(self) -> int:
        """The daemon's pid as the namespace numbers it (0 when it is not running)."""
        return int(self.ns.show(UNIT, "MainPID"))

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Poll something systemd cannot tell us about by itself."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                status = self.ns.systemctl("status", UNIT, "--no-pager", "-n", "30", check=False)
                raise AssertionError(f"not {what} within {timeout:g}s:\n{status}")
            time.sleep(0.05)

    def start(self) -> int:
        """Start ipad.service (and its socket); its main pid once it is ready."""
        self.ns.systemctl("start", SOCKET_UNIT, UNIT)
        return self.main_pid()

    def stop(self) -> None:
        """Stop the service, reset any failure, keep the socket listening."""
        self.ns.systemctl("stop", UNIT, check=False)
        self.ns.systemctl("reset-failed", UNIT, check=False)
        self.ns.systemctl("start", SOCKET_UNIT)

    def entries(self, *matches: str, since: float = 0.0) -> list[Entry]:
        """The service's journal entries (the daemon's and systemd's about it)."""
        found = self.ns.journal.entries(f"_SYSTEMD_UNIT={UNIT}", *matches)
        return [e for e in found if int(e["__REALTIME_TIMESTAMP"]) >= since * 1e6]

    def wait_entry(
        self, *matches: str, since: float = 0.0, where: Callable[[Entry], bool] = lambda _: True
    ) -> Entry:
        """The daemon's first journal entry matching, logged after ``since`` (a time.time())."""
        return self.ns.journal.wait_for(
            f"_SYSTEMD_UNIT={UNIT}", *matches,
            where=lambda e: int(e["__REALTIME_TIMESTAMP"]) >= since * 1e6 and where(e),
        )  # fmt: skip

    def manager_says(self, text: str, since: float) -> Entry:
        """The manager's own journal entry about ipad.service containing ``text``."""
        return self.ns.journal.wait_for(
            "_PID=1", f"UNIT={UNIT}",
            where=lambda e: text in str(e.get("MESSAGE")) and int(e["__REALTIME_TIMESTAMP"]) >= since * 1e6,
        )  # fmt: skip

    @contextlib.contextmanager
    def debug_log(self) -> Iterator[None]:
        """The manager at debug level: it logs every notification it receives."""
        self.ns.systemctl("log-level", "debug")
        try:
            yield
        finally:
            self.ns.systemctl("log-level", "info")

    def worker_pid(self, module: str) -> int:
        """A module's worker (as the namespace numbers it)."""
        with BlockingClient(self.socket, name="test") as client:
            return int(client.status().modules[module]["worker_pid"])


@pytest.fixture(scope="module")
def systemd() -> Iterator[Service]:
    """One systemd for the module, with ipad's units installed; killed at the end."""
    units = REPO / "systemd"
    files = {
        "/etc/systemd/system/ipad.service": (units / "ipad.service").read_text(),
        "/etc/systemd/system/ipad.socket": (units / "ipad.socket").read_text(),
        "/etc/sysusers.d/ipad.conf": (units / "sysusers.d" / "ipad.conf").read_text(),
        "/run/systemd/system/ipad.service.d/test.conf": service_drop_in(),
        "/run/systemd/system/ipad.socket.d/test.conf": "[Unit]\nDefaultDependencies=no\n",
        "/etc/ipad/config.toml": CONFIG,
    }
    setup = (
        "systemd-sysusers /etc/sysusers.d/ipad.conf\n"
        # The installed venv docs/operations.md describes is this checkout's.
        f"mount -t tmpfs -o mode=0755 tmpfs /opt && mkdir /opt/ipad && ln -s {sys.prefix} /opt/ipad/venv\n"
        # Users other than root may run it: /root opened to the interpreter's subtrees only.
        + OPEN_ROOT.format(subtrees=" ".join(root_subtrees()))
    )
    in_tmp = [Path(p) for p in needed_paths() if p.startswith(("/tmp/", "/var/tmp/"))]
    ns = SystemdNamespace(files, setup, keep=in_tmp)
    try:
        ns.systemctl("start", SOCKET_UNIT)
        yield Service(ns)
    finally:
        ns.stop()


@pytest.fixture
def service(systemd: Service) -> Iterator[Service]:
    """The instance, with ipad.service started for the test and stopped after it."""
    systemd.start()
    yield systemd
    systemd.stop()


def test_the_units_verify(systemd: Service) -> None:
    """`systemd-analyze verify` finds nothing wrong with the installed units."""
    result = systemd.ns.run("systemd-analyze", "verify", "/etc/systemd/system/ipad.service",
                            "/etc/systemd/system/ipad.socket", check=False)  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_client_connecting_starts_the_service(systemd: Service) -> None:
    """Socket activation: nothing runs until a client connects; the connection is then served.

    Served from the daemon's start (a proxy request waits for its module), the
    status can come before READY=1: the service turns active right after.
    """
    systemd.stop()
    assert systemd.is_active() == "inactive"
    assert systemd.is_active(SOCKET_UNIT) == "active"
    since = time.time()
    with BlockingClient(systemd.socket, name="first client") as client:
        assert client.status().daemon["socket"] == SOCKET
    wait_until(lambda: systemd.is_active() == "active")
    activated = systemd.wait_entry("IPAD_EVENT=socket.activated", since=since)
    assert activated["PATH"] == SOCKET
    assert activated["FD"] == "3"
    systemd.stop()


def test_the_socket_is_for_root_and_group_ipad(systemd: Service) -> None:
    """SocketMode=0660, group ipad; a user outside the group cannot connect, a member can."""
    path = Path(systemd.socket)
    info = path.stat()
    assert (info.st_mode & 0o777) == 0o660
    group = systemd.ns.run("getent", "group", "ipad").stdout.split(":")
    user = systemd.ns.run("id", "-u", "ipad").stdout.strip()
    assert info.st_gid == int(group[2])
    # root:ipad from the socket unit; RuntimeDirectory= hands /run/ipad's contents to the
    # service's user once the service has run.
    assert info.st_uid in (0, int(user))
    directory = path.parent.stat()
    assert (directory.st_mode & 0o777) == 0o755
    # Someone outside the group cannot connect; a member can (Debian's python3, no ipad).
    probe = "import socket,sys; socket.socket(1, 5).connect(sys.argv[1])"
    outsider = systemd.ns.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "/usr/bin/python3", "-c", probe, SOCKET, check=False)  # fmt: skip
    assert "PermissionError" in outsider.stderr
    member = systemd.ns.run("setpriv", "--reuid=65534", "--regid=65534", f"--groups={group[2]}",
                            "/usr/bin/python3", "-c", probe, SOCKET, check=False)  # fmt: skip
    assert member.returncode == 0, member.stderr
    # And a member's ipadctl finds the system service without being told where it is.
    ipadctl = systemd.ns.run("setpriv", "--reuid=65534", "--regid=65534", f"--groups={group[2]}",
                             "/opt/ipad/venv/bin/ipadctl", "--json", "status", check=False)  # fmt: skip
    # Answered: 0, or 3 when a module is not running (as systemctl status; a module can fail
    # here when the checkout lives where the service's user cannot read, as in CI).
    assert ipadctl.returncode in (0, 3), ipadctl.stderr
    assert json.loads(ipadctl.stdout)["daemon"]["socket"] == SOCKET


def test_ready_status_and_the_daemons_user(service: Service) -> None:
    """Type=notify: active once READY=1, with the module counts as its status; runs as ipad."""
    assert service.is_active() == "active"
    assert service.ns.show(UNIT, "StatusText") == (
        "5 modules valid, 0 restarting, 0 in cooldown, 0 failed; 0 proxies"
    )
    with BlockingClient(service.socket, name="status") as client:
        proxy = client.request_proxy("echo")
        proxy.call("echo", {"text": "hi"})
        service.wait(lambda: service.ns.show(UNIT, "StatusText").endswith("; 1 proxy"), "counted")
    uid = service.ns.run("id", "-u", "ipad").stdout.strip()
    status = (service.ns.root / f"proc/{service.main_pid()}/status").read_text()
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
    assert "NoNewPrivs:\t1" in status
    # Delegate=yes: the daemon made its own subtree, and each worker has a cgroup in it.
    cgroups = service.ns.root / "sys/fs/cgroup/system.slice/ipad.service"
    workers = sorted(p.name.split(".")[0] for p in cgroups.glob("ipad.*/*") if p.is_dir())
    assert set(workers) == {"awb", "agc", "echo", "faulty", "probe"}


def test_reload_sends_reloading_then_ready(service: Service) -> None:
    """`systemctl reload` and SIGHUP each reload; systemd sees RELOADING=1 then READY=1."""
    pid = service.main_pid()
    workers = {m: service.worker_pid(m) for m in ("awb", "faulty")}
    since = time.time()
    with service.debug_log():
        service.ns.systemctl("reload", UNIT)
        service.wait_entry("IPAD_EVENT=daemon.reloaded", since=since)
        service.manager_says("(RELOADING=1, MONOTONIC_USEC=", since)
        service.manager_says("Changed reload -> running", since)
        again = time.time()
        # To every process of the unit, as `systemctl kill` does by default: workers ignore it.
        service.ns.systemctl("kill", "--signal=SIGHUP", UNIT)
        service.wait_entry("IPAD_EVENT=daemon.reloaded", since=again)
        service.manager_says("(RELOADING=1, MONOTONIC_USEC=", again)
        ready = service.manager_says("(READY=1, STATUS=5 modules valid", again)
    assert int(ready["__REALTIME_TIMESTAMP"]) >= again * 1e6
    assert service.main_pid() == pid  # reloaded in place, not restarted
    assert {m: service.worker_pid(m) for m in workers} == workers
    assert service.is_active() == "active"


def test_an_invalid_config_fails_the_reload_not_the_service(service: Service) -> None:
    """A reload of a broken file fails, naming the problem; the old config keeps running."""
    config = service.ns.root / "etc/ipad/config.toml"
    good = config.read_text()
    pid = service.main_pid()
    config.write_text(good + "\n[modules.nosuch]\n")
    try:
        result = service.ns.run("systemctl", "reload", UNIT, check=False)
        assert result.returncode != 0
        assert "Job for ipad.service failed." in result.stderr
        failed = service.wait_entry("IPAD_EVENT=daemon.reload_failed")
        assert "modules.nosuch" in failed["PROBLEMS"]
        assert service.is_active() == "active"
        assert service.main_pid() == pid
    finally:
        config.write_text(good)


def test_a_killed_worker_is_restarted_and_its_story_is_in_the_journal(service: Service) -> None:
    """SIGKILL a worker: the crash, the restart and its stderr, with MODULE= and WORKER_PID=."""
    since = time.time()
    with BlockingClient(service.socket, name="crash") as client:
        proxy = client.request_proxy("faulty")
        pid = int(proxy.call("pid"))
        proxy.call("write_stderr", {"text": "<4>about to be killed"})
        service.ns.run("kill", "-KILL", str(pid))
        crash = service.wait_entry("IPAD_EVENT=worker.exited", f"WORKER_PID={pid}", since=since)
        ready = service.wait_entry("IPAD_EVENT=worker.ready", "MODULE=faulty", since=since,
                                   where=lambda e: e["WORKER_PID"] != str(pid))  # fmt: skip
        # The call that finds the worker gone recovers the proxy onto the new one first.
        assert proxy.call("get", timeout=WAIT) == 0
    assert (crash["MODULE"], crash["SIGNAL"], crash["PRIORITY"]) == ("faulty", "SIGKILL", "3")
    assert crash["SYSLOG_IDENTIFIER"] == "ipad"
    assert (crash["CODE_FILE"], crash["CODE_FUNC"]) == ("ipad/daemon/lifecycle.py", "_exit_reason")
    assert int(crash["CODE_LINE"]) > 0
    relayed = service.wait_entry("IPAD_EVENT=worker.stderr", f"WORKER_PID={pid}", since=since)
    assert (relayed["MODULE"], relayed["TEXT"], relayed["PRIORITY"]) == (
        "faulty", "about to be killed", "4",
    )  # fmt: skip
    # The proxy's story too: invalid with the reason, then valid again on the new worker.
    invalid = service.wait_entry("IPAD_EVENT=proxy.state_changed", "STATE=invalid", since=since)
    assert invalid["REASON"] == "worker exited with signal SIGKILL"
    assert "PROXY_ID" in invalid
    # What docs/operations.md shows: one module's story, crash included.
    story = [e["IPAD_EVENT"] for e in service.entries("MODULE=faulty", since=since)]
    assert story.index("worker.stderr") < story.index("worker.exited") < len(story) - 1
    assert ready["WORKER_PID"] in {e.get("WORKER_PID") for e in service.entries("MODULE=faulty")}


async def next_local(client: ipc.Client, kind: str, timeout: float = WAIT) -> LocalEvent:
    """The next event of ``kind`` the client library made itself."""
    with trio.fail_after(timeout):
        async for event in client.events:
            if isinstance(event, LocalEvent) and event.kind == kind:
                return event
    raise AssertionError(f"the event stream ended before a {kind!r} event")


async def test_the_watchdog_restarts_a_frozen_daemon(service: Service) -> None:
    """SIGSTOP the daemon: its pings stop, systemd's watchdog restarts it, clients carry on."""
    drop_in = service.ns.root / "run/systemd/system/ipad.service.d/watchdog.conf"
    drop_in.write_text("[Service]\nWatchdogSec=2s\n")
    try:
        service.ns.systemctl("daemon-reload")
        service.ns.systemctl("restart", UNIT)
        frozen = service.main_pid()
        since = time.time()
        async with ipc.open_client(service.socket, reconnect=True) as client:
            proxy = await client.request_proxy("faulty")
            await proxy.call("init", {"settings": {"value": 7}})
            service.ns.run("kill", "-STOP", str(frozen))
            back = await next_local(client, "reconnected")
            new_pid = service.main_pid()
            assert new_pid not in (0, frozen)
            assert back.details["daemon_pid"] == new_pid
            # The same proxy works again, on the new daemon, its setup replayed.
            assert await proxy.call("get", wait=WAIT) == 7
            assert proxy.valid
            recovered = await next_local(client, "recovered")
            assert recovered.details["reconnected"] is True
            assert recovered.proxy_id == proxy.proxy_id
        # Clients are served from the start; READY=1 follows once every module's first start
        # came to a result, which may be just after faulty's proxy came back.
        with trio.fail_after(WAIT):
            while service.is_active() != "active":
                await trio.sleep(0.05)
        service.manager_says("Watchdog timeout (limit 2s)!", since)
        # faulthandler: the SIGABRT shows where the loop was stuck (here: stopped anywhere).
        service.wait_entry("MESSAGE=Fatal Python error: Aborted", since=since)
        assert service.ns.show(UNIT, "NRestarts") != "0"
    finally:
        drop_in.unlink()
        service.ns.systemctl("daemon-reload")


def test_stop_leaves_no_ipad_process_behind(service: Service) -> None:
    """`systemctl stop`: STOPPING=1, a clean exit, no daemon or worker left; the socket stays."""
    since = time.time()
    assert [p for p in service.ns.processes() if "ipad" in p]
    with service.debug_log():
        service.ns.systemctl("stop", UNIT)
        service.manager_says("(STOPPING=1, STATUS=stopping:", since)
    assert service.is_active() == "inactive"
    assert service.ns.show(UNIT, "Result") == "success"
    assert service.ns.show(UNIT, "ExecMainStatus") == "0"
    service.wait_entry("IPAD_EVENT=daemon.stopped", since=since)
    assert [p for p in service.ns.processes() if "ipad" in p] == []
    assert not (service.ns.root / "sys/fs/cgroup/system.slice/ipad.service").exists()
    # RuntimeDirectoryPreserve=yes: the socket unit's socket survived the stop.
    assert Path(service.socket).exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.connect(service.socket)
    service.wait(lambda: service.is_active() == "active", "started again by its socket")


def test_a_sandboxed_worker_under_the_shipped_unit(service: Service) -> None:
    """As user ipad with the unit's hardening, a sandboxed worker gets all its namespaces."""
    with BlockingClient(service.socket, name="sandbox") as client:
        probe = client.request_proxy("probe")
        report = probe.call("report")
        daemon_pid = int(client.status().daemon["pid"])
        assert probe.call("signal", {"pid": daemon_pid}) == "ESRCH"
        assert probe.call("connect", {"family": "AF_INET"}) == "EAFNOSUPPORT"
        sandbox = client.status().modules["probe"]["sandbox"]["in_force"]
    assert report["uid"] != 0
    assert report["pid"] == 1
    assert report["interfaces"] == ["lo"]
    assert (report["status"]["NoNewPrivs"], report["status"]["Seccomp"]) == ("1", "2")
    assert report["status"]["CapEff"] == "0" * 16
    assert sandbox["user_namespace"] is True
    assert sandbox["mounts"] is True


def test_the_daemon_logs_to_the_journal_by_itself(service: Service) -> None:
    """With stderr on the journal ($JOURNAL_STREAM), records go by the native protocol, fields kept."""
    started = service.wait_entry("IPAD_EVENT=daemon.started")
    assert started["_TRANSPORT"] == "journal"
    assert started["SYSTEMD"] == "True"
    assert started["SOCKET"] == SOCKET
    for module in ("awb", "agc", "echo", "faulty"):
        assert f"'{module}': 'running'" in started["MODULES"]


def test_admin_operations_are_for_group_ipad_admin(service: Service) -> None:
    """As shipped: a member of ipad may use modules but not restart them; one of ipad-admin may."""
    since = time.time()
    ipad = service.ns.run("getent", "group", "ipad").stdout.split(":")[2]
    admin = service.ns.run("getent", "group", "ipad-admin").stdout.split(":")[2]
    daemon_uid = service.ns.run("id", "-u", "ipad").stdout.strip()

    def ipadctl(groups: str, *args: str) -> tuple[int, str]:
        result = service.ns.run("setpriv", "--reuid=65534", "--regid=65534", f"--groups={groups}",
                                "/opt/ipad/venv/bin/ipadctl", *args, check=False)  # fmt: skip
        return result.returncode, result.stdout + result.stderr

    assert ipadctl(ipad, "call", "echo", "echo", '{"text": "member"}')[0] == 0
    assert ipadctl(ipad, "restart", "echo") == (1, (
        "ipadctl: permission denied: uid 65534 may not use the admin operation 'restart' "
        f"(allowed: root, uid {daemon_uid} (the daemon's user); group ipad-admin)\n"
    ))  # fmt: skip
    denied = service.wait_entry("IPAD_EVENT=access.denied", since=since)
    assert (denied["PEER_UID"], denied["PRIORITY"]) == ("65534", "4")
    assert denied["PEER_PID"].isdigit()
    code, output = ipadctl(f"{ipad},{admin}", "restart", "echo")
    assert code == 0, output
    assert service.is_active() == "active"


def test_ipadctl_logs_reads_the_journal_and_stop_start_work_under_systemd(
    service: Service,
) -> None:
    """`ipadctl logs MODULE` runs journalctl on the daemon's invocation; --ring reads its ring."""
    since = time.time()
    ipadctl = "/opt/ipad/venv/bin/ipadctl"
    assert service.ns.run(ipadctl, "stop", "echo").stdout == "echo: stopped\n"
    assert service.ns.run(ipadctl, "status", "echo", check=False).returncode == 3
    assert service.ns.run(ipadctl, "start", "echo").stdout == "echo: running\n"
    service.wait_entry("IPAD_EVENT=module.start_asked", "MODULE=echo", since=since)
    result = service.ns.run(ipadctl, "--json", "logs", "echo", "-n", "all")
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    invocation = service.ns.show(UNIT, "InvocationID")
    assert {e["MODULE"] for e in entries} == {"echo"}
    assert {e["_SYSTEMD_INVOCATION_ID"] for e in entries} == {invocation}
    events = [e["IPAD_EVENT"] for e in entries]
    assert events.index("module.stop_asked") < events.index("module.start_asked")
    three = service.ns.run(ipadctl, "--json", "logs", "echo", "-n", "3").stdout.splitlines()
    assert [json.loads(line)["__CURSOR"] for line in three] == [e["__CURSOR"] for e in entries[-3:]]
    ring = service.ns.run(ipadctl, "--json", "logs", "echo", "--ring", "-n", "all")
    records = [json.loads(line) for line in ring.stdout.splitlines()]
    assert {r["module"] for r in records} == {"echo"}
    assert "module.start_asked" in [r["event"] for r in records]
