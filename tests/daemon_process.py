"""A real ipad daemon in a subprocess, for integration tests, read through its JSON log.

Every daemon a test starts is stopped the way a user stops it (SIGTERM, or
``ipadctl stop``), and the test fails unless the daemon exits cleanly in bound:
exit status 0 within its ``stop_timeout`` plus ``STOP_MARGIN``, ``daemon.stopped``
logged, no process it started left alive, no child left a zombie, and its
cgroup subtree removed. SIGKILL and the clean-up of what it left are only the
fallback after such a failure (or after a test that killed a daemon on purpose
and said so with ``expect_unclean_exit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from ipad.client import BlockingClient
from ipad.config.duration import Duration
from ipad.config.model import RestartPolicy
from ipad.daemon.cgroup import remove_tree
from ipad.daemon.memory_cgroup import remove_tree as remove_memory_tree

REPO = Path(__file__).resolve().parent.parent
TEST_MODULES = Path(__file__).resolve().parent / "modules"

#: Generous bounds for a loaded CI machine; tests still finish in well under a second normally.
WAIT = 30.0

#: What a stop may take beyond the largest configured ``stop_timeout``. Measured in two
#: full runs of the suite here (IPAD_TEST_STOP_LOG; other suites ran on the 2 cores, load
#: average up to 6): 254 clean stops, median 0.03-0.06 s, 95 % under 0.6 s, the slowest
#: 1.36 s (`ipadctl stop` with the fork server SIGSTOPped). A client that reads nothing
#: costs the daemon its GOODBYE_TIMEOUT of 1 s (ipad/daemon/server.py) before it stops its
#: workers (1.05 s measured); `ipadctl stop` adds its own start, 0.15-0.5 s. So: 1 s of
#: goodbye, 0.5 s of ipadctl, 1.5 s for a loaded machine; a hang is far past it.
STOP_MARGIN = 3.0
#: A child the daemon leaves a zombie for this long, while it runs, is one it will not reap.
ZOMBIE_GRACE = 1.0
#: How often a stop in progress is looked at (exit, zombies).
STOP_POLL = 0.01
#: A file to which each stop's report is appended, one line each, to measure the margin
#: (read at import: the tests' own fixture takes IPAD_* variables out of the environment).
STOP_LOG = os.environ.get("IPAD_TEST_STOP_LOG")

Record = dict[str, Any]
Via = Literal["sigterm", "ipadctl"]

#: Log records that name a process the daemon started, and the field with its pid.
STARTED_EVENTS = {
    "worker.spawned": "worker_pid",
    "worker.forked": "worker_pid",
    "forkserver.started": "pid",
    "forkserver.late_fork": "worker_pid",
}


@dataclasses.dataclass
class Started:
    """A process the daemon started, known by its pid and start time (pids wrap at 32768)."""

    pid: int
    start_time: int
    what: str

    def alive(self) -> bool:
        """Whether this very process still exists and is not a zombie."""
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start_time and stat[0] != "Z"


@dataclasses.dataclass
class StopReport:
    """How a daemon's stop went: what was asked, how long it took, what was wrong."""

    pid: int
    via: str
    #: Seconds the stop was allowed (stop_timeout + STOP_MARGIN); None: not timed (the
    #: daemon had exited before the fixture asked it to stop).
    bound: float | None
    #: Seconds from the request to the exit; None if not timed or it did not exit.
    seconds: float | None
    exit_status: int | None
    problems: list[str] = dataclasses.field(default_factory=list)
    #: The daemon's log from the stop request on (or its last lines), for the failure message.
    log_tail: list[str] = dataclasses.field(default_factory=list)
    #: Set by check(): a failure already raised is not raised again at teardown.
    checked: bool = False

    @property
    def clean(self) -> bool:
        """Exit 0 in bound, daemon.stopped, nothing left."""
        return not self.problems

    def check(self) -> None:
        """Raise AssertionError describing every problem, if there is any."""
        self.checked = True
        if self.problems:
            raise AssertionError(self.describe())

    def describe(self) -> str:
        """A readable account, with the daemon's last log lines."""
        took = "did not exit" if self.seconds is None else f"exited in {self.seconds:.3f} s"
        bound = "untimed" if self.bound is None else f"bound {self.bound:.1f} s"
        status = f"exit status {self.exit_status}"
        lines = [f"daemon {self.pid} stopped via {self.via} ({bound}): {took}, {status}"]
        lines += [f"  - {problem}" for problem in self.problems]
        if self.problems and self.log_tail:
            lines.append("  its log from the stop request on (last lines):")
            lines += [f"    {line.rstrip()}" for line in self.log_tail]
        return "\n".join(lines)


class DaemonProcess:
    """`python -m ipad` with a JSON log that a thread collects, so the pipe never fills."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str],
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        args: Sequence[str] = (),
        log_level: str | None = "debug",
    ) -> None:
        self.socket = Path(env["IPAD_SOCKET"])
        self.config = config
        # None: the configuration's log_level rules, as without the option.
        level = ["--log-level", log_level] if log_level is not None else []
        self.env = env
        self.prefix = list(prefix)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "ipad", "--config", str(config), "--log-format",
             "json", *level, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
            pass_fds=pass_fds,
        )  # fmt: skip
        self.records: list[Record] = []
        self.raw: list[str] = []
        #: Every process the log says the daemon started, with its start time read at once.
        self.started: dict[int, Started] = {}
        #: Its stop timeout as the configuration said at start (a test may rewrite it later).
        self._stop_timeout_at_start = configured_stop_timeout(config)
        #: Why the test ends this daemon some other way than a clean stop, if it does.
        self.unclean_exit_reason: str | None = None
        #: The report of the stop the test or the fixture made, once one was made.
        self.stop_report: StopReport | None = None
        #: Its descendants just before that stop: checked after it, killed if left.
        self._before: list[Started] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            self._read_lines()
        except BaseException as exc:
            self.raw.append(f"READER FAILED: {exc!r}\n")
            raise

    def _read_lines(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.raw.append(line)
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    self.records.append(record)
                    self._note_started(record)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _note_started(self, record: Record) -> None:
        """Remember a process the daemon says it started, by pid and start time."""
        field = STARTED_EVENTS.get(record.get("event", ""))
        pid = record.get(field) if field else None
        if not isinstance(pid, int):
            return
        stat = _stat(pid)
        if stat is None:  # already gone and reaped: nothing of it can be left
            return
        what = f"{record.get('module', 'forkserver')} {record['event']}"
        self.started[pid] = Started(pid, stat[1], what)

    def wait_for(
        self, event: str, where: Callable[[Record], bool] = lambda _: True, timeout: float = WAIT
    ) -> Record:
        """The first log record named ``event`` that satisfies ``where``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for record in self.records:
                    if record.get("event") == event and where(record):
                        return record
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "".join(self.raw[-20:])
                    raise AssertionError(f"no {event} in the daemon's log; last lines:\n{tail}")
                self._changed.wait(min(left, 0.5))

    def events(self, event: str) -> list[Record]:
        """Every log record named ``event`` so far."""
        with self._changed:
            return [r for r in self.records if r.get("event") == event]

    def worker_pids(self) -> dict[str, int]:
        """The pid of each module's most recent worker, from the log."""
        return {r["module"]: r["worker_pid"] for r in self.events("worker.ready")}

    def wait_standbys(self) -> None:
        """Wait until each running module's standby is ready with a spare instance per proxy.

        Standbys start, and open their spares, in the background: a test that
        counts the daemon's descriptors must wait for them first.
        """

        def settled() -> bool:
            modules = json.loads(self.ctl("--json", "status").stdout)["modules"].values()
            return all(
                m["standby_pid"] is not None and m["standby_instances"] == m["proxies"]
                for m in modules
                if m["state"] == "running"
            )

        wait_until(settled)

    def ctl_argv(self, *args: str) -> list[str]:
        """The command line of ipadctl against this daemon (as its user, with ``prefix``)."""
        return [*self.prefix, sys.executable, "-m", "ipad.cli.ctl", *args]

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ipadctl against this daemon; ``check``: fail unless it exited 0.

        ``status`` exiting 3 (a module shown is not running, as ``systemctl status``)
        is an answer, not a failure: a test that cares looks at the exit status.
        """
        result = subprocess.run(
            self.ctl_argv(*args), capture_output=True, text=True, env=self.env, timeout=WAIT,
            check=False,
        )  # fmt: skip
        answered = (0, 3) if "status" in args else (0,)
        if check and result.returncode not in answered:
            raise AssertionError(f"ipadctl {args} failed: {result.stdout}{result.stderr}")
        return result

    # --- stopping ----------------------------------------------------------------

    def stop_bound(self) -> float:
        """Seconds a stop may take: the largest stop_timeout configured, plus STOP_MARGIN."""
        timeout = max(self._stop_timeout_at_start, configured_stop_timeout(self.config))
        return timeout + STOP_MARGIN

    def stop(self) -> int:
        """SIGTERM and the exit status; the stop is checked (see stop_cleanly) at teardown."""
        report = self.stop_cleanly("sigterm")
        if report.exit_status is None:
            report.check()  # it did not exit: no status to return
        assert report.exit_status is not None
        return report.exit_status

    def stop_cleanly(
        self, via: Via = "sigterm", *, race: Callable[[], None] | None = None
    ) -> StopReport:
        """Stop the daemon as a user would, and report whether it exited cleanly in bound.

        ``via`` is SIGTERM or ``ipadctl stop``. Clean means: exit status 0 within
        ``stop_bound()``, ``daemon.stopped`` logged, no child a zombie for
        ZOMBIE_GRACE while it ran, none of the processes it started (from its log,
        and its descendants just before the stop) left alive, and its cgroup
        subtree gone. A daemon that does not exit in bound is left running, for the
        test to look at; teardown then kills it (``kill``). The fixture fails the
        test on a report with problems unless the test called its ``check()``.

        ``race`` is called as soon as the stop is set going (SIGTERM sent, or
        ipadctl started, whose request reaches the daemon some 100 ms later), for
        a test to make something happen while the stop lands; its time counts.
        """
        if self.stop_report is not None:
            raise AssertionError(f"daemon {self.proc.pid} was stopped already")
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon {self.proc.pid} exited before the stop: "
                                 f"status {self.proc.returncode}")  # fmt: skip
        bound = self.stop_bound()
        before = self._before = [Started(pid, start, "descendant before the stop")
                                 for pid, start in descendants(self.proc.pid)]  # fmt: skip
        since = len(self.raw)
        ctl: subprocess.Popen[str] | None = None
        asked = time.monotonic()
        if via == "sigterm":
            self.proc.send_signal(signal.SIGTERM)
        else:
            ctl = subprocess.Popen(self.ctl_argv("stop"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=self.env)  # fmt: skip
        raced = None
        if race is not None:
            try:
                race()
            except Exception as exc:  # noqa: BLE001 - the stop is still judged, and this said
                raced = f"the test's race during the stop failed: {exc!r}"
        status, leaked_zombies = self._await_exit(asked + bound)
        seconds = time.monotonic() - asked if status is not None else None
        report = StopReport(self.proc.pid, via, bound, seconds, status)
        self.stop_report = report
        if raced is not None:
            report.problems.append(raced)
        if ctl is not None:
            report.problems += _ctl_problems(ctl)
        for pid, lasted in sorted(leaked_zombies.items()):
            report.problems.append(f"child {self._name(pid)} was a zombie for {lasted:.1f} s "
                                   "while the daemon ran: nobody reaped it")  # fmt: skip
        if status is None:
            report.problems.append(
                f"still running {bound:.1f} s after the stop request "
                f"(stop_timeout {bound - STOP_MARGIN:g} s + margin {STOP_MARGIN:g} s); "
                f"its children now: {self._children_now()}"
            )
        else:
            report.problems += self._exit_problems(status, before)
        report.log_tail = self._log_since(since)
        _log_stop(report)
        return report

    def _await_exit(self, deadline: float) -> tuple[int | None, dict[int, float]]:
        """The exit status (None: still running at ``deadline``) and the zombies seen meanwhile.

        A zombie is a child that has ended and that the daemon has not reaped yet:
        for a moment after each exit that is normal; for ZOMBIE_GRACE it is not.
        """
        zombie_since: dict[int, float] = {}
        leaked: dict[int, float] = {}
        while (status := self.proc.poll()) is None:
            now = time.monotonic()
            if now >= deadline:
                break
            zombie_since = {
                pid: zombie_since.get(pid, now) for pid in zombie_children(self.proc.pid)
            }
            for pid, first in zombie_since.items():
                if now - first >= ZOMBIE_GRACE:
                    leaked[pid] = now - first
            time.sleep(STOP_POLL)
        return status, leaked

    def _children_now(self) -> str:
        children = [f"{self._name(pid)} state {_state(pid)}" for pid in children_of(self.proc.pid)]
        return ", ".join(children) or "none"

    def _name(self, pid: int) -> str:
        """``pid`` with what the log says it is: module, role, how it was started."""
        started = self.started.get(pid)
        what = started.what if started else _comm(pid)
        return f"{pid} ({what}{self._role(pid)})"

    def _role(self, pid: int) -> str:
        """A worker's role by the log (active, standby, never ready); empty for others."""
        if pid not in self.started or self.started[pid].what.startswith("forkserver"):
            return ""
        ready = {r["worker_pid"]: r.get("standby", False) for r in self.events("worker.ready")}
        if pid in ready:
            return ", active (a promoted standby)" if ready[pid] else ", active"
        standbys = {r["worker_pid"] for r in self.events("worker.standby_ready")}
        return ", standby" if pid in standbys else ", never ready (loading)"

    def _exit_problems(self, status: int, before: Sequence[Started] = ()) -> list[str]:
        """What is wrong once the daemon has exited with ``status``: status, log, leftovers."""
        problems = []
        if status != 0:
            how = f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"
            problems.append(f"exited with {how}, not 0")
        self._reader.join(timeout=5)
        if self._reader.is_alive():
            problems.append("its stderr is still open 5 s after its exit: a process it "
                            "started holds it")  # fmt: skip
        if not self.events("daemon.stopped"):
            problems.append("no daemon.stopped in its log")
        left = [p for p in [*self.started.values(), *before] if p.alive()]
        if left:
            described = [f"{self._name(p.pid)} state {_state(p.pid)}" for p in left]
            problems.append("left alive: " + ", ".join(described))
        for cgroup in self._cgroups():
            if cgroup.exists():
                problems.append(f"cgroup left: {describe_cgroup(cgroup)}")
        return problems

    def _cgroups(self) -> list[Path]:
        return [
            Path(r["cgroup"]) for r in self.events("cgroup.ready") + self.events("memory.ready")
        ]

    def _log_since(self, index: int, most: int = 40) -> list[str]:
        with self._changed:
            lines = self.raw[index:]
        return lines[-most:]

    def expect_unclean_exit(self, reason: str) -> None:
        """Say at the call site that this daemon ends uncleanly on purpose (SIGKILL, status 1).

        Teardown then only cleans up what it left (the SIGKILL fallback), without
        failing the test for it. Only for tests where that exit is what is tested.
        """
        self.unclean_exit_reason = reason

    def finish(self) -> str | None:
        """Teardown's check: stop the daemon cleanly if it runs; a failure's account, or None.

        Call ``kill`` afterwards, whatever this returns: it is the fallback clean-up.
        """
        report = self.stop_report
        if report is None and self.proc.poll() is None:
            report = self.stop_cleanly("sigterm")
        elif report is None and self.unclean_exit_reason is None:
            # The test ended it some other way (its own SIGTERM, `ipadctl stop`, or the
            # daemon exited by itself): untimed, but everything else is checked.
            report = StopReport(self.proc.pid, "the test (not through the fixture)", None,
                                None, self.proc.returncode)  # fmt: skip
            report.problems = self._exit_problems(self.proc.returncode)
            report.log_tail = self._log_since(max(0, len(self.raw) - 20))
            self.stop_report = report
        if report is None or report.clean or report.checked:
            return None
        return report.describe()

    def kill(self) -> None:
        """The fallback: the daemon and every process it started are gone and reaped."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        # A worker leads its process group, which may outlive it. Pids wrap at 32768, so
        # a group is killed only if its leader is still ours, or gone: a group id in use
        # is never handed to a new process, so a group without a leader is still ours.
        logged = {r["worker_pid"] for r in self.events("worker.spawned")
                  + self.events("worker.forked")}  # fmt: skip
        ours = [*self.started.values(), *self._before]
        for pid in logged - {p.pid for p in ours}:
            if _stat(pid) is None:
                kill_group(pid)
        for started in ours:
            stat = _stat(started.pid)
            if stat is None or stat[1] == started.start_time:
                kill_group(started.pid)
            if started.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(started.pid, signal.SIGKILL)
        for record in self.events("cgroup.ready"):
            if Path(record["cgroup"]).exists():
                remove_tree(Path(record["cgroup"]))
        for record in self.events("memory.ready"):  # cgroup v1's memory controller
            if Path(record["cgroup"]).exists():
                remove_memory_tree(Path(record["cgroup"]))
        self._reader.join(timeout=WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def _log_stop(report: StopReport) -> None:
    """One line per stop in STOP_LOG, if set: seconds, via, bound, status, test, problems."""
    if not STOP_LOG:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    took = "-" if report.seconds is None else f"{report.seconds:.3f}"
    with Path(STOP_LOG).open("a") as log:
        log.write(f"{took} {report.via} {report.bound} {report.exit_status} {test} "
                  f"{len(report.problems)}\n")  # fmt: skip


def finish_all(daemons: Sequence[DaemonProcess]) -> None:
    """Teardown of a test's daemons: each stopped cleanly or, failing that, killed; then judge.

    The test fails (after every daemon is cleaned up) if any did not stop cleanly.
    """
    failures = []
    for daemon in daemons:
        try:
            failure = daemon.finish()
        finally:
            daemon.kill()
        if failure is not None:
            failures.append(failure)
    if failures:
        pytest.fail("a daemon did not stop cleanly:\n" + "\n".join(failures), pytrace=False)


def _ctl_problems(ctl: subprocess.Popen[str]) -> list[str]:
    """What was wrong with an `ipadctl stop` (it is given a few seconds more to finish)."""
    try:
        out, err = ctl.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        ctl.kill()
        ctl.communicate()
        return ["ipadctl stop had not returned 5 s after the daemon's exit (or the bound)"]
    if ctl.returncode != 0 or out.strip() != "stopping":
        return [f"ipadctl stop exited {ctl.returncode}: {out.strip()!r} {err.strip()!r}"]
    return []


def configured_stop_timeout(config: Path) -> float:
    """The largest ``stop_timeout`` a configuration gives any module (its default if none)."""
    default = RestartPolicy().stop_timeout.seconds
    try:
        data = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return default
    restart = data.get("restart")
    base = _duration((restart or {}).get("stop_timeout") if isinstance(restart, dict) else None)
    timeouts = [base if base is not None else default]
    modules = data.get("modules")
    for table in (modules or {}).values() if isinstance(modules, dict) else ():
        own = table.get("restart") if isinstance(table, dict) else None
        value = _duration(own.get("stop_timeout") if isinstance(own, dict) else None)
        if value is not None:
            timeouts.append(value)
    return max(timeouts)


def _duration(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return Duration.parse(value).seconds
    except ValueError:
        return None


def describe_cgroup(path: Path) -> str:
    """A cgroup and the processes still in it, subgroups included."""
    parts = []
    for group in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        with contextlib.suppress(OSError):
            procs = (group / "cgroup.procs").read_text().split()
            parts.append(f"{group.name}: {' '.join(procs) or 'empty'}")
    return f"{path} ({'; '.join(parts)})"


def _stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks after boot) of ``pid``, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def _state(pid: int) -> str:
    stat = _stat(pid)
    return stat[0] if stat else "gone"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (every thread's); none once it is gone."""
    pids: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                pids += [int(x) for x in (task / "children").read_text().split()]
    return pids


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every live descendant of ``pid`` now, as (pid, start time)."""
    found: list[tuple[int, int]] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        stat = _stat(child)
        if stat is not None and stat[0] != "Z":
            found.append((child, stat[1]))
            todo += children_of(child)
    return found


def zombie_children(pid: int) -> list[int]:
    """Those children of ``pid`` that are zombies now."""
    return [child for child in children_of(pid) if _state(child) == "Z"]


def of_module(module: str) -> Callable[[Record], bool]:
    """A ``wait_for`` filter: records about ``module``."""
    return lambda record: record.get("module") == module


def kill_group(pid: int) -> None:
    """SIGKILL a worker's process group if anything of it is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (reaped as we read it: not alive)."""
    return _state(pid) not in ("Z", "gone")


def open_fds(pid: int) -> int:
    """How many descriptors process ``pid`` has open."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def fd_targets(pid: int) -> dict[int, str]:
    """What each of process ``pid``'s descriptors refers to (a socket:[inode], a path...)."""
    targets = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            targets[int(entry.name)] = str(entry.readlink())
    return targets


def rss_kib(pid: int) -> int:
    """Process ``pid``'s resident memory in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition the test cannot be told about (a process disappearing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def others_still_work(daemon: DaemonProcess) -> None:
    """Another module (echo) answers a new client, and so does ``ipadctl status``."""
    with BlockingClient(daemon.socket) as other:
        echo = other.request_proxy("echo")
        assert echo.call("echo", {"text": "still here"}, timeout=WAIT) == {"text": "still here"}
    status = json.loads(daemon.ctl("--json", "status").stdout)
    assert status["modules"]["echo"]["state"] == "running"


def write_config(directory: Path, extra: str = "", *, modules: str | None = None) -> Path:
    """A config with the shipped modules (or ``modules``) plus ``extra`` TOML."""
    shipped = "[modules.awb]\n[modules.agc]\n[modules.echo]\n"
    path = directory / "config.toml"
    path.write_text(f"{extra}\n{shipped if modules is None else modules}")
    return path


@pytest.fixture
def daemon_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment whose socket and tuning search are this test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
    env["IPAD_SOCKET"] = str(tmp_path / "run" / "ipad.sock")
    env["IPAD_CONFIG_PATH"] = str(TEST_MODULES / "tuning")
    return env


@pytest.fixture
def start_daemon(
    tmp_path: Path, daemon_env: dict[str, str]
) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real daemons; after the test each is stopped with SIGTERM and must exit cleanly.

    A daemon that does not (see ``DaemonProcess.stop_cleanly``) fails the test
    once everything is cleaned up: the daemon SIGKILLed, its workers' groups
    killed, its cgroups removed.
    """
    started: list[DaemonProcess] = []

    def start(
        config: Path | None = None,
        *,
        wait: bool = True,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        pass_fds: Sequence[int] = (),
        log_level: str | None = "debug",
    ) -> DaemonProcess:
        config = config or write_config(tmp_path)
        daemon = DaemonProcess(config, env or daemon_env, prefix, pass_fds, log_level=log_level)
        started.append(daemon)
        if wait:
            daemon.wait_for("daemon.started")
        return daemon

    yield start
    finish_all(started)
