"""Start-up at scale: N modules from daemon start to all valid, with and without the fork server.

Each module is a copy of the shipped ``echo`` manifest under another name,
so N real workers run. Timed from the daemon process's start to its
``daemon.started`` record (every module running) as the daemon's own clock
sees it, plus the wall time a launcher sees. Also the daemon's resident
memory and open descriptors with N workers, per worker.

Run: python bench/bench_scale.py [--sizes 10,100,200]  (writes bench/results/scale.json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
ECHO_MANIFEST = REPO / "workers" / "modules" / "echo.toml"
#: The goal from the supervision issue.
GOAL_200_S = 0.5


def make_modules(root: Path, count: int) -> Path:
    """``count`` manifests for the echo module under names m000, m001, ... and a config."""
    mods = root / "modules"
    mods.mkdir()
    tuning = root / "tuning"
    text = ECHO_MANIFEST.read_text()
    modules_dir = REPO / "workers" / "modules"
    lines = [f'[daemon]\nmodule_dirs = ["{mods}"]\nforkserver = FORK\nTRUST\n']
    for i in range(count):
        name = f"m{i:03d}"
        (mods / f"{name}.toml").write_text(text.replace('name = "echo"', f'name = "{name}"'))
        (tuning / name).mkdir(parents=True)
        (tuning / name / "uncalibrated.toml").write_text("")
        lines.append(f"[modules.{name}]\n")
    # The manifests' entry point lives next to the shipped manifests.
    (mods / "ipa_modules").symlink_to(modules_dir / "ipa_modules")
    config = root / "config.toml"
    config.write_text("".join(lines))
    return config


def run_once(config: Path, count: int, fork: bool, root: Path) -> dict[str, Any]:
    """Start a daemon on ``config``, wait for daemon.started, measure, stop it."""
    cfg = root / f"config-{'fork' if fork else 'spawn'}.toml"
    mods = root / "modules"
    trust = f'trusted_module_dirs = ["{mods}"]' if fork else ""
    cfg.write_text(
        config.read_text().replace("FORK", "true" if fork else "false").replace("TRUST", trust)
    )
    env = dict(os.environ, IPAD_SOCKET=str(root / f"s-{fork}.sock"),
               IPAD_CONFIG_PATH=str(root / "tuning"))  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipad", "--config", str(cfg), "--log-format", "json"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    first: datetime | None = None
    try:
        if proc.stderr is None:
            raise RuntimeError("no stderr pipe")
        for line in proc.stderr:
            record = json.loads(line)
            stamp = datetime.fromisoformat(record["timestamp"])
            first = first or stamp
            if record["event"] == "daemon.started":
                wall = time.perf_counter() - start
                states = set(record["modules"].values())
                rss = _rss_kib(proc.pid)
                fds = sum(1 for _ in Path(f"/proc/{proc.pid}/fd").iterdir())
                return {
                    "modules": count,
                    "fork_server": fork,
                    "all_running": states == {"running"},
                    "from_first_log_s": (stamp - first).total_seconds(),
                    "wall_s": wall,
                    "daemon_rss_kib": rss,
                    "daemon_fds": fds,
                    "fds_per_worker": fds / count,
                }
        raise RuntimeError(f"daemon exited with {proc.wait()} before daemon.started")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: no daemon left behind


def main() -> None:
    """Print the table and save the figures."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100,200")
    sizes = [int(x) for x in parser.parse_args().sizes.split(",")]
    rows: list[dict[str, Any]] = []
    for count in sizes:
        with tempfile.TemporaryDirectory(prefix="ipad-scale-") as tmp:
            root = Path(tmp)
            config = make_modules(root, count)
            for fork in (True, False):
                rows.append(run_once(config, count, fork, root))
    print(f"{'modules':>7} {'fork server':>11} {'start->valid s':>14} {'wall s':>7} "
          f"{'RSS MiB':>8} {'fds/worker':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['modules']:>7} {'yes' if r['fork_server'] else 'no':>11} "
              f"{r['from_first_log_s']:>14.3f} {r['wall_s']:>7.3f} "
              f"{r['daemon_rss_kib'] / 1024:>8.1f} {r['fds_per_worker']:>10.2f}")  # fmt: skip
    at_200 = [r for r in rows if r["modules"] == 200 and r["fork_server"]]
    if at_200:
        figure = at_200[0]["from_first_log_s"]
        verdict = "PASS" if figure < GOAL_200_S else "MISS"
        print(f"goal: 200 modules valid in under {GOAL_200_S}s with the fork server: "
              f"{figure:.3f}s {verdict}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    machine = {"python": sys.version.split()[0], "platform": platform.platform(),
               "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat()}  # fmt: skip
    headline = [
        {
            "name": f"{r['modules']} modules start -> valid, "
            f"{'fork server' if r['fork_server'] else 'fresh interpreters'}",
            "value": r["from_first_log_s"] * 1000,
            "unit": "ms",
        }
        for r in rows
    ]
    out = {"machine": machine, "runs": rows, "headline": headline}
    (RESULTS / "scale.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
