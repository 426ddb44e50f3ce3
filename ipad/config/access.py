"""Who is at the other end of a client connection, and what the configuration lets them do.

The kernel says who connected: SO_PEERCRED gives the peer's pid, uid and gid
and SO_PEERGROUPS its supplementary groups, both as they were when the peer
called connect(). Nothing is read from /proc/<pid>/status: by the time the
daemon looked, that process could have exited and its pid been reused by
another (a privileged one, say), and the groups read would be the wrong
process's. Where a kernel lacks SO_PEERGROUPS (before Linux 4.13) a peer
counts with its primary group only: group rules then grant less, never more.

User and group names in the configuration are looked up once, when it is
loaded (or reloaded), so no request waits on NSS (an LDAP server, say); group
membership is the peer's own, so ``usermod -a -G`` takes effect at the user's
next login without a reload.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import attrs

from ipad.config.model import ANYONE, DEFAULT_ADMIN_GROUP, Config
from ipad.config.problems import Problem, join_key

#: Linux's SO_PEERGROUPS (asm-generic value; Python's socket module does not name it).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)

#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("3i")

#: CPython's getsockopt takes at most 1024 bytes: 256 groups. More need a bigger buffer.
_GROUPS_BUFFER = 1024

#: The most supplementary groups a Linux process can have (NGROUPS_MAX).
NGROUPS_MAX = 65536

#: A gid_t.
_GID = struct.Struct("I")


class SocketLike(Protocol):
    """What reading peer credentials needs of a socket (stdlib's or trio's)."""

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        """SO_PEERCRED and SO_PEERGROUPS are read through it."""

    def fileno(self) -> int:
        """The descriptor, for the getsockopt trio's socket does not offer."""


@attrs.frozen
class Peer:
    """The process that connected, as the kernel recorded it at connect()."""

    pid: int
    uid: int
    gid: int
    #: Every group it was in: its primary group and its supplementary groups.
    groups: frozenset[int]
    #: False where the kernel could not say the supplementary groups (then only ``gid``).
    groups_known: bool = True


def peer_of(sock: SocketLike) -> Peer:
    """The credentials of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    groups = peer_groups(sock)
    if groups is None:
        return Peer(pid, uid, gid, frozenset({gid}), groups_known=False)
    return Peer(pid, uid, gid, frozenset({gid, *groups}))


def peer_groups(sock: SocketLike) -> tuple[int, ...] | None:
    """The peer's supplementary groups from SO_PEERGROUPS; None where the kernel has none."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFFER)
    except OSError as exc:
        if exc.errno == errno.ERANGE:  # more than 256 groups: ask with a buffer for all
            return _unpack_gids(_getsockopt_large(sock.fileno()))
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return None
        raise
    return _unpack_gids(raw)


def _unpack_gids(raw: bytes) -> tuple[int, ...]:
    usable = len(raw) - len(raw) % _GID.size
    return tuple(gid for (gid,) in _GID.iter_unpack(raw[:usable]))


def _getsockopt_large(fd: int) -> bytes:
    """SO_PEERGROUPS through libc, with room for NGROUPS_MAX groups."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = ctypes.c_uint32(NGROUPS_MAX * _GID.size)
    buffer = ctypes.create_string_buffer(size.value)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, buffer, ctypes.byref(size)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buffer.raw[: size.value]


@attrs.frozen
class Rule:
    """Who may do one thing: anyone, or these uids and the members of these gids."""

    anyone: bool = False
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    #: The rule as the configuration wrote it, for messages: "users alice; groups video".
    text: str = "nobody else"

    def allows(self, peer: Peer) -> bool:
        """Whether the rule lets ``peer`` in (by uid, or by any of its groups)."""
        return self.anyone or peer.uid in self.uids or not self.gids.isdisjoint(peer.groups)


#: Anyone who can connect: what a daemon without an [access] table allows.
OPEN = Rule(anyone=True, text="anyone")


@attrs.frozen
class AccessPolicy:
    """The [access] table with every name resolved to its id."""

    admin: Rule = OPEN
    proxies: Rule = OPEN
    modules: dict[str, Rule] = attrs.field(factory=dict)
    #: root and the daemon's own user: they could signal or replace the daemon anyway.
    trusted: frozenset[int] = frozenset({0})

    def may_admin(self, peer: Peer) -> bool:
        """Whether ``peer`` may restart modules, reload the configuration and stop the daemon."""
        return peer.uid in self.trusted or self.admin.allows(peer)

    def may_use(self, peer: Peer, module: str) -> bool:
        """Whether ``peer`` may request (and reopen) proxies to ``module``."""
        return peer.uid in self.trusted or self.module_rule(module).allows(peer)

    def module_rule(self, module: str) -> Rule:
        """The rule for proxies to ``module``: its own table, else ``proxy_users``/``groups``."""
        return self.modules.get(module, self.proxies)

    def who(self, rule: Rule) -> str:
        """Who a rule lets in, for a denial's message."""
        trusted = ", ".join(
            "root" if uid == 0 else f"uid {uid} (the daemon's user)" for uid in sorted(self.trusted)
        )
        return f"{trusted}; {rule.text}"


#: A name lookup: name -> id, KeyError if there is none (replaceable in tests).
Lookup = Callable[[str], int]


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid


@attrs.frozen
class Resolved:
    """What resolving a configuration's names gave: the policy and the socket's group."""

    policy: AccessPolicy
    socket_gid: int | None
    #: Groups the default configuration names that this system does not have.
    missing_defaults: tuple[str, ...] = ()


class _Resolver:
    """Looks names up, noting a Problem at its key for each that does not exist."""

    def __init__(self, path: Path, uid_of: Lookup, gid_of: Lookup) -> None:
        self.path = path
        self.lookups = {"user": uid_of, "group": gid_of}
        self.problems: list[Problem] = []
        self.missing_defaults: list[str] = []

    def ids(self, key: str, names: Iterable[str], kind: str, *, default: bool = False) -> set[int]:
        """The ids of ``names`` (a list at ``key``); with ``default``, missing ones are skipped."""
        found: set[int] = set()
        for index, name in enumerate(names):
            found |= self.id(f"{key}[{index}]", name, kind, default=default)
        return found

    def id(self, key: str, name: str, kind: str, *, default: bool = False) -> set[int]:
        """The id of one name (none for '*'), or a problem at ``key``."""
        found: set[int] = set()
        if name != ANYONE:
            try:
                found.add(self.lookups[kind](name))
            except KeyError:
                if default:
                    self.missing_defaults.append(name)
                else:
                    database = "passwd" if kind == "user" else "group"
                    hint = f"a {kind} that exists: getent {database} {name}"
                    problem = Problem(self.path, key, f"no {kind} {name!r} on this system", hint)
                    self.problems.append(problem)
        return found

    def rule(
        self, key: str, users: tuple[str, ...], groups: tuple[str, ...], *, default: bool = False
    ) -> Rule:
        """A rule from a users list at ``key``users and a groups list at ``key``groups."""
        uids = self.ids(f"{key}users", users, "user")
        gids = self.ids(f"{key}groups", groups, "group", default=default)
        return Rule(ANYONE in users, frozenset(uids), frozenset(gids), describe(users, groups))


def resolve_access(
    config: Config,
    path: Path,
    *,
    uid_of: Lookup = _uid,
    gid_of: Lookup = _gid,
    daemon_uid: int | None = None,
) -> tuple[Resolved | None, list[Problem]]:
    """Look up every user and group the configuration names; problems name the key.

    A name the file itself wrote must exist. Without ``admin_groups``, the
    group ``ipad-admin`` (made by the shipped sysusers.d file) is the admin
    group where it exists and grants nothing where it does not, so the default
    configuration runs anywhere.
    """
    access = config.access
    names = _Resolver(path, uid_of, gid_of)
    default = access.admin_groups is None
    admin_groups = (DEFAULT_ADMIN_GROUP,) if access.admin_groups is None else access.admin_groups
    admin = names.rule("access.admin_", access.admin_users, admin_groups, default=default)
    proxies = names.rule("access.proxy_", access.proxy_users, access.proxy_groups)
    modules = {
        name: names.rule(join_key("access.modules", name) + ".", table.users, table.groups)
        for name, table in access.modules.items()
    }
    socket_gid = None
    if config.daemon.socket_group is not None:
        found = names.id("daemon.socket_group", config.daemon.socket_group, "group")
        socket_gid = next(iter(found), None)
    if names.problems:
        return None, names.problems
    trusted = frozenset({0, os.geteuid() if daemon_uid is None else daemon_uid})
    policy = AccessPolicy(admin, proxies, modules, trusted)
    return Resolved(policy, socket_gid, tuple(names.missing_defaults)), []


def describe(users: Iterable[str], groups: Iterable[str]) -> str:
    """A rule as a person reads it: "anyone", or "users alice, bob; group video"."""
    users, groups = list(users), list(groups)
    if ANYONE in users:
        return "anyone"
    parts = [f"{kind}{'' if len(names) == 1 else 's'} {', '.join(names)}"
             for kind, names in (("user", users), ("group", groups)) if names]  # fmt: skip
    return "; ".join(parts) if parts else "nobody else"
