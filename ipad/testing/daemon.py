"""A real ipad daemon for a module's tests: private socket, generated configuration, clean stop.

::

    from ipad.testing.daemon import run_daemon

    with run_daemon(module_dirs=["af"], modules={"af": {}}, tuning_dirs=["af/tuning"]) as d:
        af = d.proxy("af")
        af.call("configure", {"sensor_info": {...}})
        d.ctl("status", "af")

The daemon is ``python -m ipad`` in a process group of its own, with a
temporary runtime directory (socket, configuration, JSON log) and an
environment stripped of the caller's ``IPAD_*`` variables. It counts as
started once every enabled module's first worker is ready; a module whose
first start fails raises :class:`DaemonStartError` with the daemon's reason.
It is stopped as a user stops it (SIGTERM) and the stop must be clean: exit
status 0 within ``stop_timeout``, ``daemon.stopped`` logged, none of the
processes it started left. Whatever happened (a failed test, a daemon killed
with SIGKILL), everything it started is killed and reaped at the end: the
process groups of the workers its log names, its cgroup subtree.

This module is what the pytest plugin (``ipad.testing.pytest_plugin``) runs;
docs/modules.md, "Testing under a real daemon", explains both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ipad.client import BlockingClient, BlockingProxy
from ipad.config.manifest import MODULE_NAME
from ipad.config.model import HOST_DEPENDENT_MEASURES
from ipad.config.tuning import CONFIG_PATH_ENV
from ipad.daemon.cgroup import remove_tree
from ipad.daemon.memory_cgroup import remove_tree as remove_memory_tree

__all__ = [
    "Daemon",
    "DaemonError",
    "DaemonStartError",
    "DaemonStopError",
    "run_daemon",
    "write_config",
]

#: Seconds the daemon and its modules get to start, and any other wait, by default.
START_TIMEOUT = 30.0
#: Seconds a stop may take by default: a worker's default stop_timeout (2 s) plus the
#: daemon's goodbye to clients (1 s) plus room for a loaded machine.
STOP_TIMEOUT = 10.0
#: How often the log and the process are looked at while waiting.
POLL = 0.01

#: Log records that name a process the daemon started, and the field holding its pid.
STARTED_EVENTS = {
    "worker.spawned": "worker_pid",
    "worker.forked": "worker_pid",
    "forkserver.started": "pid",
    "forkserver.late_fork": "worker_pid",
}

#: Variables of the caller's environment the daemon must not inherit: they would steer
#: which modules, tuning files and socket it uses, or make it think systemd runs it.
_DROPPED_PREFIXES = ("IPAD_", "LISTEN_", "WATCHDOG_")
_DROPPED = frozenset({"NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID"})

Record = dict[str, Any]

#: Run before the daemon (then exec'd into it, which keeps the setting): SIGTERM when the
#: test process dies without its teardown (SIGKILLed, os._exit), so the daemon stops
#: cleanly by itself rather than outlive the tests. argv: the test's pid, the command.
STOP_WITH_PARENT = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit("the test process is gone")
os.execv(sys.argv[2], sys.argv[2:])
"""


class DaemonError(AssertionError):
    """The daemon did not do what a test needs; an AssertionError so pytest shows it as such."""


class DaemonStartError(DaemonError):
    """The daemon, or one of its modules, did not start; the message says why."""


class DaemonStopError(DaemonError):
    """The daemon did not stop cleanly; the message lists every problem and its last log lines."""


def _toml(value: object, key: str) -> str:
    """``value`` as a TOML value (strings, numbers, booleans, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        # JSON's string escapes are TOML's basic-string escapes.
        return json.dumps(os.fspath(value), ensure_ascii=False)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml(v, f'{key}.{k}')}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v, key) for v in value) + "]"
    raise TypeError(f"{key}: cannot write {type(value).__name__} {value!r} as TOML")


def _toml_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"configuration key {key!r} is not a string")
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def write_config(
    path: Path,
    *,
    module_dirs: Sequence[str | os.PathLike[str]],
    modules: Mapping[str, Mapping[str, Any]],
    proxy: str = "sandboxed",
    strict_sandbox: bool = False,
    trusted_keys: Sequence[str | os.PathLike[str]] = (),
    extra: str = "",
) -> Path:
    """Write a daemon configuration running ``modules`` found in ``module_dirs``.

    Each module gets ``proxy`` (``"sandboxed"``, as the shipped configuration
    runs modules, unless its own table says otherwise). Unless ``strict_sandbox``,
    every sandbox measure a host may lack is optional, so the same tests run as
    root and as a user without user namespaces; a measure left out is logged
    (``sandbox.measure_unavailable``). ``trusted_keys`` are the public keys of
    signed modules (a signature that exists is checked: docs/security.md).
    ``extra`` is more TOML, merged table by table into what is generated (so
    ``[signatures] require_signature = true`` or ``[daemon] log_level`` can be
    given with the keys written here; its keys win); ``modules`` wins over its
    ``[modules.<name>]`` tables. TOML that does not parse is a ValueError here.
    """
    for name in modules:
        if not MODULE_NAME.fullmatch(name):
            raise ValueError(f"invalid module name {name!r}: ASCII letters, digits, '_' and "
                             "'-', starting with a letter or digit")  # fmt: skip
    config: dict[str, Any] = {
        "daemon": {"module_dirs": [str(Path(d).resolve()) for d in module_dirs]}
    }
    if not strict_sandbox:
        config["sandbox"] = {"optional": list(HOST_DEPENDENT_MEASURES)}
    if trusted_keys:
        config["signatures"] = {"trusted_keys": [str(Path(k).resolve()) for k in trusted_keys]}
    try:
        _merge(config, tomllib.loads(extra))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"extra configuration is not valid TOML: {exc}") from exc
    _merge(
        config, {"modules": {name: {"proxy": proxy, **table} for name, table in modules.items()}}
    )
    path.write_text("\n".join(_toml_tables(config, ())))
    return path


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge ``update`` into ``into``: tables key by key, any other value replaced."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _toml_tables(table: Mapping[str, Any], prefix: tuple[str, ...]) -> list[str]:
    """``table`` as TOML lines: its values under a ``[prefix]`` header, then its sub-tables."""
    name = ".".join(prefix)
    values = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    lines = (
        [f"[{'.'.join(_toml_key(k) for k in prefix)}]"] if prefix and (values or not table) else []
    )
    lines += [
        f"{_toml_key(k)} = {_toml(v, f'{name}.{k}' if name else k)}" for k, v in values.items()
    ]
    lines += [""] if lines else []
    for key, value in table.items():
        if isinstance(value, Mapping):
            lines += _toml_tables(value, (*prefix, key))
    return lines


def _stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks after boot) of ``pid``; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                pids += [int(x) for x in (task / "children").read_text().split()]
    return pids


def _descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid``, by pid, with its start time."""
    found: dict[int, int] = {}
    todo = _children(pid)
    while todo:
        child = todo.pop()
        stat = _stat(child)
        if stat is not None and stat[0] != "Z":
            found[child] = stat[1]
            todo += _children(child)
    return found


def _exit_text(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


class Daemon:
    """One ipad daemon started for a test; see the module's docstring.

    Attributes a test uses: ``socket`` (for ``ipad.client.open_client`` or
    ``BlockingClient``), ``pid``, ``config``, ``runtime_dir``, ``log_path``.
    """

    def __init__(
        self,
        config: Path,
        *,
        runtime_dir: Path,
        log_path: Path,
        env: Mapping[str, str],
        modules: Sequence[str],
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.log_path = log_path
        self.socket = runtime_dir / "ipad.sock"
        self.env = {**env, "IPAD_SOCKET": str(self.socket)}
        #: The modules that must be running for the daemon to count as started.
        self.modules = list(modules)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._records: list[Record] = []
        self._log_offset = 0
        self._partial = b""
        #: Processes the daemon started, by pid, with their start time.
        self._started: dict[int, int] = {}
        self._clients: list[BlockingClient] = []
        self._client: BlockingClient | None = None
        #: Why the test ended the daemon itself, if it did (``kill``): not a failure.
        self.killed_on_purpose = False
        self.stopped = False

    # --- starting -----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        if self.proc is None:
            raise DaemonError("the daemon was not started")
        return self.proc.pid

    def start(self) -> Daemon:
        """Start the daemon; return once every module in ``modules`` is running.

        DaemonStartError, with the daemon's reason and last log lines, if it
        exits, a module's first start fails, or ``start_timeout`` passes.
        """
        __tracebackhide__ = True  # pytest: the error says it all, not this code
        command = [sys.executable, "-m", "ipad", "--config", str(self.config),
                   "--log-format", "json", "--log-level", "debug"]  # fmt: skip
        if threading.current_thread() is threading.main_thread():
            # The parent-death signal follows the thread that started the daemon: only
            # the main thread lives as long as the test process.
            command = [sys.executable, "-c", STOP_WITH_PARENT, str(os.getpid()), *command]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                cwd=self.runtime_dir,
                # A group of its own: a ^C in the test's terminal goes to pytest only,
                # and teardown stops the daemon in order.
                process_group=0,
            )  # fmt: skip
        try:
            self._wait_started()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _wait_started(self) -> None:
        __tracebackhide__ = True
        deadline = time.monotonic() + self.start_timeout
        waiting = set(self.modules)
        started = False
        while True:
            for record in self._read():
                event, module = record.get("event"), record.get("module")
                if event == "daemon.started":
                    started = True
                elif event == "worker.ready" and module in waiting:
                    waiting.discard(module)
                elif event == "worker.start_failed" and module in waiting:
                    raise DaemonStartError(
                        f"module {module} did not start: {record.get('reason')}\n"
                        + self.log_tail(module=module)
                        + self._hint()
                    )
                elif event == "daemon.start_failed":
                    raise DaemonStartError(
                        f"the ipad daemon did not start: {record.get('error')}\n" + self.log_tail()
                    )
            if started and not waiting:
                return
            status = self.proc.poll() if self.proc is not None else None
            if status is not None:
                self._read()
                raise DaemonStartError(
                    f"the ipad daemon exited during its start ({_exit_text(status)})\n"
                    + self.log_tail()
                    + self._hint()
                )
            if time.monotonic() > deadline:
                what = "the daemon" if not started else "module(s) " + ", ".join(sorted(waiting))
                raise DaemonStartError(
                    f"{what} not started within {self.start_timeout} s\n" + self.log_tail()
                )
            time.sleep(POLL)

    def _hint(self) -> str:
        """What to do about a start failure whose cause the test's options can fix, if any."""
        text = json.dumps(self._records)
        if "not a trusted key" in text:
            return (
                "\n  hint: a signed module (a .sig beside its manifest) is checked against "
                "trusted keys: pass trusted_keys=[...] (pytest: ini option ipad_trusted_keys)"
            )
        if "the module is not signed" in text:
            return "\n  hint: signatures are required: sign it with ipadctl sign DIR --key KEY"
        if "(signature)" in text:
            # Tampered, added or removed files: the key is right, the signature is stale.
            return "\n  hint: sign the module again after every change: ipadctl sign DIR --key KEY"
        return ""

    # --- the log ------------------------------------------------------------------------

    def _read(self) -> list[Record]:
        """The log records written since the last read (the log is the daemon's stderr)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._log_offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "(not json)", "text": line.decode(errors="replace")}
            if not isinstance(record, dict):
                continue
            new.append(record)
            self._note_started(record)
        self._records += new
        return new

    def _note_started(self, record: Record) -> None:
        field = STARTED_EVENTS.get(record.get("event", ""))
        pid = record.get(field) if field else None
        if isinstance(pid, int):
            stat = _stat(pid)
            if stat is not None:
                self._started[pid] = stat[1]

    def started_processes(self) -> dict[int, int]:
        """The processes the daemon's log says it started (workers, fork server): pid -> start time.

        The start time is field 22 of /proc/PID/stat, so a pid used again is told apart.
        """
        self._read()
        return dict(self._started)

    def records(self, event: str | None = None) -> list[Record]:
        """Every log record so far (only those named ``event``, if given)."""
        self._read()
        return [r for r in self._records if event is None or r.get("event") == event]

    def wait_for(
        self,
        event: str,
        where: Callable[[Record], bool] = lambda _: True,
        timeout: float = START_TIMEOUT,
    ) -> Record:
        """The first record named ``event`` satisfying ``where``; DaemonError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.records(event):
                if where(record):
                    return record
            if time.monotonic() > deadline:
                raise DaemonError(f"no {event} in the daemon's log in {timeout} s\n"
                                  + self.log_tail())  # fmt: skip
            time.sleep(POLL)

    def log_tail(self, lines: int = 25, module: str | None = None) -> str:
        """The daemon's last log lines (of ``module`` only, if given), readable."""
        records = [r for r in self.records() if module is None or r.get("module") == module]
        out = []
        for record in records[-lines:]:
            fields = " ".join(f"{k}={v!r}" for k, v in record.items()
                              if k not in ("event", "level", "timestamp", "lineno", "func_name",
                                           "filename"))  # fmt: skip
            out.append(f"    {record.get('level', '?'):7} {record.get('event')} {fields}")
        where = f" ({module})" if module else ""
        return f"  the daemon's last log lines{where}, from {self.log_path}:\n" + "\n".join(out)

    # --- talking to it ------------------------------------------------------------------

    def client(self, name: str = "ipad-testing", **options: Any) -> BlockingClient:
        """A new blocking client connected to this daemon, closed at the stop at the latest."""
        client = BlockingClient(self.socket, name=name, **options)
        self._clients.append(client)
        return client

    def proxy(self, module: str, **options: Any) -> BlockingProxy:
        """A new proxy of ``module``, on a client shared by the test's proxies."""
        if self._client is None:
            self._client = self.client()
        return self._client.request_proxy(module, **options)

    def status(self) -> dict[str, Any]:
        """The daemon's status: ``{"daemon": {...}, "modules": {name: {...}}}``."""
        with BlockingClient(self.socket, name="ipad-testing") as client:
            reply = client.status()
        return {"daemon": reply.daemon, "modules": reply.modules}

    def ctl(
        self, *args: str, check: bool = True, timeout: float = START_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ipadctl ARGS`` against this daemon; with ``check``, fail unless it exits 0."""
        result = subprocess.run(
            [sys.executable, "-m", "ipad.cli.ctl", "--socket", str(self.socket), *args],
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise DaemonError(f"ipadctl {' '.join(args)} exited {result.returncode}:\n"
                              f"{result.stdout}{result.stderr}")  # fmt: skip
        return result

    # --- stopping -----------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the daemon on purpose: its end is not a failure (what it left is reaped)."""
        self.killed_on_purpose = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=START_TIMEOUT)

    def stop(self) -> None:
        """Stop the daemon with SIGTERM; DaemonStopError unless it stops cleanly.

        Clean: exit status 0 within ``stop_timeout``, ``daemon.stopped`` in its
        log, nothing it started left alive, its cgroups gone. Everything is
        cleaned up before the error is raised.
        """
        __tracebackhide__ = True
        if self.stopped:
            return
        self.stopped = True
        try:
            problems = self._stop()
        finally:
            self.cleanup()
        if problems:
            raise DaemonStopError(
                f"the ipad daemon (pid {self.pid}) did not stop cleanly:\n"
                + "".join(f"  - {p}\n" for p in problems)
                + self.log_tail()
            )

    def _stop(self) -> list[str]:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        proc = self.proc
        if proc is None:
            return []
        status = proc.poll()
        if status is not None:
            if self.killed_on_purpose:
                return []
            return [f"it died during the test or its stop ({_exit_text(status)})"]
        before = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            return [f"it had not exited {self.stop_timeout} s after SIGTERM (killed)"]
        if status < 0 and status != -signal.SIGTERM:
            # Killed, by someone else, before or while it stopped: the rest follows from it.
            return [f"it died during the test or its stop ({_exit_text(status)})"]
        problems = []
        if status != 0:
            problems.append(f"it ended with {_exit_text(status)}, not exit status 0")
        if not self.records("daemon.stopped"):
            problems.append("no daemon.stopped in its log")
        left = [f"{pid} ({_comm(pid)})" for pid, start in {**before, **self._started}.items()
                if _alive(pid, start)]  # fmt: skip
        if left:
            problems.append("processes it started left alive: " + ", ".join(left))
        left_groups = [str(c) for c in self._cgroups() if c.exists()]
        if left_groups:
            problems.append("cgroups left: " + ", ".join(left_groups))
        return problems

    def _cgroups(self) -> list[Path]:
        events = ("cgroup.ready", "memory.ready")
        return [Path(r["cgroup"]) for r in self.records() if r.get("event") in events]

    def cleanup(self) -> None:
        """The fallback, whatever happened: the daemon and everything it started killed and reaped.

        Safe to call more than once. A worker leads its own process group: each
        group the log names is killed if its leader is still the process the
        daemon started, or gone (a group id in use is not handed out again).
        """
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        proc = self.proc
        if proc is None:  # prepared, never started
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=START_TIMEOUT)
        self._read()
        for pid, start in self._started.items():
            stat = _stat(pid)
            if stat is None or stat[1] == start:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own group: anything left in it
        for record in self.records():
            if record.get("event") == "cgroup.ready" and Path(record["cgroup"]).exists():
                remove_tree(Path(record["cgroup"]))
            elif record.get("event") == "memory.ready" and Path(record["cgroup"]).exists():
                remove_memory_tree(Path(record["cgroup"]))
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:
            # The test failed already: clean up, and let the stop's problems (if any) not
            # hide the test's own error.
            with contextlib.suppress(DaemonStopError):
                self.stop()


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == start and stat[0] != "Z"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"


def daemon_environment(
    tuning_dirs: Sequence[str | os.PathLike[str]] = (), env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The caller's environment without what would steer the daemon, plus the tuning path."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(_DROPPED_PREFIXES) and k not in _DROPPED}  # fmt: skip
    if tuning_dirs:
        base[CONFIG_PATH_ENV] = ":".join(str(Path(d).resolve()) for d in tuning_dirs)
    return {**base, **(env or {})}


def prepare_daemon(  # noqa: PLR0913 - keyword-only options, each with a default
    *,
    module_dirs: Sequence[str | os.PathLike[str]],
    modules: Mapping[str, Mapping[str, Any]] | Sequence[str],
    tuning_dirs: Sequence[str | os.PathLike[str]] = (),
    proxy: str = "sandboxed",
    strict_sandbox: bool = False,
    trusted_keys: Sequence[str | os.PathLike[str]] = (),
    extra_config: str = "",
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    start_timeout: float = START_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Daemon:
    """A Daemon configured but not started (``start()`` starts it); see ``run_daemon``."""
    tables = {name: {} for name in modules} if not isinstance(modules, Mapping) else modules
    # Short: a Unix socket path has at most 107 bytes, and pytest's tmp_path can be long.
    runtime_dir = Path(tempfile.mkdtemp(prefix="ipad-test-"))
    config = write_config(runtime_dir / "config.toml", module_dirs=module_dirs,
                          modules=tables, proxy=proxy, strict_sandbox=strict_sandbox,
                          trusted_keys=trusted_keys, extra=extra_config)  # fmt: skip
    log_path = (log_dir or runtime_dir) / "ipad-daemon.log"
    enabled = [name for name, table in tables.items() if table.get("enabled", True)]
    return Daemon(config, runtime_dir=runtime_dir, log_path=log_path,
                  env=daemon_environment(tuning_dirs, env), modules=enabled,
                  start_timeout=start_timeout, stop_timeout=stop_timeout)  # fmt: skip


@contextlib.contextmanager
def run_daemon(  # noqa: PLR0913 - keyword-only options, each with a default
    *,
    module_dirs: Sequence[str | os.PathLike[str]],
    modules: Mapping[str, Mapping[str, Any]] | Sequence[str],
    tuning_dirs: Sequence[str | os.PathLike[str]] = (),
    proxy: str = "sandboxed",
    strict_sandbox: bool = False,
    trusted_keys: Sequence[str | os.PathLike[str]] = (),
    extra_config: str = "",
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    start_timeout: float = START_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
) -> Iterator[Daemon]:
    """Run a daemon for the ``with`` block; stop it cleanly after (DaemonStopError if it cannot).

    ``modules`` names the modules to run, or maps each to its
    ``[modules.<name>]`` table (``{"af": {"tuning": "imx219.toml"}}``);
    ``module_dirs`` are searched for their manifests, ``tuning_dirs`` for
    ``<module>/<file>`` tuning files (as ``$IPAD_CONFIG_PATH``); ``trusted_keys``
    are the public keys that signed modules are checked against. ``env`` adds
    variables to the daemon's environment; ``extra_config`` is more TOML
    (``[restart]``, say). The daemon's JSON log is written to ``log_dir``
    (default: its runtime directory, removed at the end).
    """
    daemon = prepare_daemon(module_dirs=module_dirs, modules=modules, tuning_dirs=tuning_dirs,
                            proxy=proxy, strict_sandbox=strict_sandbox,
                            trusted_keys=trusted_keys, extra_config=extra_config, env=env,
                            log_dir=log_dir, start_timeout=start_timeout,
                            stop_timeout=stop_timeout)  # fmt: skip
    with daemon:
        daemon.start()
        yield daemon
