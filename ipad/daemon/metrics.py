"""The daemon's metrics: what they count, how a worker's word is bounded, and their exposition.

Calls never pass through the daemon (a client talks to its worker), so each
worker counts its own on its board (ipad/worker/call_stats.py); the daemon
reads them when metrics are asked for and once more when the worker is gone,
and adds what each worker counted since the last reading to the module's
totals. Totals only ever grow: they outlive every worker, standby promotion
and reload (the registry is the daemon's, kept by module name). A worker's
counts are its module's word, and a module is untrusted: a counter that went
back re-bases silently, and a worker is credited with no more calls than
``MAX_CALL_RATE`` per second of its life, no more time in calls than it lived
(they run one at a time), no more errors than calls; readings past that are
refused and counted (``ipad_module_stats_rejected_total``).

Labels come from fixed sets (error codes are an enum, restart and refusal
reasons are listed here); anything else is ``other``. Module names come from
the configuration, never from a client.

The text is the OpenMetrics text format (``ipadctl metrics``) or the
Prometheus text format 0.0.4 (``daemon.metrics_file``, for node_exporter's
textfile collector, which parses only that): the same samples; 0.0.4 names a
counter's family with its ``_total`` suffix, has no ``# UNIT`` and no ``# EOF``.
The text is written here, not with prometheus_client: its registry would keep a
second copy of totals the daemon keeps anyway, and the exposition is a hundred
lines; the tests parse every text with prometheus_client's own parsers.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from ipad.daemon.lifecycle import Cause, Exited, LaunchFailed, Lifecycle, Restart, Why
from ipad.daemon.states import WorkerState
from ipad.worker.call_stats import (
    BUCKET_SLOT,
    ERROR_CODES,
    ERROR_SLOT,
    LATENCY_BUCKETS,
    SLOTS,
    SUM_SLOT,
    read_stats,
)

if TYPE_CHECKING:
    from ipad.daemon.lifecycle import Event
    from ipad.daemon.proxy_table import ProxyTable
    from ipad.daemon.worker_process import WorkerProcess

#: Calls per second one worker may be credited with: far above what a Python worker answers.
MAX_CALL_RATE = 200_000
#: Calls a worker may be credited with beyond the rate (the first reading's slack).
CALL_BURST = 10_000
#: Time in calls a worker may be credited with beyond its life (clock granularity), seconds.
SUM_SLACK = 1.0

#: Why a module's worker was restarted (``ipad_module_restarts_total``'s ``reason``).
RESTART_REASONS = ("operator", "signal", "exit", "hung", "oom", "seccomp", "protocol",
                   "start_failed")  # fmt: skip
#: Error codes always shown per module: those a worker answers calls with.
CALL_ERRORS = ("unknown_method", "bad_arguments", "module_error")
#: Why connections and requests were refused (``ipad_refusals_total``'s ``reason``).
REFUSAL_REASONS = ("max_connections", "max_connections_per_user", "max_proxies_per_client",
                   "max_pending_requests", "permission_denied", "other")  # fmt: skip
#: Upper bounds of the crash-to-running buckets, seconds: a promoted standby, a fresh
#: worker, backoff, and cooldown.
RECOVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)  # fmt: skip

_BUCKETS = len(LATENCY_BUCKETS) + 1


def refusal_reason(reason: str) -> str:
    """A refusal's label: one of ``REFUSAL_REASONS``."""
    return reason if reason in REFUSAL_REASONS else "other"


def restart_reason(machine: Lifecycle[Any], event: Event) -> str | None:  # noqa: PLR0911
    """Why ``event`` restarts the module's active worker (a label), or None if it does not.

    Read before the machine handles it: a stop, a standby's end, or the end of
    a worker already being restarted by the operator is no restart; nor is a
    restart of a module not started yet, or stopped by the operator (it starts
    it, as ``ipadctl start`` does: no worker of it ends), nor anything that
    ends while the operator's stop is under way (a launch it cancelled).
    """
    if machine.stopping or machine.halted or machine.halting:
        return None
    if isinstance(event, Restart):
        return None if machine.state is WorkerState.STOPPED else "operator"
    if isinstance(event, LaunchFailed):
        return None if event.standby or machine.active is not None else "start_failed"
    if not isinstance(event, Exited) or event.worker is not machine.active:
        return None
    ending = machine.ending.get(event.worker)
    if ending is not None:
        return {Why.HUNG: "hung", Why.NOT_READY: "start_failed"}.get(ending.why)
    if event.cause is not None:
        return {Cause.OOM: "oom", Cause.SECCOMP: "seccomp", Cause.PROTOCOL: "protocol"}[event.cause]
    if not machine.active_ready:
        return "start_failed"
    return "signal" if event.status.signal is not None else "exit"


@attrs.define
class _Reading:
    """What one worker's board said last, and what it was credited with."""

    since: float
    last: tuple[int, ...] = (0,) * SLOTS
    calls: int = 0
    sum_ns: int = 0


class ModuleMetrics:
    """One module's totals, kept across its workers, supervisors and reloads."""

    def __init__(self) -> None:
        self.buckets = [0] * _BUCKETS
        self.sum_ns = 0
        self.errors = [0] * (len(ERROR_CODES) + 1)
        self.restarts: collections.Counter[str] = collections.Counter()
        self.recovery = [0] * (len(RECOVERY_BUCKETS) + 1)
        self.recovery_sum = 0.0
        self.rejected = 0
        self._readings: dict[WorkerProcess, _Reading] = {}

    @property
    def calls(self) -> int:
        """Calls answered, whatever their outcome."""
        return sum(self.buckets)

    def track(self, worker: WorkerProcess, now: float) -> None:
        """``worker`` serves calls from ``now`` on: its board is read from now on."""
        self._readings.setdefault(worker, _Reading(now))

    def retire(self, worker: WorkerProcess, now: float) -> None:
        """``worker`` ended: credit what its board says (the daemon still holds it), then forget."""
        if worker in self._readings:
            self._sample(worker, now)
            del self._readings[worker]

    def sample(self, now: float) -> None:
        """Read every tracked worker's board and credit what it counted since the last time."""
        for worker in list(self._readings):
            self._sample(worker, now)

    def _sample(self, worker: WorkerProcess, now: float) -> None:
        board = worker.board
        raw = read_stats(board) if board is not None else None
        if raw is None:
            return
        reading = self._readings[worker]
        # A counter that went back (a lie, or a wrap) re-bases: nothing credited for it.
        delta = [max(new - old, 0) for new, old in zip(raw, reading.last, strict=True)]
        reading.last = raw
        life = max(now - reading.since, 0.0)
        buckets = delta[BUCKET_SLOT : BUCKET_SLOT + _BUCKETS]
        calls = sum(buckets)
        sum_ns = delta[SUM_SLOT]
        if (reading.calls + calls > MAX_CALL_RATE * life + CALL_BURST
                or reading.sum_ns + sum_ns > (life + SUM_SLACK) * 1e9):  # fmt: skip
            self.rejected += 1
            return
        reading.calls += calls
        reading.sum_ns += sum_ns
        for i, count in enumerate(buckets):
            self.buckets[i] += count
        self.sum_ns += sum_ns
        room = self.calls - sum(self.errors)  # never more errors than calls
        for i, count in enumerate(delta[ERROR_SLOT : ERROR_SLOT + len(self.errors)]):
            credited = min(count, room)
            self.errors[i] += credited
            room -= credited

    def recovered(self, seconds: float) -> None:
        """The module runs again ``seconds`` after its worker ended."""
        index = next((i for i, b in enumerate(RECOVERY_BUCKETS) if seconds <= b), -1)
        self.recovery[index] += 1
        self.recovery_sum += seconds


class MetricsRegistry:
    """The daemon's metrics that outlive supervisors: one ``ModuleMetrics`` per module name."""

    def __init__(self) -> None:
        self.modules: dict[str, ModuleMetrics] = {}

    def module(self, name: str) -> ModuleMetrics:
        """The metrics of module ``name``, made on first use."""
        found = self.modules.get(name)
        if found is None:
            found = self.modules[name] = ModuleMetrics()
        return found


# --- exposition ----------------------------------------------------------------------


class Supervised(Protocol):
    """What the exposition reads of a module's supervisor (not ``status()``: it reads /proc)."""

    @property
    def state(self) -> WorkerState: ...  # noqa: D102

    @property
    def proxies(self) -> ProxyTable: ...  # noqa: D102

    def status_times(self) -> dict[str, object]: ...  # noqa: D102


@attrs.frozen
class DaemonFacts:
    """What the exposition reads of the daemon."""

    clients: int
    refusals: Mapping[str, int]
    events_dropped: int
    subscribers_cut_off: int


@attrs.frozen
class Family:
    """One metric family: ``name`` without a counter's ``_total``; (suffix, labels, value)s."""

    name: str
    kind: str
    help: str
    unit: str = ""
    samples: list[tuple[str, dict[str, str], float]] = attrs.field(factory=list)


def families(
    supervisors: Mapping[str, Supervised],
    registry: MetricsRegistry,
    daemon: DaemonFacts,
    now: float,
) -> list[Family]:
    """Every metric family, its samples read now (boards included)."""
    calls = Family("ipad_module_calls", "counter", "Calls a module's workers answered.")
    errors = Family("ipad_module_errors", "counter",
                    "Calls a module's workers answered with an ERROR, by code.")  # fmt: skip
    latency = Family("ipad_module_call_latency_seconds", "histogram",
                     "Time a module's worker took to answer a call.", "seconds")  # fmt: skip
    restarts = Family("ipad_module_restarts", "counter",
                      "Restarts of a module's worker, by reason.")  # fmt: skip
    recovery = Family("ipad_module_recovery_seconds", "histogram",
                      "Time from a module's worker ending to a worker running again.",
                      "seconds")  # fmt: skip
    up = Family("ipad_module_up", "gauge", "1 if the module's worker runs, else 0.")
    uptime = Family("ipad_module_uptime_seconds", "gauge",
                    "Seconds the module's running worker has run.", "seconds")  # fmt: skip
    proxies = Family("ipad_module_proxies", "gauge", "Proxies open on the module.")
    rejected = Family("ipad_module_stats_rejected", "counter",
                      "Readings of a worker's call statistics refused as implausible.")  # fmt: skip
    for name in sorted(supervisors):
        sup = supervisors[name]
        m = registry.module(name)
        m.sample(now)
        label = {"module": name}
        calls.samples.append(("_total", label, m.calls))
        for i, code in enumerate((*ERROR_CODES, "other")):
            if m.errors[i] or code in CALL_ERRORS:
                errors.samples.append(("_total", {**label, "code": code}, m.errors[i]))
        _histogram(latency, label, LATENCY_BUCKETS, m.buckets, m.sum_ns / 1e9)
        for reason in RESTART_REASONS:
            restarts.samples.append(("_total", {**label, "reason": reason}, m.restarts[reason]))
        _histogram(recovery, label, RECOVERY_BUCKETS, m.recovery, m.recovery_sum)
        running = sup.state is WorkerState.RUNNING
        up.samples.append(("", label, 1 if running else 0))
        seconds = sup.status_times().get("uptime") if running else None
        uptime.samples.append(("", label, _number(seconds)))
        proxies.samples.append(("", label, len(sup.proxies.of_module(name))))
        rejected.samples.append(("_total", label, m.rejected))
    clients = Family("ipad_clients", "gauge", "Client connections open.")
    clients.samples.append(("", {}, daemon.clients))
    refusals = Family("ipad_refusals", "counter",
                      "Connections and requests refused, by reason.")  # fmt: skip
    for reason in REFUSAL_REASONS:
        refusals.samples.append(("_total", {"reason": reason}, daemon.refusals.get(reason, 0)))
    dropped = Family("ipad_events_dropped", "counter",
                     "Events never sent to subscribers cut off for not reading.")  # fmt: skip
    dropped.samples.append(("_total", {}, daemon.events_dropped))
    cut = Family("ipad_event_subscribers_cut_off", "counter",
                 "Event subscribers disconnected because their queue overflowed.")  # fmt: skip
    cut.samples.append(("_total", {}, daemon.subscribers_cut_off))
    return [calls, errors, latency, restarts, recovery, up, uptime, proxies, rejected,
            clients, refusals, dropped, cut]  # fmt: skip


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _histogram(family: Family, label: dict[str, str], bounds: Iterable[float],
               counts: list[int], total: float) -> None:  # fmt: skip
    cumulative = 0
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        cumulative += count
        family.samples.append(("_bucket", {**label, "le": _le(bound)}, cumulative))
    family.samples.append(("_count", label, cumulative))
    family.samples.append(("_sum", label, total))


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def render(found: Iterable[Family], *, openmetrics: bool = True) -> str:
    """The families as text: OpenMetrics 1.0, or the Prometheus text format 0.0.4."""
    return "".join(_lines(found, openmetrics=openmetrics))


def _lines(found: Iterable[Family], *, openmetrics: bool) -> Iterator[str]:
    for family in found:
        # 0.0.4 names a counter's family as its sample: node_exporter would see two otherwise.
        name = family.name if openmetrics or family.kind != "counter" else f"{family.name}_total"
        yield f"# TYPE {name} {family.kind}\n"
        if openmetrics and family.unit:
            yield f"# UNIT {name} {family.unit}\n"
        yield f"# HELP {name} {_escape(family.help)}\n"
        for suffix, labels, value in family.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            yield (
                f"{family.name}{suffix}{{{text}}} {_value(value)}\n"
                if text
                else (f"{family.name}{suffix} {_value(value)}\n")
            )
    if openmetrics:
        yield "# EOF\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
