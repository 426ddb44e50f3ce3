"""From a module's sandbox settings to the SandboxSpec its workers apply, or the reasons why not.

A sandbox that cannot be built here is a configuration problem, found by
``--check-config`` and at start: an unknown user or group, a limit above what
an unprivileged daemon may set, a namespace this kernel refuses, a memory
limit with no memory controller to enforce it. Each names the module and the
key it comes from. A measure the configuration lists as ``optional`` is left
out instead, and the daemon says so once at start (``sandbox.measure_unavailable``).

Whether namespaces, mounts and the seccomp filter work is learnt by trying
them in a throwaway child, once per process and kind of sandbox: the kernel,
its sysctls and security modules decide, and a trial asks all of them at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import grp
import os
import pwd
import resource
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs

from ipad.config.memory_support import MemorySupport, probe
from ipad.config.model import SandboxSettings
from ipad.protocol.wire import SandboxSpec
from ipad.worker import seccomp as _seccomp
from ipad.worker.sandbox import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    MS_NODEV,
    MS_NOSUID,
    SandboxError,
    _map_ids,  # the trial takes the very steps a worker takes
)

#: What a Python worker needs of the system, shown read-only (those that exist).
SYSTEM_PATHS = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
    "/etc/passwd", "/etc/group", "/etc/nsswitch.conf",
)  # fmt: skip

#: setrlimit names per setting.
RLIMITS = {
    "address_space": "RLIMIT_AS",
    "open_files": "RLIMIT_NOFILE",
    "processes": "RLIMIT_NPROC",
    "cpu_seconds": "RLIMIT_CPU",
}


@attrs.frozen
class Unavailable:
    """An optional measure left out of a module's sandbox, and why (logged once at start)."""

    module: str
    measure: str
    reason: str


@attrs.frozen
class SandboxPlan:
    """A module's spec, the problems that stop it, and the optional measures left out."""

    spec: SandboxSpec | None
    #: (setting, message): the setting is a key of the sandbox table.
    problems: tuple[tuple[str, str], ...] = ()
    unavailable: tuple[Unavailable, ...] = ()


@attrs.frozen
class ModuleFiles:
    """The paths of one module a sandbox shows it, and those of others it must hide."""

    module_dir: Path
    tuning: Path
    worker: Path
    #: Every directory modules and tuning files are searched in (others' data lives there).
    searched: tuple[Path, ...]


def plan(name: str, settings: SandboxSettings, files: ModuleFiles) -> SandboxPlan:
    """Build the module's SandboxSpec, or say which settings stop it."""
    problems: list[tuple[str, str]] = []
    unavailable: list[Unavailable] = []
    root = os.geteuid() == 0

    def lacking(measure: str, setting: str, reason: str) -> bool:
        """Record a measure this host lacks: leave it out if optional, else a problem."""
        if measure in settings.optional:
            unavailable.append(Unavailable(name, measure, reason))
        else:
            problems.append((setting, f"module {name}: {reason}"))
        return False

    uid, gid = _account(name, settings, problems)
    wanted = {
        "pid_namespace": settings.pid_namespace,
        "network": settings.private_network,
        "ipc": settings.private_ipc,
        "mounts": settings.private_mounts,
    }
    setting_of = {"pid_namespace": "pid_namespace", "network": "private_network",
                  "ipc": "private_ipc", "mounts": "private_mounts"}  # fmt: skip
    if any(wanted.values()):
        failure = namespace_trial(root)
        if failure is not None:
            for measure in [m for m, on in wanted.items() if on]:
                wanted[measure] = lacking(measure, setting_of[measure], failure)
    seccomp = settings.seccomp
    if seccomp:
        failure = seccomp_trial()
        if failure is not None:
            seccomp = lacking("seccomp", "seccomp", failure)
    memory_max = settings.memory_max.bytes
    if memory_max is not None:
        support = memory_support()
        if support.version is None:
            memory_max = None
            reason = f"no memory cgroup controller to enforce memory_max: {support.reason}"
            lacking("memory_max", "memory_max", reason)
    rlimits = {RLIMITS[key]: _limit(getattr(settings, key)) for key in RLIMITS}
    if not settings.cpu_seconds:
        rlimits.pop("RLIMIT_CPU")
    rlimits["RLIMIT_CORE"] = 0
    if not root:
        problems.extend(_unprivileged_problems(name, settings, rlimits))
    if problems:
        return SandboxPlan(None, tuple(problems), tuple(unavailable))
    spec = SandboxSpec(
        module=name,
        uid=uid if root else None,
        gid=gid if root else None,
        user_namespace=not root and any(wanted.values()),
        pid_namespace=wanted["pid_namespace"],
        network=wanted["network"],
        ipc=wanted["ipc"],
        view=view(files, settings.read_only_paths) if wanted["mounts"] else None,
        hidden=hidden(files) if wanted["mounts"] else (),
        tmp_size=settings.tmp_size.bytes or 0,
        rlimits=rlimits,
        no_new_privs=settings.no_new_privs,
        oom_score_adj=settings.oom_score_adj,
        memory_max=memory_max,
        seccomp=seccomp,
    )
    return SandboxPlan(spec, (), tuple(unavailable))


def _account(
    name: str, settings: SandboxSettings, problems: list[tuple[str, str]]
) -> tuple[int | None, int | None]:
    """The uid and gid of the configured user and group (None, with a problem, if unknown)."""
    uid = gid = None
    try:
        account = pwd.getpwnam(settings.user)
        uid, gid = account.pw_uid, account.pw_gid
    except KeyError:
        problems.append(("user", f"module {name}: no user {settings.user!r} on this system"))
    if settings.group is not None:
        try:
            gid = grp.getgrnam(settings.group).gr_gid
        except KeyError:
            problems.append(("group", f"module {name}: no group {settings.group!r} on this system"))
    return uid, gid


def _unprivileged_problems(
    name: str, settings: SandboxSettings, rlimits: Mapping[str, int]
) -> Iterable[tuple[str, str]]:
    """What an unprivileged daemon cannot grant: limits above its own, a lower OOM score."""
    yield from _unraisable(name, rlimits)
    current = _own_oom_score_adj()
    if settings.oom_score_adj < current:
        message = (
            f"an unprivileged daemon cannot set {settings.oom_score_adj}, below its own {current}"
        )
        yield ("oom_score_adj", f"module {name}: {message}")


def _limit(value: object) -> int:
    if isinstance(value, int):
        return value
    size = getattr(value, "bytes", None)
    return -1 if size is None else int(size)


def _unraisable(name: str, rlimits: Mapping[str, int]) -> Iterable[tuple[str, str]]:
    """Limits above this process's hard limits, which an unprivileged daemon cannot grant."""
    settings = {v: k for k, v in RLIMITS.items()}
    for rlimit, value in rlimits.items():
        _, hard = resource.getrlimit(getattr(resource, rlimit))
        wanted = resource.RLIM_INFINITY if value < 0 else value
        if hard != resource.RLIM_INFINITY and (wanted == resource.RLIM_INFINITY or wanted > hard):
            message = f"{rlimit} {value} is above this daemon's hard limit {hard}"
            yield (
                settings.get(rlimit, rlimit),
                f"module {name}: {message}, which only root may raise",
            )


def _own_oom_score_adj() -> int:
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


def view(files: ModuleFiles, extra: Sequence[Path] = ()) -> tuple[str, ...]:
    """The host paths a worker sees: the system, the Python runtime, its module's own files."""
    paths = [Path(p) for p in SYSTEM_PATHS] + python_paths() + list(extra)
    # Its own files always get a bind of their own: the tuning file must show through
    # the empty directory that hides the others' tuning files around it.
    own = [str(p.resolve()) for p in (files.module_dir, files.tuning, files.worker)]
    return tuple(dict.fromkeys([*minimal(paths), *own]))


def hidden(files: ModuleFiles) -> tuple[str, ...]:
    """Module and tuning directories other than the module's own, shown empty if in view."""
    own = files.module_dir.resolve()
    return tuple(sorted({str(d.resolve()) for d in files.searched if d.resolve() != own}))


@functools.cache
def python_paths() -> list[Path]:
    """The interpreter, its standard library and site-packages, and the ipad package.

    A checkout installed in editable mode puts the whole checkout on sys.path;
    only its ``ipad`` package is shown, not its tuning files and test modules.
    """
    package = Path(__file__).resolve().parents[1]  # ipad/, this file being ipad/config/…
    paths = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                        sys.base_exec_prefix)}  # fmt: skip
    paths |= {Path(os.path.realpath(sys.executable)), package}
    for entry in sys.path:
        path = Path(entry).resolve() if entry else None
        if path is None or not path.is_dir() or path == Path.cwd().resolve():
            continue
        if package.is_relative_to(path) and path != package:
            continue  # the checkout holding the package: the package alone is shown
        paths.add(path)
    return sorted(paths)


def minimal(paths: Iterable[Path]) -> tuple[str, ...]:
    """Absolute, resolved paths that exist, none inside another (one bind each)."""
    resolved = set()
    for path in paths:
        if not os.path.lexists(path):
            continue
        # A symbolic link is shown as the link itself (/lib -> usr/lib) and its target.
        if path.is_symlink() and str(path) in SYSTEM_PATHS:
            resolved.add(path)
            continue
        resolved.add(path.resolve())
    ordered = sorted(resolved, key=lambda p: p.parts)
    kept: list[Path] = []
    for path in ordered:
        if not any(path != k and path.is_relative_to(k) and not k.is_symlink() for k in kept):
            kept.append(path)
    return tuple(str(p) for p in kept)


@functools.cache
def memory_support() -> MemorySupport:
    """The memory controller this daemon can use (looked at once per process)."""
    return probe()


@functools.cache
def seccomp_trial() -> str | None:
    """Why a seccomp filter cannot be installed here, or None if it can."""
    if not _seccomp.supported():
        return f"no seccomp filter for this machine's architecture ({_seccomp.machine()})"
    return _trial(_seccomp_child)


@functools.cache
def namespace_trial(root: bool) -> str | None:
    """Why this daemon cannot give a worker its namespaces and mount view, or None."""
    return _trial(functools.partial(_namespace_child, root))


def _namespace_child(root: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    outer = (os.getuid(), os.getgid())
    if not root:
        if libc.unshare(CLONE_NEWUSER) != 0:
            raise SandboxError("user_namespace", _errno_text("cannot make a user namespace"))
        _map_ids(*outer)
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID
    if libc.unshare(flags) != 0:
        raise SandboxError("namespaces", _errno_text("cannot make mount, network, IPC and PID "
                                                     "namespaces"))  # fmt: skip
    if libc.mount(None, b"/", None, 0x44000, None) != 0:  # MS_REC | MS_PRIVATE
        raise SandboxError("mounts", _errno_text("cannot make the mounts private"))
    if libc.mount(b"ipad-trial", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=4k") != 0:
        raise SandboxError("mounts", _errno_text("cannot mount a tmpfs"))
    # A /proc of its own PID namespace: only the namespace's first process can mount it.
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.mount(b"proc", b"/tmp", b"proc", MS_NOSUID | MS_NODEV, None) == 0 else
                 ctypes.get_errno())  # fmt: skip
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code != 0:
        raise SandboxError("mounts", f"cannot mount /proc for a PID namespace: {os.strerror(code)}")


def _seccomp_child() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_seccomp.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    try:
        _seccomp.install(_seccomp.build_filter(), libc.prctl)
    except _seccomp.SeccompUnavailable as exc:
        raise SandboxError("seccomp", str(exc)) from None


def _errno_text(what: str) -> str:
    code = ctypes.get_errno()
    hint = ""
    if code in (errno.EPERM, errno.ENOSPC, errno.EACCES):
        hint = _namespace_hint()
    return f"{what}: {os.strerror(code)}{hint}"


def _namespace_hint() -> str:
    for path, bad in (("/proc/sys/user/max_user_namespaces", "0"),
                      ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
                      ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1")):  # fmt: skip
        with contextlib.suppress(OSError):
            if Path(path).read_text().strip() == bad:
                return f" ({path} is {bad})"
    return ""


def _trial(step: object) -> str | None:
    """Run ``step`` in a forked child; None if it returned, else the reason it gave."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: try, report, exit; nothing of the parent's is touched
        message = b""
        try:
            step()  # type: ignore[operator]
        except SandboxError as exc:
            message = exc.reason.encode()
        except BaseException as exc:  # noqa: BLE001 - anything at all is the trial's answer
            message = repr(exc).encode()
        with contextlib.suppress(OSError):
            os.write(write_end, message or b"ok")
        os._exit(0)
    os.close(write_end)
    try:
        answer = b""
        while chunk := os.read(read_end, 4096):
            answer += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return None if answer == b"ok" else answer.decode(errors="replace") or "the trial died"
