"""The benchmarks still run: ``bench/run.py --quick`` exercises every scenario with tiny sizes.

Their figures are not checked (these machines are noisy; speed is judged by
reading bench/RESULTS.md, not by a test): only that each scenario ran,
exited 0 and wrote well-formed JSON with its headline rows, peers included.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Every scenario, and a headline row each must have (a prefix of its name).
SCENARIOS = {
    "restart": [
        "ipad, standby + fork server: crash -> valid p50",
        "ipad, standby + fork server, sandboxed: crash -> valid p50",
        "ipad, fresh interpreter: crash -> running p50",
        "supervisord, autorestart: crash -> running p50",
        "circus, default settings: crash -> running p50",
        "systemd, Restart=always (default RestartSec=100ms)",
        "systemd, Restart=always, RestartSec=0",
        "limit: spawn python -I -S -c pass p50",
        "limit: fork a warm process + SEQPACKET message p50",
    ],
    "camera_restarts": ["story, 3 kills in 1.5 s, new defaults: outage max",
                        "story, 3 kills in 1.5 s, old defaults: time in cooldown",
                        "harsh, 4 kills in 0.8 s, new defaults: frames served",
                        "crash loop (dies in LOAD), new defaults: forks/s",
                        "crash loop (dies 20 ms after READY), old defaults: daemon CPU",
                        "story, 3 kills in 1.5 s, new defaults: forks/s"],
    "call": ["blocking: ipad proxy call", "trio: ipad proxy call",
             "limit: blocking raw SEQPACKET ping-pong", "limit: trio raw SEQPACKET ping-pong"],
    "buffers": ["ipad: echo.checksum", "ipad: awb.process_stats", "limit: raw fd passing"],
    "registered": ["ipad: registered, echo.checksum", "ipad: passed per call, echo.checksum",
                   "limit: raw round trip + CRC-32 of a kept mapping",
                   "limit: bare SEQPACKET round trip", "ipad: registration saves per frame"],
    "scale": ["ipad, fork server: 3 start -> all valid", "supervisord: 3 start -> all valid",
              "circus: 5 start -> all valid", "ipad, fork server: 5 idle CPU, supervisor"],
    "storm": ["calls lost (no answer, no error)", "calls misrouted",
              "recovery (kill -> proxy recovered) p99"],
    "load": ["calls per second under load and kills", "misrouted replies"],
    "fanout": ["ipad: to the last client p50", "limit: raw writes: to the last client p50"],
    "codec": ["codec: ipad encode()+decode()", "limit: raw SEQPACKET round trip"],
    "hostile": ["nothing: status p50", "unknown_replies: bystander call p50",
                "hang_beating: status p50"],
    "isolation": ["victim frame p99, proxy isolation, no crashes",
                  "victim frame p99, proxy isolation, neighbour crashing 1/s",
                  "victim frame p99, module isolation, neighbour crashing 1/s"],
}  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """One ``bench/run.py --quick`` for all the tests here: results, output, its TMPDIR.

    Every temporary directory of the benchmarks (sockets, configurations) is
    made under a TMPDIR of this run's own, short enough for socket paths, so
    that whatever they started can be found afterwards by that path.
    """
    results = tmp_path_factory.mktemp("bench-results")
    tmp = tmp_path_factory.mktemp("b")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--results", str(results)],
        capture_output=True, text=True, cwd=REPO, timeout=240, check=False,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return results, output, tmp


def processes_mentioning(path: Path) -> list[str]:
    """The command lines of running processes that name ``path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_wrote_its_headline(quick_run: tuple[Path, str, Path], name: str) -> None:
    """Each scenario wrote JSON with the machine, its headline rows and the quick flag."""
    results, _, _ = quick_run
    data: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    assert data["quick"] is True
    assert {"python", "cpu_model", "load_average"} <= set(data["machine"])
    rows = data["headline"]
    assert rows, f"{name}.json has no headline rows"
    for row in rows:
        assert isinstance(row["name"], str)
        assert isinstance(row["unit"], str)
        assert isinstance(row["value"], int | float)
    names = [row["name"] for row in rows]
    for wanted in SCENARIOS[name]:
        matching = [row for row in rows if row["name"].startswith(wanted)]
        assert matching, f"{name}: no headline row {wanted!r} in {names}"
        for row in matching:
            skipped = "skipped (" in row["name"]
            assert skipped or math.isfinite(row["value"]), row


@pytest.mark.timeout(300)
def test_combined_table_and_goals(quick_run: tuple[Path, str, Path]) -> None:
    """run.py printed one table with every scenario, the goals, the machine; saved the table."""
    results, output, _ = quick_run
    table = (results / "table.txt").read_text()
    assert table in output
    for name in SCENARIOS:
        assert f"\n{name} " in table
    assert "goals (a MISS is reported, not an error):" in table
    assert "crash -> valid p50 < 5 ms" in table
    assert "cpu_model" in table


@pytest.mark.timeout(300)
def test_storm_lost_and_misrouted_are_counted(quick_run: tuple[Path, str, Path]) -> None:
    """The storm counted its calls and kills (the zero-loss goal is its own exit status)."""
    results, _, _ = quick_run
    storm = json.loads((results / "storm.json").read_text())
    assert storm["kills"] > 0
    assert storm["storm"]["answered"] > 0
    assert storm["storm"]["lost"] == 0
    assert storm["storm"]["misrouted"] == 0


@pytest.mark.timeout(300)
def test_nothing_left_running(quick_run: tuple[Path, str, Path]) -> None:
    """No daemon, supervisor, child or subscriber of the benchmarks outlives them."""
    _, _, tmp = quick_run
    deadline = time.monotonic() + 5
    while (left := processes_mentioning(tmp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left
    assert not list(tmp.iterdir()), "the benchmarks left temporary files"
