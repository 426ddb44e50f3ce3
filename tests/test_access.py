"""Who connected and what they may do: peer credentials from the kernel, the policy from names."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ipad.config.access import AccessPolicy, Peer, Rule, describe, peer_of, resolve_access
from ipad.config.loader import parse_config
from tests.privileges import needs_setpriv, setpriv

#: The users and groups of a made-up system (lookups raise KeyError for others, as pwd and grp do).
USERS = {"root": 0, "alice": 1000, "bob": 1001}
GROUPS = {"root": 0, "video": 44, "ipad-admin": 990, "camera": 991}


def resolved(text: str, path: Path, daemon_uid: int = 0) -> AccessPolicy:
    """The policy a configuration text gives, with the fixed users and groups above."""
    config = parse_config(text, path)
    result, problems = resolve_access(config, path, uid_of=USERS.__getitem__,
                                      gid_of=GROUPS.__getitem__, daemon_uid=daemon_uid)  # fmt: skip
    assert problems == []
    assert result is not None
    return result.policy


def peer(uid: int, *groups: int) -> Peer:
    """A peer with ``uid`` as its own primary group, plus ``groups``."""
    return Peer(pid=1234, uid=uid, gid=uid, groups=frozenset({uid, *groups}))


def test_defaults_admin_for_root_and_ipad_admin_proxies_for_anyone(tmp_path: Path) -> None:
    """Without [access]: root, the daemon's user and group ipad-admin administer; anyone proxies."""
    policy = resolved("[modules.awb]\n", tmp_path / "c.toml", daemon_uid=999)
    assert policy.may_admin(peer(0))
    assert policy.may_admin(peer(999))  # the daemon's own user, as systemctl reload runs
    assert policy.may_admin(peer(1000, 990))
    assert not policy.may_admin(peer(1000, 44))
    assert policy.may_use(peer(1000), "awb")
    assert policy.may_use(peer(1000), "anything")
    assert policy.who(policy.admin) == "root, uid 999 (the daemon's user); group ipad-admin"


def test_module_rules_by_user_and_by_supplementary_group(tmp_path: Path) -> None:
    """A module's own table replaces the default rule; a supplementary group is enough."""
    text = """
[access]
admin_users = ["alice"]
admin_groups = []
proxy_users = ["bob"]
[access.modules.awb]
users = ["alice"]
groups = ["camera"]
[modules.awb]
[modules.agc]
"""
    policy = resolved(text, tmp_path / "c.toml")
    assert policy.may_admin(peer(1000))
    assert not policy.may_admin(peer(1001, 990))  # ipad-admin is no longer named
    assert policy.may_use(peer(1000), "awb")
    assert policy.may_use(peer(1001, 991), "awb")  # bob, through his supplementary group
    assert not policy.may_use(peer(1001), "awb")
    assert policy.may_use(peer(1001), "agc")  # the default rule: proxy_users
    assert not policy.may_use(peer(1000), "agc")
    assert policy.may_use(peer(0), "agc")  # root always
    assert policy.module_rule("awb").text == "user alice; group camera"


def test_unknown_names_are_problems_at_their_keys(tmp_path: Path) -> None:
    """Each user or group that does not exist is reported at its key, with how to check it."""
    text = """
[daemon]
socket_group = "nosuchgroup"
[access]
admin_users = ["alice", "mallory"]
admin_groups = ["ipad-admin", "wheel"]
proxy_groups = ["video", "vidoe"]
[access.modules.awb]
users = ["eve"]
[modules.awb]
"""
    path = tmp_path / "c.toml"
    result, problems = resolve_access(parse_config(text, path), path, uid_of=USERS.__getitem__,
                                      gid_of=GROUPS.__getitem__)  # fmt: skip
    assert result is None
    assert [str(p) for p in problems] == [
        f"{path}: access.admin_users[1]: no user 'mallory' on this system (a user that exists: getent passwd mallory)",
        f"{path}: access.admin_groups[1]: no group 'wheel' on this system (a group that exists: getent group wheel)",
        f"{path}: access.proxy_groups[1]: no group 'vidoe' on this system (a group that exists: getent group vidoe)",
        f"{path}: access.modules.awb.users[0]: no user 'eve' on this system (a user that exists: getent passwd eve)",
        f"{path}: daemon.socket_group: no group 'nosuchgroup' on this system (a group that exists: getent group nosuchgroup)",
    ]


def test_the_default_admin_group_may_be_missing(tmp_path: Path) -> None:
    """The default ipad-admin grants nothing where it does not exist; written, it must exist."""
    path = tmp_path / "c.toml"
    no_groups: dict[str, int] = {}
    result, problems = resolve_access(parse_config("", path), path, uid_of=USERS.__getitem__,
                                      gid_of=no_groups.__getitem__)  # fmt: skip
    assert problems == []
    assert result is not None
    assert result.missing_defaults == ("ipad-admin",)
    assert not result.policy.may_admin(peer(1000, 990))
    written = parse_config('[access]\nadmin_groups = ["ipad-admin"]\n', path)
    assert resolve_access(written, path, uid_of=USERS.__getitem__,
                          gid_of=no_groups.__getitem__)[0] is None  # fmt: skip


def test_names_are_checked_against_the_real_system(tmp_path: Path) -> None:
    """Without replaced lookups, real users and groups resolve (root exists everywhere)."""
    path = tmp_path / "c.toml"
    text = '[daemon]\nsocket_group = "root"\n[access]\nadmin_users = ["root"]\nadmin_groups = []\n'
    result, problems = resolve_access(parse_config(text, path), path)
    assert problems == []
    assert result is not None
    assert result.socket_gid == 0
    assert result.policy.admin.uids == frozenset({0})


def test_describe() -> None:
    """Rules read as a person would say them."""
    assert describe(["*"], ["video"]) == "anyone"
    assert describe(["alice", "bob"], []) == "users alice, bob"
    assert describe([], ["video"]) == "group video"
    assert describe([], []) == "nobody else"
    assert Rule(anyone=True).allows(peer(12345))


def test_peer_of_a_socketpair_is_this_process() -> None:
    """SO_PEERCRED and SO_PEERGROUPS name this very process: pid, uid, gid and groups."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        found = peer_of(ours)
    assert (found.pid, found.uid, found.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert found.groups == frozenset({os.getegid(), *os.getgroups()})
    assert found.groups_known


#: Connects to the path in argv[1] and waits for the other side to close.
CONNECT = "import socket,sys; s=socket.socket(1, 5); s.connect(sys.argv[1]); s.recv(1)"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("count", [3, 300])
@needs_setpriv
def test_peer_groups_come_from_the_kernel(tmp_path: Path, count: int) -> None:
    """A peer's supplementary groups as setpriv set them, even past Python's 256-group buffer."""
    groups = list(range(5000, 5000 + count))
    path = tmp_path / "s"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:
        listener.bind(str(path))
        listener.listen()
        # Root keeps uid 0 (so the interpreter stays reachable) but takes these groups only.
        child = subprocess.Popen([*setpriv(0, 0, groups), sys.executable, "-c", CONNECT, str(path)])
        try:
            conn, _ = listener.accept()
            with conn:
                found = peer_of(conn)
        finally:
            child.wait(timeout=20)
    assert found.pid == child.pid
    assert found.groups == frozenset({0, *groups})
    assert found.groups_known
