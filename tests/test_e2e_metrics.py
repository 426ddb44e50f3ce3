"""Metrics from a real daemon: calls, errors and latency counted by workers, restarts by reason.

Every text is parsed by prometheus_client's own parsers (OpenMetrics for
``ipadctl metrics``, the 0.0.4 text format node_exporter reads for
``daemon.metrics_file``): what they refuse, Prometheus would too.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from ipad.client import BlockingClient, IpadError
from tests.client_drivers import Connect, Start, connect
from tests.daemon_process import TEST_MODULES, WAIT, DaemonProcess, wait_until, write_config

__all__ = ["connect"]  # the fixture

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def config(directory: Path, extra: str = "") -> Path:
    """The statsliar module and echo; ``extra`` goes into ``[daemon]``."""
    return write_config(
        directory,
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n{extra}',
        modules="[modules.statsliar]\n[modules.echo]\n",
    )


def samples(text: str, *, openmetrics: bool = True) -> Samples:
    """Every sample of ``text`` by (name, sorted labels), parsed by prometheus_client."""
    parse = parse_openmetrics if openmetrics else parse_prometheus
    found: Samples = {}
    for family in parse(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def metrics(daemon: DaemonProcess, *args: str) -> Samples:
    """``ipadctl metrics``, parsed (so valid OpenMetrics, or the test fails)."""
    text = daemon.ctl("metrics", *args).stdout
    assert text.endswith("# EOF\n")
    return samples(text)


def of(found: Samples, name: str, **labels: str) -> float:
    """One sample's value."""
    return found[name, tuple(sorted(labels.items()))]


def test_calls_errors_and_latency_are_counted(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Calls made through either client are counted by kind, latency bucket and error code."""
    daemon = start_daemon(config(tmp_path))
    client = connect(daemon.socket)
    proxy = client.request_proxy("statsliar")
    before = metrics(daemon)
    assert of(before, "ipad_module_calls_total", module="statsliar") == 0
    for _ in range(20):
        assert client.call(proxy, "ping", timeout=WAIT) == "pong"
    assert client.call(proxy, "nap", {"seconds": 0.03}, timeout=WAIT) == 0.03
    for _ in range(3):
        with pytest.raises(IpadError) as caught:
            client.call(proxy, "fail", timeout=WAIT)
        assert caught.value.code == "module_error"
    after = metrics(daemon, "--timeout", "10")
    calls = 20 + 1 + 3
    assert of(after, "ipad_module_calls_total", module="statsliar") == calls
    assert of(after, "ipad_module_call_latency_seconds_count", module="statsliar") == calls
    assert of(after, "ipad_module_call_latency_seconds_bucket", module="statsliar",
              le="+Inf") == calls  # fmt: skip
    # The nap alone is past 25 ms; the pings and failures are not.
    assert of(after, "ipad_module_call_latency_seconds_bucket", module="statsliar",
              le="0.025") == calls - 1  # fmt: skip
    assert of(after, "ipad_module_call_latency_seconds_sum", module="statsliar") >= 0.03
    assert of(after, "ipad_module_errors_total", module="statsliar", code="module_error") == 3
    # A method the module does not have is refused by the client itself (its description).
    assert of(after, "ipad_module_errors_total", module="statsliar", code="unknown_method") == 0
    assert of(after, "ipad_module_calls_total", module="echo") == 0
    assert of(after, "ipad_module_proxies", module="statsliar") == 1
    assert of(after, "ipad_module_up", module="statsliar") == 1
    assert of(after, "ipad_clients") >= 2  # this client and ipadctl itself
    # Only one module asked for: the daemon's families and that module's samples.
    only = metrics(daemon, "echo")
    assert ("ipad_module_calls_total", (("module", "statsliar"),)) not in only
    assert of(only, "ipad_module_calls_total", module="echo") == 0


def test_sigkilled_worker_counts_a_restart_and_keeps_its_calls(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """A SIGKILLed worker: restarts{reason="signal"} +1, its calls still counted, recovery seen."""
    daemon = start_daemon(config(tmp_path))
    client = connect(daemon.socket)
    proxy = client.request_proxy("statsliar")
    for _ in range(7):
        client.call(proxy, "ping", timeout=WAIT)
    before = metrics(daemon)
    assert of(before, "ipad_module_restarts_total", module="statsliar", reason="signal") == 0
    pid = daemon.worker_pids()["statsliar"]
    # Two more calls, never read by the daemon before the worker dies: read from its board.
    client.call(proxy, "ping", timeout=WAIT)
    client.call(proxy, "ping", timeout=WAIT)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: daemon.worker_pids().get("statsliar") not in (None, pid))
    assert client.call(proxy, "ping", wait=WAIT, timeout=WAIT) == "pong"  # recovered
    after = metrics(daemon)
    assert of(after, "ipad_module_restarts_total", module="statsliar", reason="signal") == 1
    assert of(after, "ipad_module_calls_total", module="statsliar") == 7 + 2 + 1
    assert of(after, "ipad_module_recovery_seconds_count", module="statsliar") == 1
    assert of(after, "ipad_module_up", module="statsliar") == 1
    daemon.ctl("restart", "statsliar")
    assert of(metrics(daemon), "ipad_module_restarts_total", module="statsliar",
              reason="operator") == 1  # fmt: skip


def test_a_hung_call_counts_a_hung_restart(start_daemon: Start, tmp_path: Path) -> None:
    """A call past call_timeout: the worker is killed as hung, restarts{reason="hung"} +1."""
    path = write_config(
        tmp_path,
        f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
        modules='[modules.statsliar]\n[modules.statsliar.restart]\ncall_timeout = "300ms"\n',
    )
    daemon = start_daemon(path)
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("statsliar")
        pid = daemon.worker_pids()["statsliar"]
        with pytest.raises(IpadError):
            proxy.call("nap", {"seconds": 5.0}, timeout=3.0)
        wait_until(lambda: daemon.worker_pids().get("statsliar") not in (None, pid))
    found = metrics(daemon)
    assert of(found, "ipad_module_restarts_total", module="statsliar", reason="hung") == 1
    assert of(found, "ipad_module_restarts_total", module="statsliar", reason="signal") == 0
    # The hung call never answered: no call is counted for it.
    assert of(found, "ipad_module_calls_total", module="statsliar") == 0


def test_per_proxy_workers_add_up_and_reload_keeps_totals(
    start_daemon: Start, tmp_path: Path
) -> None:
    """Per-proxy workers' calls add up; a reload that restarts the module keeps the totals."""
    modules = '[modules.statsliar]\nisolation = "proxy"\n'
    path = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
                        modules=modules)  # fmt: skip
    daemon = start_daemon(path)
    with BlockingClient(daemon.socket) as client:
        first, second = client.request_proxy("statsliar"), client.request_proxy("statsliar")
        for _ in range(4):
            first.call("ping", timeout=WAIT)
        for _ in range(6):
            second.call("ping", timeout=WAIT)
        second.release()  # its worker ends: its calls are read from its board as it goes
        assert of(metrics(daemon), "ipad_module_calls_total", module="statsliar") == 10
        # Changed settings: the reload stops this supervisor and starts a new one.
        path.write_text(path.read_text().replace(modules, "[modules.statsliar]\n"))
        assert "statsliar" in daemon.ctl("reload").stdout
        fresh = client.request_proxy("statsliar")
        fresh.call("ping", wait=WAIT, timeout=WAIT)
    found = metrics(daemon)
    assert of(found, "ipad_module_calls_total", module="statsliar") == 11
    assert of(found, "ipad_module_restarts_total", module="statsliar", reason="signal") == 0


SANDBOXED = """
[modules.statsliar]
proxy = "sandboxed"
"""


def test_a_sandboxed_worker_counts_its_calls(start_daemon: Start, tmp_path: Path) -> None:
    """Under the sandbox (seccomp, namespaces) the worker maps and writes its statistics too."""
    path = write_config(tmp_path, f'[daemon]\nmodule_dirs = ["{TEST_MODULES}"]\n',
                        modules=SANDBOXED)  # fmt: skip
    daemon = start_daemon(path)
    with BlockingClient(daemon.socket) as client:
        proxy = client.request_proxy("statsliar")
        for _ in range(3):
            proxy.call("ping", timeout=WAIT)
    assert of(metrics(daemon), "ipad_module_calls_total", module="statsliar") == 3


def test_a_lying_module_cannot_corrupt_the_metrics(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Huge counters, then counters set back: totals stay bounded, monotonic and valid."""
    daemon = start_daemon(config(tmp_path))
    client = connect(daemon.socket)
    proxy = client.request_proxy("statsliar")
    for _ in range(5):
        client.call(proxy, "ping", timeout=WAIT)
    client.call(proxy, "lie", {"value": 2**64 - 1}, timeout=WAIT)
    huge = metrics(daemon)
    calls = of(huge, "ipad_module_calls_total", module="statsliar")
    assert calls < 100_000, calls  # not 2**64 per slot: refused as implausible
    assert of(huge, "ipad_module_stats_rejected_total", module="statsliar") >= 1
    assert of(huge, "ipad_module_call_latency_seconds_sum", module="statsliar") < 60
    client.call(proxy, "lie", {"value": 0}, timeout=WAIT)  # every counter "went back"
    for _ in range(3):
        client.call(proxy, "ping", timeout=WAIT)
    later = metrics(daemon)
    for key, value in huge.items():
        if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
            assert later[key] >= value, key  # counters never go back
    errors = sum(v for k, v in later.items() if k[0] == "ipad_module_errors_total"
                 and ("module", "statsliar") in k[1])  # fmt: skip
    assert errors <= of(later, "ipad_module_calls_total", module="statsliar")


def test_a_flood_of_calls_is_counted_exactly(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """Calls from two threads as fast as they go: the histogram count is every call made."""
    daemon = start_daemon(config(tmp_path))
    client = connect(daemon.socket)
    proxies = [client.request_proxy("statsliar") for _ in range(2)]
    made = [0, 0]

    def flood(index: int) -> None:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            client.call(proxies[index], "ping", timeout=WAIT)
            made[index] += 1

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    found = metrics(daemon)
    assert of(found, "ipad_module_call_latency_seconds_count", module="statsliar") == sum(made)
    assert of(found, "ipad_module_stats_rejected_total", module="statsliar") == 0


def test_metrics_file_is_written_atomically_and_valid(
    start_daemon: Start, tmp_path: Path, connect: Connect
) -> None:
    """daemon.metrics_file appears, parses as the 0.0.4 text format, and is replaced by rename."""
    target = tmp_path / "textfile" / "ipad.prom"
    target.parent.mkdir()
    daemon = start_daemon(config(tmp_path, f'metrics_file = "{target}"\nmetrics_interval = "1s"\n'))
    wait_until(target.exists)
    first = target.stat().st_ino
    text = target.read_text()
    assert "# EOF" not in text
    assert "# UNIT" not in text
    found = samples(text, openmetrics=False)
    assert of(found, "ipad_module_calls_total", module="statsliar") == 0
    client = connect(daemon.socket)
    proxy = client.request_proxy("statsliar")
    client.call(proxy, "ping", timeout=WAIT)

    def counted() -> bool:
        found = samples(target.read_text(), openmetrics=False)
        return of(found, "ipad_module_calls_total", module="statsliar") == 1

    wait_until(counted)
    assert target.stat().st_ino != first  # a new file renamed over the old, not rewritten
    assert [p.name for p in target.parent.iterdir()] == ["ipad.prom"]  # no temporary left


def test_metrics_file_reload_and_write_errors(start_daemon: Start, tmp_path: Path) -> None:
    """A reload moves the file; a directory that cannot be written is logged, not fatal."""
    missing = tmp_path / "nowhere" / "ipad.prom"
    path = config(tmp_path, f'metrics_file = "{missing}"\nmetrics_interval = "1s"\n')
    daemon = start_daemon(path)
    daemon.wait_for("metrics.write_failed")
    moved = tmp_path / "ipad.prom"
    path.write_text(path.read_text().replace(str(missing), str(moved)))
    daemon.ctl("reload")
    wait_until(moved.exists)
    assert json.loads(daemon.ctl("--json", "status").stdout)["modules"]["echo"]["state"] == (
        "running"
    )


def test_ipadctl_metrics_options_and_exit_statuses(start_daemon: Start, tmp_path: Path) -> None:
    """--json wraps the text; an unknown module exits 4 and names the known ones."""
    daemon = start_daemon(config(tmp_path))
    reply = json.loads(daemon.ctl("metrics", "--json").stdout)
    assert reply["format"] == "openmetrics"
    assert samples(reply["text"])
    unknown = daemon.ctl("metrics", "nosuch", check=False)
    assert unknown.returncode == 4
    assert "no module 'nosuch'; modules: echo, statsliar" in unknown.stderr
    for command in ("metrics", "crashes"):  # --json: the error as JSON, as every command's
        as_json = daemon.ctl(command, "nosuch", "--json", check=False)
        assert as_json.returncode == 4, as_json.stderr
        assert json.loads(as_json.stdout)["error"]["code"] == "unknown_module"
    assert "OpenMetrics" in daemon.ctl("metrics", "--help").stdout


def test_metrics_file_must_be_absolute(tmp_path: Path) -> None:
    """A relative metrics_file is refused, naming the key and the file."""
    from ipad.config.loader import load_config  # noqa: PLC0415
    from ipad.config.problems import ProblemsError  # noqa: PLC0415

    path = config(tmp_path, 'metrics_file = "ipad.prom"\nmetrics_interval = "10ms"\n')
    with pytest.raises(ProblemsError) as caught:
        load_config(path)
    text = str(caught.value)
    assert "daemon.metrics_file" in text
    assert "daemon.metrics_interval" in text
    assert str(path) in text
