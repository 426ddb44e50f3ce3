"""Load with faults: many clients call their own proxies at once while workers are SIGKILLed.

A real daemon runs ``--modules`` copies of the shipped ``echo`` module. Each of
``--clients`` trio clients (one connection each, subscribed to events, with
``reconnect=True``) holds one proxy, spread over the modules, and
``--callers`` tasks per client call ``echo`` on it in a loop for
``--seconds``, each call with a token of its own that the module sends back.
Meanwhile a random module's worker is SIGKILLed about every
``--kill-interval`` seconds.

It counts calls per second; failed calls, by error (a call in flight when its
worker dies fails with WorkerCrashed: it may have run, so it is not sent
again); misrouted replies, a token that came back to a caller other than the
one that sent it (must be 0); unclear failures, anything that is not one of
ipad's errors, and calls that took longer than CALL_LIMIT (must be 0); and the
daemon's resident memory before the clients connect, at its peak, and after
they have all left. The limit it is measured against in the same run: one
client with one caller on the same daemon, with no faults.

Run: python bench/bench_load.py [--quick] [--clients 200] [--seconds 10]
(prints a table, writes bench/results/load.json; exit status 1 if a reply was
misrouted or a failure was unclear). tests/test_e2e_load.py runs the same
scenario, shorter, and asserts on it.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from _common import exit_on_sigterm, write_results
from _common import parser as common_parser
from _ipad import compile_bytecode

from ipad.client._trio import Client, Proxy, open_client
from ipad.protocol.errors import IpadError

REPO = Path(__file__).resolve().parent.parent
ECHO_MANIFEST = REPO / "workers" / "modules" / "echo.toml"

#: A call that has not returned after this long counts as hung (an unclear failure).
CALL_LIMIT = 10.0
#: How long a call on an invalid proxy waits for its recovery before it fails.
CALL_WAIT = 5.0
#: Distinct failure messages a Tally keeps (a run has a handful; this only bounds it).
MESSAGES_KEPT = 50
#: How long the daemon may take to start.
START_TIMEOUT = 60.0


def module_names(count: int) -> list[str]:
    """``echo``, then ``echo2``, ``echo3``...: copies that each get a worker of their own."""
    return ["echo", *(f"echo{n}" for n in range(2, count + 1))]


def write_config(root: Path, modules: int, clients: int) -> tuple[Path, dict[str, str]]:
    """A configuration with ``modules`` echo copies and room for ``clients``; its environment.

    Restarts are immediate and never end in a cooldown, however often workers die.
    """
    manifests = root / "modules"
    manifests.mkdir()
    (manifests / "ipa_modules").symlink_to(REPO / "workers" / "modules" / "ipa_modules")
    text = ECHO_MANIFEST.read_text()
    tables = []
    for name in module_names(modules):
        (manifests / f"{name}.toml").write_text(text.replace('name = "echo"', f'name = "{name}"'))
        (root / "tuning" / name).mkdir(parents=True)
        (root / "tuning" / name / "uncalibrated.toml").write_text("")
        tables.append(f"[modules.{name}]\n")
    room = clients + 16
    config = root / "config.toml"
    config.write_text(
        f'[daemon]\nmodule_dirs = ["{manifests}"]\ntrusted_module_dirs = ["{manifests}"]\n'
        f"[clients]\nmax_connections = {room}\nmax_connections_per_user = {room}\n"
        '[restart]\nmax_failures = 1000000\ninitial_delay = "0"\nmax_delay = "0"\n'
        + "".join(tables)
    )
    return config, {"IPAD_CONFIG_PATH": str(root / "tuning")}


@attrs.define
class Tally:
    """What the callers saw."""

    calls: int = 0
    misrouted: int = 0
    #: Failed calls by exception class (each one of ipad's errors).
    failures: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Failed calls by "Class: message", to tell why (as many kinds as MESSAGES_KEPT).
    messages: collections.Counter[str] = attrs.field(factory=collections.Counter)
    #: Failures that were not ipad's errors, and calls past CALL_LIMIT: must stay empty.
    unclear: list[str] = attrs.field(factory=list)
    kills: int = 0
    peak_rss_kib: int = 0
    seconds: float = 0.0
    #: When each caller last had a call answered (trio's clock).
    last_answered: dict[str, float] = attrs.field(factory=dict)
    #: Each caller's latest failure: when (trio's clock), and the error.
    last_failure: dict[str, tuple[float, str]] = attrs.field(factory=dict)

    @property
    def failed(self) -> int:
        """Calls that failed with one of ipad's errors."""
        return sum(self.failures.values())

    def failed_with(self, caller: str, exc: IpadError) -> None:
        """Count a call that failed with one of ipad's errors."""
        kind, text = type(exc).__name__, f"{type(exc).__name__}: {exc}"
        self.failures[kind] += 1
        self.last_failure[caller] = (trio.current_time(), text)
        if text in self.messages or len(self.messages) < MESSAGES_KEPT:
            self.messages[text] += 1


@attrs.define
class Window:
    """When a run ends: at ``end``, or later once ``min_kills`` workers were killed.

    A busy machine gives the killer fewer turns than the seconds promise; a
    test that needs so many kills gets them by running longer, but never past
    ``limit``.
    """

    end: float
    min_kills: int = 0
    limit: float = math.inf

    def over(self, tally: Tally) -> bool:
        """Whether the callers (and the killer) stop now."""
        now = trio.current_time()
        return now >= self.limit or (now >= self.end and tally.kills >= self.min_kills)


@attrs.frozen
class Callers:
    """Each client's callers: how many, how long each call waits, and how long they go on.

    ``min_kills``: the run goes on past its seconds until that many workers
    were killed, but never past ``max_seconds``. ``call_wait``: each call's
    ``wait`` for its proxy's recovery; ``call_timeout``: its ``timeout`` over
    the whole call (None: the module's call_timeout, from the grant); after
    ``call_limit`` a call counts as hung. The defaults are the benchmark's.
    """

    per_client: int = 2
    min_kills: int = 0
    max_seconds: float = math.inf
    call_wait: float = CALL_WAIT
    call_limit: float = CALL_LIMIT
    call_timeout: float | None = None


DEFAULT_CALLERS = Callers()


async def caller(proxy: Proxy, name: str, window: Window, tally: Tally,
                 callers: Callers | None = None) -> None:  # fmt: skip
    """Call ``echo`` with a token of our own until the window is over; count what came back.

    Each call waits for its proxy's recovery, and counts as hung, as ``callers`` says.
    """
    callers = callers or DEFAULT_CALLERS
    seq = 0
    while not window.over(tally):
        seq += 1
        token = f"{name}.{seq}"
        with trio.move_on_after(callers.call_limit) as limit:
            try:
                reply = await proxy.call("echo", {"text": token}, wait=callers.call_wait,
                                         timeout=callers.call_timeout)  # fmt: skip
            except IpadError as exc:
                if not exc.message:
                    tally.unclear.append(f"{type(exc).__name__} without a message")
                tally.failed_with(name, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - counted: the scenario asserts there are none
                tally.unclear.append(repr(exc))
                continue
        if limit.cancelled_caught:
            tally.unclear.append(f"a call took longer than {callers.call_limit:g}s")
        elif reply == {"text": token}:
            tally.calls += 1
            tally.last_answered[name] = trio.current_time()
        else:
            tally.misrouted += 1


def rss_kib(pid: int) -> int:
    """A process's resident memory in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def kill_workers(admin: Client, modules: list[str], interval: float, window: Window,
                       tally: Tally, daemon_pid: int) -> None:  # fmt: skip
    """SIGKILL a random module's worker every ``interval`` seconds or so, until the window ends."""
    rng = random.Random(9)  # noqa: S311 - which worker dies next need not be secret
    while True:
        await trio.sleep(interval * rng.uniform(0.5, 1.5))
        tally.peak_rss_kib = max(tally.peak_rss_kib, rss_kib(daemon_pid))
        if window.over(tally):
            return
        status = await admin.status()
        pid = status.modules[rng.choice(modules)]["worker_pid"]
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it died by itself meanwhile
            tally.kills += 1


Fault = Callable[[Client, Window, Tally], Awaitable[None]]


async def run_load(
    socket: Path,
    daemon_pid: int,
    *,
    clients: int,
    seconds: float,
    modules: int = 4,
    kill_interval: float | None = 0.5,
    callers: Callers = DEFAULT_CALLERS,
    fault: Fault | None = None,
) -> Tally:
    """The scenario: connect every client, get its proxy, then call for ``seconds`` under faults.

    ``callers`` says how many call on each client, how long each call waits,
    and how long the run may go on past ``seconds``. ``fault`` replaces the
    worker killer (it gets an admin client, the run's Window, which it may
    extend, and the tally).
    """
    names = module_names(modules)
    tally = Tally()
    ready = trio.Semaphore(0)
    go = trio.Event()
    window = Window(math.inf)

    async def one_client(index: int) -> None:
        async with open_client(socket, name=f"load-{index}", reconnect=True) as client:
            proxy = await client.request_proxy(names[index % len(names)])
            ready.release()
            await go.wait()
            async with trio.open_nursery() as nursery:
                for n in range(callers.per_client):
                    nursery.start_soon(caller, proxy, f"{index}.{n}", window, tally, callers)

    async with open_client(socket, name="load-admin", subscribe=False, reconnect=True) as admin:
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(one_client, index)
            for _ in range(clients):
                await ready.acquire()
            started = trio.current_time()
            window.end, window.min_kills = started + seconds, callers.min_kills
            window.limit = started + max(seconds, callers.max_seconds)
            go.set()
            if fault is not None:
                nursery.start_soon(fault, admin, window, tally)
            elif kill_interval is not None:
                nursery.start_soon(kill_workers, admin, names, kill_interval,
                                   window, tally, daemon_pid)  # fmt: skip
        tally.seconds = trio.current_time() - started
    return tally


async def single_client_rate(socket: Path, seconds: float) -> float:
    """The limit: one client, one caller, no faults; calls per second."""
    tally = Tally()
    async with open_client(socket, name="load-limit", subscribe=False) as client:
        proxy = await client.request_proxy("echo")
        started = trio.current_time()
        await caller(proxy, "limit", Window(started + seconds), tally)
        elapsed = trio.current_time() - started
    return tally.calls / elapsed


# --- the benchmark on its own --------------------------------------------------------------


def start_daemon(config: Path, env: dict[str, str], root: Path) -> subprocess.Popen[bytes]:
    """A daemon on ``config``, once it serves; its log goes to ``root/daemon.log``."""
    compile_bytecode()
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipad", "--config", str(config), "--log-format", "json"],
        stderr=log, stdout=subprocess.DEVNULL, env=env, cwd=REPO,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while b'"daemon.started"' not in (root / "daemon.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not start; see {root / 'daemon.log'}")
        time.sleep(0.05)
    return proc


async def settle(socket: Path) -> None:
    """Wait until the daemon holds no proxy and serves no client but the one asking."""
    async with open_client(socket, name="load-settle", subscribe=False) as client:
        with trio.fail_after(60):
            while True:
                daemon = (await client.status()).daemon
                if daemon["proxies"] == 0 and daemon["clients"] == 1:
                    return
                await trio.sleep(0.05)


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run the limit and the load against one daemon; every figure of the run."""
    config, extra = write_config(root, args.modules, args.clients)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}
    env.update(extra, IPAD_SOCKET=str(root / "ipad.sock"))
    proc = start_daemon(config, env, root)
    socket = root / "ipad.sock"
    try:
        time.sleep(1.0)  # let the standbys start before the baseline
        rss_before = rss_kib(proc.pid)
        limit = trio.run(single_client_rate, socket, args.limit_seconds)
        tally = trio.run(lambda: run_load(socket, proc.pid, clients=args.clients,
                                          seconds=args.seconds, modules=args.modules,
                                          callers=Callers(args.callers),
                                          kill_interval=args.kill_interval))  # fmt: skip
        trio.run(settle, socket)
        rss_after = rss_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "calls": tally.calls, "seconds": tally.seconds, "calls_per_s": tally.calls / tally.seconds,
        "failed": tally.failed, "failures": dict(tally.failures), "misrouted": tally.misrouted,
        "unclear": tally.unclear, "kills": tally.kills, "messages": dict(tally.messages),
        "limit_calls_per_s": limit,
        "daemon_rss_kib": {"before": rss_before, "peak": tally.peak_rss_kib, "after": rss_after},
    }  # fmt: skip


def main() -> int:
    """Print the table and save the figures; 1 if a reply was misrouted or a failure unclear."""
    exit_on_sigterm()
    parser = common_parser(__doc__)  # --quick (50 clients for 2 s), --results, --profile
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--callers", type=int, default=2, help="calling tasks per client")
    parser.add_argument("--modules", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kill-interval", type=float, default=0.5)
    parser.add_argument("--limit-seconds", type=float, default=2.0)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds, args.limit_seconds = 50, 2.0, 0.5
    with tempfile.TemporaryDirectory(prefix="ipad-load-") as tmp:
        figures = measure(args, Path(tmp))
    rss = figures["daemon_rss_kib"]
    failures = ", ".join(f"{n} {name}" for name, n in figures["failures"].items()) or "none"
    print(
        f"load: {args.clients} clients x {args.callers} callers, {args.modules} modules, "
        f"{figures['seconds']:.1f} s, a worker SIGKILLed every ~{args.kill_interval:g} s"
    )
    rows = [
        ("calls per second", f"{figures['calls_per_s']:.0f}"),
        ("limit: one client, no faults", f"{figures['limit_calls_per_s']:.0f} calls/s"),
        ("calls answered", str(figures["calls"])),
        ("failed calls (clear errors)", f"{figures['failed']} ({failures})"),
        ("misrouted replies (must be 0)", str(figures["misrouted"])),
        ("unclear failures (must be 0)", str(len(figures["unclear"]))),
        ("workers killed", str(figures["kills"])),
        ("daemon RSS before / peak / after",
         f"{rss['before'] / 1024:.1f} / {rss['peak'] / 1024:.1f} / {rss['after'] / 1024:.1f} MiB"),
    ]  # fmt: skip
    for label, value in rows:
        print(f"  {label:34s} {value}")
    ratio = figures["calls_per_s"] / figures["limit_calls_per_s"]
    headline = [
        {"name": "calls per second under load and kills", "value": figures["calls_per_s"],
         "unit": "/s", "ratio": ratio, "ratio_to": "one client, no faults"},
        {"name": "failed calls", "value": figures["failed"], "unit": ""},
        {"name": "misrouted replies", "value": figures["misrouted"], "unit": ""},
        {"name": "unclear failures", "value": len(figures["unclear"]), "unit": ""},
        {"name": "daemon RSS before", "value": rss["before"] / 1024, "unit": "MiB"},
        {"name": "daemon RSS after", "value": rss["after"] / 1024, "unit": "MiB"},
    ]  # fmt: skip
    data = {"quick": args.quick, "settings": vars(args), "figures": figures}
    write_results(args.results, "load", data, headline)
    return 1 if figures["misrouted"] or figures["unclear"] else 0


if __name__ == "__main__":
    sys.exit(main())
