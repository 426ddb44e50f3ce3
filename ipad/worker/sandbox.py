"""Confining a new worker before it runs any module code (the ``sandboxed`` proxy kind).

The worker applies its SandboxSpec to itself, in this order: its own ids in a
user namespace (unprivileged daemons), the memory cgroup it joins, its
``oom_score_adj``, new mount, network and IPC namespaces, the read-only view of
the file system, resource limits, the user it runs as (root daemons) with every
capability dropped, ``no_new_privs``, and the seccomp filter last. Its PID
namespace, and for an unprivileged daemon the user namespace it needs, come
with the fork itself (``clone_flags``). A forked worker does all of it in
well under a millisecond (bench/bench_restart.py), so standby workers are
sandboxed like any other and restarts stay fast.

No trio, no structlog: this runs in the worker host, forked from the fork
server or started by ipad/worker/jail.py. A failure raises SandboxError naming the
step; the worker then refuses to load its module and says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import resource
import stat
from collections.abc import Iterator

from ipad.protocol.wire import SandboxSpec
from ipad.worker import seccomp as _seccomp

# clone(2) and unshare(2) flags.
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# mount_setattr(2): make a bind and everything below it read-only in one call (Linux 5.12).
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4

# prctl(2) options and capability constants.
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: close_range(2): one call closes every descriptor above the kept ones (Linux 5.9).
SYS_CLOSE_RANGE = 436

#: Where the worker's new root is assembled before pivot_root; the host's /tmp is seen
#: again below the old root once the tmpfs moves away from it (bubblewrap's trick).
STAGE = "/tmp"  # noqa: S108 - a mount point in our own mount namespace, not a file in /tmp
OLD_ROOT = "/.oldroot"
#: The skeleton of directories and empty mount points the view is bound onto.
SKELETON_OPTIONS = "mode=0755,size=4m,nr_inodes=8192"
#: Device nodes a Python worker needs; bound from the host's /dev.
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}  # fmt: skip

#: The descriptors a worker keeps: /dev/null, its output pipe (twice), its control socket.
KEPT_FDS = 4


class SandboxError(Exception):
    """A measure could not be applied; ``step`` names it."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                          ctypes.c_char_p]  # fmt: skip
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.unshare.argtypes = [ctypes.c_int]
    lib.pivot_root.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    for name in ("prctl", "syscall", "capset"):
        getattr(lib, name)
    return lib


def warm() -> None:
    """Look up everything ``apply`` calls, so forks of the caller find it ready."""
    _libc()
    _cap_last()
    with contextlib.suppress(_seccomp.SeccompUnavailable):
        _seccomp.build_filter()


def _check(result: int, step: str, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise SandboxError(step, f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    """Report an OSError of a step as a SandboxError naming it."""
    try:
        yield
    except OSError as exc:
        raise SandboxError(
            name, f"{exc.strerror or exc} ({exc.filename or ''})".rstrip(" ()")
        ) from exc


def clone_flags(spec: SandboxSpec) -> int:
    """The namespaces the fork itself must make: PID (and user, which it needs unprivileged)."""
    flags = CLONE_NEWPID if spec.pid_namespace else 0
    if spec.user_namespace and flags:
        flags |= CLONE_NEWUSER
    return flags


def apply(spec: SandboxSpec, outer_ids: tuple[int, int], *, in_user_namespace: bool) -> None:
    """Confine this process as ``spec`` says; raise SandboxError naming the step that failed.

    ``outer_ids`` are the uid and gid the process had before any user namespace;
    ``in_user_namespace`` says whether the fork made that namespace already.
    """
    libc = _libc()
    last_cap = _cap_last()
    if spec.user_namespace:
        if not in_user_namespace:
            _check(libc.unshare(CLONE_NEWUSER), "user_namespace", "unshare")
        _map_ids(*outer_ids)
    if spec.memory_cgroup is not None:
        with _step("memory_max"):
            _write(os.path.join(spec.memory_cgroup, "cgroup.procs"), "0")
    if spec.oom_score_adj is not None:
        with _step("oom_score_adj"):
            _write("/proc/self/oom_score_adj", str(spec.oom_score_adj))
    flags = (CLONE_NEWNS if spec.view is not None else 0) | (CLONE_NEWNET if spec.network else 0)
    flags |= CLONE_NEWIPC if spec.ipc else 0
    if flags:
        _check(libc.unshare(flags), "namespaces", "unshare")
    if spec.view is not None:
        _build_view(spec)
    for name, value in spec.rlimits.items():
        limit = resource.RLIM_INFINITY if value < 0 else value
        with _step("rlimits"):
            resource.setrlimit(getattr(resource, name), (limit, limit))
    _drop_privileges(spec, last_cap)
    if spec.no_new_privs:
        _check(libc.prctl(_seccomp.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs", "prctl")
    if spec.seccomp:
        restrict = None if spec.pid_namespace else os.getpid()
        try:
            _seccomp.install(_seccomp.build_filter(restrict_signals_to=restrict), libc.prctl)
        except _seccomp.SeccompUnavailable as exc:
            raise SandboxError("seccomp", str(exc)) from None


def close_other_fds(keep: int = KEPT_FDS) -> None:
    """Close every descriptor from ``keep`` up: nothing of the daemon's or fork server's stays."""
    if _libc().syscall(SYS_CLOSE_RANGE, keep, 0xFFFFFFFF, 0) != 0:
        os.closerange(keep, os.sysconf("SC_OPEN_MAX"))


def _write(path: str, text: str) -> None:
    """Write a /proc or cgroup file.

    Not with pathlib: this module runs in the fork server, and pathlib (with the
    fnmatch, urllib and ipaddress it imports) is 0.6 MiB that every forked
    worker would map, and that the kernel tears down at each worker's exit.
    """
    with open(path, "w") as file:
        file.write(text)


def _map_ids(uid: int, gid: int) -> None:
    """Map only our own uid and gid into the new user namespace (all an unprivileged one may)."""
    with _step("user_namespace"):
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")


@functools.cache
def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:  # not pathlib: see _write
            return int(file.read())
    except (OSError, ValueError):
        return 40


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def _drop_privileges(spec: SandboxSpec, last_cap: int) -> None:
    """No capability left, not even to get one back; as root, become the configured user."""
    libc = _libc()
    if os.geteuid() == 0 or spec.user_namespace:
        for cap in range(last_cap + 1):
            _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "capabilities", "drop bounding set")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if spec.uid is not None and spec.gid is not None:
        with _step("user"):
            os.setgroups([])
            os.setresgid(spec.gid, spec.gid, spec.gid)
            os.setresuid(spec.uid, spec.uid, spec.uid)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    empty = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), empty), "capabilities", "capset")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None, *, step: str = "mounts") -> None:  # fmt: skip
    encoded = [None if v is None else v.encode() for v in (source, target, fstype)]
    result = _libc().mount(*encoded, flags, None if data is None else data.encode())
    _check(result, step, f"mount {source or ''} on {target}".replace("  ", " "))


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clear", "propagation", "userns")]


def _read_only(target: str, *, devices: bool = False) -> None:
    """Make a mount and every mount below it read-only (and nosuid, and nodev unless devices)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (0 if devices else MOUNT_ATTR_NODEV))
    done = _libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target.encode(), AT_RECURSIVE,
                           ctypes.byref(attr), ctypes.sizeof(attr))  # fmt: skip
    if done != 0:  # an older kernel: the top mount only, keeping the flags it is locked with
        locked = os.statvfs(target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | locked
        _mount(None, target, None, flags | (0 if devices else MS_NODEV))


def _build_view(spec: SandboxSpec) -> None:
    """A new root: an empty tmpfs with the spec's host paths bound read-only at their place.

    Nothing else of the host is reachable: the old root is detached at the end.
    Only /tmp (a tmpfs of ``tmp_size``) is writable; /proc is the worker's own
    PID namespace's; /dev has the few nodes a Python process needs.
    """
    assert spec.view is not None  # noqa: S101 - the caller checked
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("ipad-root", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, SKELETON_OPTIONS)
    os.mkdir(STAGE + OLD_ROOT)
    _check(_libc().pivot_root(STAGE.encode(), (STAGE + OLD_ROOT).encode()), "mounts", "pivot_root")
    os.chdir("/")
    # The private /tmp first: a view path below /tmp (a checkout there) is bound onto it.
    with _step("mounts"):
        os.mkdir("/tmp", 0o1777)  # noqa: S108 - the private tmp
        _mount("ipad-tmp", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,  # noqa: S108
               f"mode=1777,size={max(spec.tmp_size, 4096)}")  # fmt: skip
    hidden = set(spec.hidden)
    made: list[str] = []  # tmpfs hiding a directory: read-only once all is bound into them
    for path in sorted({*spec.view, *hidden}, key=lambda p: os.path.normpath(p).split("/")):
        with _step("mounts"):
            if path in hidden:
                if os.path.isdir(path):  # visible through some bind: show it empty
                    _mount("ipad-hidden", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
                    made.append(path)
            else:
                _bind(OLD_ROOT + path, path)
    _special_dirs(spec)
    _check(_libc().umount2(OLD_ROOT.encode(), MNT_DETACH), "mounts", "detach the old root")
    os.rmdir(OLD_ROOT)
    for path in made:
        _read_only(path)
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/")


def _bind(source: str, target: str) -> None:
    """Bind one host path read-only at ``target``, making its mount point on our tmpfs."""
    try:
        info = os.lstat(source)
    except FileNotFoundError:
        return  # a path the host does not have (no /lib64, say): nothing to show
    if stat.S_ISLNK(info.st_mode):
        if not os.path.lexists(target):
            _make_parent(target)
            os.symlink(os.readlink(source), target)
        return
    if not os.path.lexists(target):  # never true inside a bound host tree: same paths
        _make_parent(target)
        if stat.S_ISDIR(info.st_mode):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
    _mount(source, target, None, MS_BIND | MS_REC)
    _read_only(target, devices=stat.S_ISCHR(info.st_mode))


def _make_parent(target: str) -> None:
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)


def _special_dirs(spec: SandboxSpec) -> None:
    """/dev and /proc, while the old root is still there to bind from."""
    with _step("mounts"):
        os.makedirs("/dev", 0o755, exist_ok=True)
        _mount("ipad-dev", "/dev", "tmpfs", MS_NOSUID, "mode=0755,size=64k")
        for name in DEVICES:
            _bind(f"{OLD_ROOT}/dev/{name}", f"/dev/{name}")
        for name, target in DEV_LINKS.items():
            os.symlink(target, f"/dev/{name}")
        _read_only("/dev", devices=True)
        os.makedirs("/proc", 0o555, exist_ok=True)
        if spec.pid_namespace:  # our own PID namespace's processes: just ours
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        else:  # a new proc needs a PID namespace of ours; the host's, read-only, will do
            _bind(f"{OLD_ROOT}/proc", "/proc")
