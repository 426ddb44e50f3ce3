"""Sandboxes that cannot be built are configuration errors, naming the module and the setting.

``ipad --check-config`` and the daemon's start run the same checks, so a bad
sandbox never becomes a crash loop. The kernel's refusal of namespaces is
shown for real: the check runs under a seccomp filter that denies unshare(2).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipad.config.loader import parse_config
from ipad.config.problems import ConfigError
from ipad.worker import seccomp as _seccomp
from tests.daemon_process import REPO, DaemonProcess, write_config
from tests.privileges import as_user
from tests.test_e2e_unprivileged import nobody_dir

__all__ = ["nobody_dir"]  # a fixture, used by name

#: Runs ``sys.argv[1:]`` with unshare(2) failing with EPERM, as a kernel without namespaces would.
NO_UNSHARE = textwrap.dedent("""
    import ctypes, os, struct, sys
    from ipad.worker import seccomp as s
    nr = s.SYSCALLS[s.machine()]["unshare"]
    code = [(0x20, 0, 0, 0), (0x15, 0, 1, nr), (0x06, 0, 0, s.RET_ERRNO | 1), (0x06, 0, 0, s.RET_ALLOW)]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(s.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    s.install(b"".join(struct.pack("<HBBI", *i) for i in code), libc.prctl)
    os.execv(sys.argv[1], sys.argv[1:])
""")

SANDBOXED = '[modules.echo]\nproxy = "sandboxed"\n[modules.awb]\nproxy = "sandboxed"\n'


def check(config: Path, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [*prefix, sys.executable, "-m", "ipad", "--check-config", str(config)],
        capture_output=True, text=True, timeout=30, check=False, cwd=REPO, env=env,
    )  # fmt: skip


def test_unknown_user_and_group_name_the_module_and_key(tmp_path: Path) -> None:
    """A user or group this system lacks is reported where it was written, for each module."""
    modules = SANDBOXED + '[modules.awb.sandbox]\ngroup = "no-such-group"\n'
    config = write_config(tmp_path, '[sandbox]\nuser = "no-such-user"\n', modules=modules)
    result = check(config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{config}: sandbox.user: module echo: no user 'no-such-user' on this system",
        f"{config}: sandbox.user: module awb: no user 'no-such-user' on this system",
        f"{config}: modules.awb.sandbox.group: module awb: no group 'no-such-group' on this system",
    ]


def test_the_daemon_refuses_to_start_instead_of_crash_looping(
    tmp_path: Path, daemon_env: dict[str, str]
) -> None:
    """At start the same problem stops the daemon at once, exit status 1, no worker started."""
    config = write_config(tmp_path, '[sandbox]\nuser = "no-such-user"\n', modules=SANDBOXED)
    daemon = DaemonProcess(config, daemon_env)
    try:
        assert daemon.proc.wait(timeout=30) == 1
    finally:
        daemon.kill()
    assert any("sandbox.user: module echo: no user 'no-such-user'" in line for line in daemon.raw)
    assert not daemon.events("worker.forked")
    assert not daemon.events("worker.spawned")


def test_namespaces_the_kernel_refuses_are_errors_unless_optional(tmp_path: Path) -> None:
    """unshare(2) refused: every namespace setting is an error; listed as optional, a notice."""
    config = write_config(tmp_path, modules=SANDBOXED)
    prefix = (sys.executable, "-c", NO_UNSHARE)
    result = check(config, prefix)
    assert result.returncode == 1
    reason = "cannot make mount, network, IPC and PID namespaces: Operation not permitted"
    for setting in ("pid_namespace", "private_network", "private_ipc", "private_mounts"):
        assert f"{config}: sandbox.{setting}: module echo: {reason}" in result.stderr
    optional = '[sandbox]\noptional = ["pid_namespace", "network", "ipc", "mounts"]\n'
    assert check(write_config(tmp_path, optional, modules=SANDBOXED), prefix).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming nobody needs root")
def test_memory_limit_without_a_controller_is_an_error(nobody_dir: Path) -> None:
    """As nobody (no writable memory cgroup here) memory_max is an error, naming why."""
    config = write_config(nobody_dir, '[sandbox]\nmemory_max = "64M"\n', modules=SANDBOXED)
    env = dict(os.environ)
    result = check(config, tuple(as_user()), env)
    if result.returncode == 0:
        pytest.skip("nobody has a memory controller on this host")
    assert (
        f"{config}: sandbox.memory_max: module echo: no memory cgroup controller to enforce "
        "memory_max: " in result.stderr
    ), result.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('memory_max = "lots"', "sandbox.memory_max: cannot read size 'lots'"),
        ("oom_score_adj = -5", "sandbox.oom_score_adj: -5 is out of range (0 <= oom_score_adj"),
        ('optional = ["user"]', "sandbox.optional[0]: 'user' is not a measure that may be"),
        ('read_only_paths = ["rel"]', "sandbox.read_only_paths[0]: 'rel' is relative"),
        ("open_files = 3", "sandbox.open_files: 3 is too few"),
        ('tmp_size = "infinity"', "sandbox.tmp_size: the private /tmp needs a size"),
        ("procs = 3", "sandbox.procs: unknown key (did you mean 'processes'?)"),
    ],
)
def test_sandbox_table_errors_name_the_key(toml: str, message: str) -> None:
    """Each malformed [sandbox] value is an error at its key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[sandbox]\n{toml}\n", Path("c.toml"))
    assert any(str(p).startswith(f"c.toml: {message}") for p in caught.value.problems), [
        str(p) for p in caught.value.problems
    ]


def test_module_sandbox_table_overrides_the_defaults() -> None:
    """A module's sandbox table wins over [sandbox], key by key; its errors are reported there."""
    config = parse_config('[sandbox]\nprocesses = 8\n[modules.a.sandbox]\nopen_files = 32\n',
                          Path("c.toml"))  # fmt: skip
    merged = config.sandbox_settings("a")
    assert (merged.processes, merged.open_files) == (8, 32)
    with pytest.raises(ConfigError, match=r"modules\.a\.sandbox\.processes: 0 is below 1"):
        parse_config("[modules.a.sandbox]\nprocesses = 0\n", Path("c.toml"))


def _run_filtered(restrict: bool, body: str) -> int:
    """Fork; the child installs the filter and runs ``body``; its exit status or -signal."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        import ctypes  # noqa: PLC0415

        program = _seccomp.build_filter(restrict_signals_to=os.getpid() if restrict else None)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_seccomp.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _seccomp.install(program, libc.prctl)
        try:
            exec(body)  # noqa: S102 - the test's own code
        except BaseException:  # noqa: BLE001
            os._exit(99)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not _seccomp.supported(), reason="no filter for this architecture")
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "import socket\ntry:\n socket.socket(socket.AF_INET)\nexcept OSError as e:\n os._exit(e.errno)",
            97,
        ),
        ("import socket\nsocket.socket(socket.AF_UNIX).close()", 0),
        ("import socket\nsocket.sethostname('x')", 99),
        ("libc.unshare(0x40000000)", -signal.SIGSYS),
        ("libc.ptrace(16, 1, None, None)", -signal.SIGSYS),
        ("os.kill(os.getpid(), 0)", 0),
    ],
)
def test_seccomp_filter_in_a_real_process(body: str, expected: int) -> None:
    """Network sockets fail, AF_UNIX works, escape calls kill the process, a signal to self works."""
    assert _run_filtered(False, body) == expected


@pytest.mark.skipif(not _seccomp.supported(), reason="no filter for this architecture")
def test_seccomp_restricts_signals_without_a_pid_namespace() -> None:
    """With restrict_signals_to, only the process itself and its group can be signalled."""
    other = "try:\n os.kill(os.getppid(), 0)\nexcept PermissionError:\n os._exit(7)"
    assert _run_filtered(True, other) == 7
    assert _run_filtered(False, other) == 0
    for own in (
        "os.kill(os.getpid(), 0)",
        "os.kill(0, 0)",
        "os.setpgid(0, 0)\nos.killpg(os.getpid(), 0)",
    ):
        assert _run_filtered(True, own) == 0, own
