"""Who may do what, against a real root daemon, with clients really run as other users.

CI runs as root; each client here is a subprocess dropped to another user and
group set with setpriv, so the daemon sees its uid and groups from the kernel.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import REPO, WAIT, DaemonProcess, write_config
from tests.privileges import NOBODY, as_user, needs_setpriv

pytestmark = [pytest.mark.timeout(120), needs_setpriv]

Start = Callable[..., DaemonProcess]

#: Requests a proxy to each module named in argv[2] and an admin restart of echo; prints outcomes.
CLIENT = """
import json, sys
from ipad.client import BlockingClient, IpadError
outcome = {}
with BlockingClient(sys.argv[1]) as client:
    outcome["status"] = sorted(client.status().modules)
    for module in sys.argv[2].split(","):
        try:
            client.request_proxy(module).release()
            outcome[module] = "ok"
        except IpadError as exc:
            outcome[module] = [exc.code, exc.message]
    try:
        client.admin("restart", "echo")
        outcome["admin"] = "ok"
    except IpadError as exc:
        outcome["admin"] = [exc.code, exc.message]
print(json.dumps(outcome))
"""


def gid(name: str) -> int:
    """A group that Debian always has."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pytest.skip(f"this system has no group {name}")


@pytest.fixture
def daemon(start_daemon: Start, shared_dir: Path, daemon_env: dict[str, str]) -> DaemonProcess:
    """A root daemon whose socket is group nogroup's, with a policy by user and group."""
    config = write_config(shared_dir, """
[daemon]
socket_group = "nogroup"
[access]
admin_groups = ["adm"]
proxy_users = ["daemon"]
proxy_groups = ["audio"]
[access.modules.echo]
users = ["*"]
""")  # fmt: skip
    env = {**daemon_env, "IPAD_SOCKET": str(shared_dir / "run" / "ipad.sock")}
    return start_daemon(config, env=env)


def run_as(daemon: DaemonProcess, uid: int, gid: int, groups: list[int]) -> tuple[int, Any]:
    """Run CLIENT as that user; its pid and what it printed."""
    child = subprocess.Popen(
        [*as_user(uid, gid, groups), sys.executable, "-c", CLIENT, str(daemon.socket), "echo,awb"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=daemon.env,
    )  # fmt: skip
    out, err = child.communicate(timeout=WAIT)
    assert child.returncode == 0, err
    return child.pid, json.loads(out)


def test_the_policy_by_user_and_by_supplementary_group(daemon: DaemonProcess) -> None:
    """Echo is open to all, awb to user daemon and group audio, admin to group adm."""
    nogroup = gid("nogroup")
    denied_awb = [
        "permission_denied",
        "permission denied: uid 65534 may not use module 'awb' (allowed: root; user daemon; group audio)",
    ]
    denied_admin = [
        "permission_denied",
        "permission denied: uid 65534 may not use the admin operation 'restart' (allowed: root; group adm)",
    ]
    pid, outcome = run_as(daemon, NOBODY, nogroup, [])
    assert outcome == {"status": ["agc", "awb", "echo"], "echo": "ok", "awb": denied_awb,
                       "admin": denied_admin}  # fmt: skip
    denials = daemon.events("access.denied")
    assert [(r["peer_pid"], r["peer_uid"], r["peer_gid"], r["action"]) for r in denials] == [
        (pid, NOBODY, nogroup, "use module 'awb'"),
        (pid, NOBODY, nogroup, "use the admin operation 'restart'"),
    ]
    assert denials[0]["level"] == "warning"
    # In group audio besides: awb too. In group adm: admin operations too.
    assert run_as(daemon, NOBODY, nogroup, [gid("audio")])[1]["awb"] == "ok"
    with_adm = run_as(daemon, NOBODY, nogroup, [gid("adm")])[1]
    assert (with_adm["admin"], with_adm["awb"]) == ("ok", denied_awb)
    # User daemon by name, whatever its groups.
    daemon_uid = pwd.getpwnam("daemon").pw_uid
    assert run_as(daemon, daemon_uid, nogroup, [])[1]["awb"] == "ok"
    # Every connection's credentials are in the log.
    accepted = {(r["peer_pid"], r["peer_uid"]) for r in daemon.events("client.accepted")}
    assert (pid, NOBODY) in accepted


def test_a_user_outside_the_socket_group_cannot_even_connect(daemon: DaemonProcess) -> None:
    """The socket (0660, group nogroup) is the first gate: anyone else gets EACCES."""
    assert (daemon.socket.stat().st_gid, daemon.socket.stat().st_mode & 0o777) == (
        gid("nogroup"), 0o660,
    )  # fmt: skip
    assert (daemon.socket.parent.stat().st_mode & 0o777) == 0o750
    result = subprocess.run(
        [*as_user(NOBODY, 12345, []), sys.executable, "-m", "ipad.cli.ctl", "--socket",
         str(daemon.socket), "status"],
        capture_output=True, text=True, cwd=REPO, env=daemon.env, timeout=WAIT, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"ipadctl: may not connect to {daemon.socket}: Permission denied\n"


#: Holds a proxy to echo, says so, and after a line on stdin uses it again; prints outcomes.
HOLDER = """
import json, sys
from ipad.client import BlockingClient, IpadError
with BlockingClient(sys.argv[1], subscribe=True) as client:
    echo = client.request_proxy("echo")
    print(echo.call("pid"), flush=True)
    sys.stdin.readline()
    try:
        outcome = ["ok", echo.call("pid", timeout=5)]
    except IpadError as exc:
        outcome = [exc.code]
    try:
        echo.recover(5)
        outcome.append("recovered")
    except IpadError as exc:
        outcome.append(exc.code)
    try:
        client.request_proxy("echo")
        outcome.append("granted")
    except IpadError as exc:
        outcome.append(exc.code)
    while (event := client.next_event(timeout=5)) is not None:
        if event.kind == "proxy" and event.state == "closed":
            outcome.append(event.reason)
            break
print(json.dumps(outcome))
"""


def test_reload_that_takes_access_away_closes_the_proxies_already_held(
    daemon: DaemonProcess, shared_dir: Path
) -> None:
    """A proxy's channel goes straight to the worker: a revoking reload closes it too."""
    # As a context manager its pipes are closed whatever fails: left open, they would be
    # reported as unraisable ResourceWarnings in whichever test happens to collect them.
    with subprocess.Popen(
        [*as_user(NOBODY, gid("nogroup"), []), sys.executable, "-c", HOLDER, str(daemon.socket)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env=daemon.env,
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout is not None
            echo_pid = int(holder.stdout.readline())
            config = shared_dir / "config.toml"
            config.write_text(config.read_text().replace('users = ["*"]', 'users = ["daemon"]'))
            daemon.ctl("reload")
            revoked = daemon.wait_for("access.revoked")
            assert (revoked["module"], revoked["peer_uid"]) == ("echo", NOBODY)
            out, err = holder.communicate("\n", timeout=WAIT)
        finally:
            holder.kill()
    assert holder.returncode == 0, err
    reason = "access revoked: uid 65534 may no longer use module 'echo'"
    # The call fails at once; the proxy is gone (closed, with the reason), a new one denied.
    assert json.loads(out) == ["worker_crashed", "unknown_proxy", "permission_denied", reason]
    assert daemon.worker_pids()["echo"] == echo_pid  # nobody else's proxy or worker touched


def test_ipadctl_as_a_user_without_admin(daemon: DaemonProcess) -> None:
    """`ipadctl stop` by a user outside the admin group: exit 1, the reason, the daemon runs on."""
    result = subprocess.run(
        [*as_user(NOBODY, gid("nogroup"), []), sys.executable, "-m", "ipad.cli.ctl",
         "--socket", str(daemon.socket), "stop"],
        capture_output=True, text=True, cwd=REPO, env=daemon.env, timeout=WAIT, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "ipadctl: permission denied: uid 65534 may not use the admin operation 'stop' "
        "(allowed: root; group adm)\n"
    )
    assert daemon.proc.poll() is None
    assert json.loads(daemon.ctl("--json", "status").stdout)["daemon"]["pid"] == daemon.proc.pid
    assert os.geteuid() == 0  # root itself may: the fixture's teardown does not need it


def test_ipadctl_metrics_is_for_admins(daemon: DaemonProcess) -> None:
    """`ipadctl metrics`: refused to a user outside the admin groups (counted), given to one in."""

    def metrics(groups: list[int]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user(NOBODY, gid("nogroup"), groups), sys.executable, "-m", "ipad.cli.ctl",
             "--socket", str(daemon.socket), "metrics"],
            capture_output=True, text=True, cwd=REPO, env=daemon.env, timeout=WAIT, check=False,
        )  # fmt: skip

    denied = metrics([])
    assert denied.returncode == 1
    assert "may not use the admin operation 'metrics'" in denied.stderr
    allowed = metrics([gid("adm")])
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.endswith("# EOF\n")
    assert 'ipad_refusals_total{reason="permission_denied"} 1\n' in allowed.stdout
