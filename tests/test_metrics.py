"""The metrics without a daemon: a board's statistics bounded, the text valid, the file atomic.

Boards are real memfds written through the worker's own CallStats or, for
the lies, through a mapping of the page as a module would; texts are parsed
by prometheus_client's OpenMetrics and 0.0.4 parsers.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from ipad.config.model import RestartPolicy
from ipad.daemon.lifecycle import Halt, LaunchFailed, Lifecycle, Restart, Start
from ipad.daemon.metrics import (
    CALL_BURST,
    MAX_CALL_RATE,
    DaemonFacts,
    Family,
    MetricsRegistry,
    ModuleMetrics,
    families,
    render,
    restart_reason,
)
from ipad.daemon.metrics_file import MetricsFile, write_atomically
from ipad.daemon.states import WorkerState
from ipad.worker.call_stats import SLOTS, STATS_OFFSET, STATS_SIZE, CallStats
from ipad.worker.heartbeat_board import CLAIM_END, DUMP_OFFSET, DUMP_SIZE, FILE_SIZE, new_board


class Worker:
    """What the metrics read of a worker: its board."""

    def __init__(self) -> None:
        self.board: int | None = new_board()

    def close(self) -> None:
        """Close the board, as the daemon does once it swept the worker."""
        if self.board is not None:
            os.close(self.board)
            self.board = None


@pytest.fixture
def worker() -> Iterator[Worker]:
    """A worker's board, closed after the test."""
    made = Worker()
    yield made
    made.close()


def forge(worker: Worker, values: list[int]) -> None:
    """Write ``values`` into the statistics page, as module code in the worker could."""
    assert worker.board is not None
    page = mmap.mmap(worker.board, STATS_SIZE, offset=STATS_OFFSET)
    try:
        slots = memoryview(page).cast("Q")
        for i, value in enumerate(values):
            slots[i] = value
        slots.release()
    finally:
        page.close()


def track(metrics: ModuleMetrics, worker: Worker, now: float) -> None:
    """``metrics.track`` with the stand-in worker."""
    metrics.track(_any(worker), now)


def _any(value: object) -> Any:
    return value


def test_honest_calls_are_counted_by_bucket_and_code(worker: Worker) -> None:
    """What CallStats records is what the daemon credits, bucket by bucket, code by code."""
    assert worker.board is not None
    stats = CallStats.attach(worker.board)
    assert stats is not None
    metrics = ModuleMetrics()
    track(metrics, worker, 0.0)
    stats.record(50_000, None)  # 50 us: the first bucket
    stats.record(3_000_000, "module_error")  # 3 ms: the 5 ms bucket
    stats.record(2_000_000_000, "no_such_code")  # 2 s: +Inf, an unknown code
    metrics.sample(10.0)
    assert metrics.calls == 3
    assert metrics.buckets[0] == 1
    assert metrics.buckets[5] == 1
    assert metrics.buckets[-1] == 1
    assert metrics.sum_ns == 2_003_050_000
    assert metrics.errors[-1] == 1  # other
    assert sum(metrics.errors) == 2
    metrics.retire(_any(worker), 11.0)
    assert metrics.calls == 3  # kept after the worker is gone


def test_the_statistics_page_lies_between_the_claim_and_the_crash_stacks() -> None:
    """The board's layout: counters and claim, then the statistics' page, then the stacks."""
    assert CLAIM_END <= STATS_OFFSET
    assert STATS_OFFSET + STATS_SIZE <= DUMP_OFFSET
    assert DUMP_OFFSET + DUMP_SIZE == FILE_SIZE


def test_a_board_too_small_for_statistics_is_not_mapped() -> None:
    """A board of the old size (16 bytes): the worker keeps no statistics instead of faulting."""
    fd = os.memfd_create("old-board", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 16)
        assert CallStats.attach(fd) is None
    finally:
        os.close(fd)


def test_forged_counts_are_refused_and_counters_never_go_back(worker: Worker) -> None:
    """Huge counts are refused whole; counts set back re-base; honest counts go on after."""
    assert worker.board is not None
    stats = CallStats.attach(worker.board)
    assert stats is not None
    metrics = ModuleMetrics()
    track(metrics, worker, 0.0)
    stats.record(1000, None)
    metrics.sample(1.0)
    forge(worker, [2**64 - 1] * SLOTS)
    metrics.sample(2.0)
    assert metrics.calls == 1
    assert metrics.rejected == 1
    forge(worker, [0] * SLOTS)  # every counter "went back"
    metrics.sample(3.0)
    assert metrics.calls == 1
    stats.record(1000, "module_error")
    metrics.sample(4.0)
    assert metrics.calls == 2
    assert sum(metrics.errors) == 1


def test_errors_never_outnumber_calls(worker: Worker) -> None:
    """Forged errors without calls are not credited."""
    values = [0] * SLOTS
    values[-1] = 1000  # 1000 "other" errors, no call
    forge(worker, values)
    metrics = ModuleMetrics()
    track(metrics, worker, 0.0)
    metrics.sample(100.0)
    assert sum(metrics.errors) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 5),
            st.lists(
                st.integers(0, 2**64 - 1) | st.integers(0, 50), min_size=SLOTS, max_size=SLOTS
            ),
        ),
        max_size=12,
    )
)
def test_whatever_a_board_says_totals_stay_bounded_and_monotonic(
    readings: list[tuple[float, list[int]]],
) -> None:
    """Any sequence of forged boards: totals only grow, within the rate bound, errors <= calls."""
    worker = Worker()
    try:
        metrics = ModuleMetrics()
        track(metrics, worker, 0.0)
        now = 0.0
        before = (0, 0, 0)
        for step, values in readings:
            now += step
            forge(worker, values)
            metrics.sample(now)
            totals = (metrics.calls, metrics.sum_ns, sum(metrics.errors))
            assert all(a >= b for a, b in zip(totals, before, strict=True))
            assert metrics.calls <= MAX_CALL_RATE * now + CALL_BURST
            assert metrics.sum_ns <= (now + 1.0) * 1e9
            assert sum(metrics.errors) <= metrics.calls
            before = totals
    finally:
        worker.close()


class Supervisor:
    """What the exposition reads of a supervisor."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.proxies = Proxies()

    def status_times(self) -> dict[str, object]:
        """As ModuleSupervisor's."""
        return {"uptime": 12.5}


class Proxies:
    """Two proxies on every module."""

    def of_module(self, module: str) -> list[object]:
        """As ProxyTable's."""
        return [module, module]


@pytest.mark.parametrize("openmetrics", [True, False])
def test_the_text_parses_in_both_formats(openmetrics: bool) -> None:
    """Every family parses, odd module names escaped, with the samples' values kept."""
    registry = MetricsRegistry()
    registry.module('we"ird\\na\nme').restarts["signal"] = 2
    supervisors = {
        'we"ird\\na\nme': Supervisor(WorkerState.RUNNING),
        "awb": Supervisor(WorkerState.COOLDOWN),
    }
    facts = DaemonFacts(3, {"permission_denied": 4}, 5, 1)
    text = render(families(_any(supervisors), registry, facts, 0.0), openmetrics=openmetrics)
    assert text.endswith("# EOF\n") is openmetrics
    assert ("# UNIT" in text) is openmetrics
    parse = parse_openmetrics if openmetrics else parse_prometheus
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse(text)
        for s in family.samples
    }
    odd = ("module", 'we"ird\\na\nme')
    assert found["ipad_module_restarts_total", (odd, ("reason", "signal"))] == 2
    assert found["ipad_module_up", (odd,)] == 1
    assert found["ipad_module_up", (("module", "awb"),)] == 0
    assert found["ipad_module_uptime_seconds", (odd,)] == 12.5
    assert found["ipad_module_uptime_seconds", (("module", "awb"),)] == 0
    assert found["ipad_module_proxies", (odd,)] == 2
    assert found["ipad_clients", ()] == 3
    assert found["ipad_refusals_total", (("reason", "permission_denied"),)] == 4
    assert found["ipad_events_dropped_total", ()] == 5
    assert found["ipad_module_call_latency_seconds_bucket", (("le", "+Inf"), odd)] == 0


def test_a_counter_family_is_named_as_each_format_wants() -> None:
    """OpenMetrics: ``# TYPE x counter`` for x_total; 0.0.4: ``# TYPE x_total counter``."""
    family = Family("ipad_x", "counter", "X.", samples=[("_total", {}, 1)])
    assert "# TYPE ipad_x counter\n" in render([family])
    assert "# TYPE ipad_x_total counter\n" in render([family], openmetrics=False)


def test_the_file_is_replaced_whole_under_a_reader(tmp_path: Path) -> None:
    """A reader reading all along sees only whole versions, never a half-written file."""
    target = tmp_path / "ipad.prom"
    versions = {("x" * 50_000) + f"{i}\n" for i in range(100)}
    seen: set[str] = set()
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):  # before the first version
                seen.add(target.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for text in sorted(versions):
            write_atomically(target, text)
    finally:
        done.set()
        reader.join(30)
    assert seen
    assert seen <= versions
    assert [p.name for p in tmp_path.iterdir()] == ["ipad.prom"]


def test_a_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    """Renaming over a directory fails: the error is raised and the temporary removed."""
    target = tmp_path / "ipad.prom"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_atomically(target, "text\n")
    assert [p.name for p in tmp_path.iterdir()] == ["ipad.prom"]


async def test_failed_writes_are_logged_rate_limited(tmp_path: Path) -> None:
    """Every failed write is counted, one is logged per interval, none raises."""
    missing = tmp_path / "nowhere" / "ipad.prom"
    writer = MetricsFile(lambda: (missing, 1.0), lambda: "text\n")
    with structlog.testing.capture_logs() as records:
        for _ in range(5):
            assert not await writer.write(missing)
    assert writer.failures == 5
    failed = [r for r in records if r["event"] == "metrics.write_failed"]
    assert len(failed) == 1
    assert failed[0]["path"] == str(missing)
    missing.parent.mkdir()
    assert await writer.write(missing)
    assert missing.read_text() == "text\n"


def test_what_the_operator_stops_is_no_restart() -> None:
    """A launch cancelled by ``ipadctl stop MODULE``, and anything while stopped, counts none."""
    machine: Lifecycle[int] = Lifecycle("awb", RestartPolicy())
    machine.handle(Start(), 0.0)
    assert machine.launching
    assert restart_reason(machine, LaunchFailed("spawn failed")) == "start_failed"
    machine.handle(Halt(), 0.1)  # the launch in flight is cancelled: its failure comes back
    assert machine.halting
    assert restart_reason(machine, LaunchFailed("cancelled")) is None
    machine.handle(LaunchFailed("cancelled"), 0.2)
    assert machine.state is WorkerState.STOPPED
    assert machine.halted
    assert restart_reason(machine, Restart()) is None  # it starts the module: no worker ended
