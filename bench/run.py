"""Run every benchmark in bench/ and print their headline figures in one table.

Each ``bench/bench_<name>.py`` runs as its own process with the project's
interpreter (``.venv/bin/python`` when there is one), prints its own table and
writes ``bench/results/<name>.json``; this then reads those files and puts the
headline figures of every benchmark side by side, each with its ratio to the
limit that benchmark measured on the same machine in the same run.

    .venv/bin/python bench/run.py                       # every benchmark
    .venv/bin/python bench/run.py restart               # only bench_restart.py
    .venv/bin/python bench/run.py restart -- --kills 20 # arguments for the benchmark(s)
    .venv/bin/python bench/run.py --quick               # every benchmark, tiny sizes (smoke)
    .venv/bin/python bench/run.py --table-only          # the table from the last results

``--quick`` and ``--results DIR`` are passed down to every benchmark. Exit
status 1 if a benchmark failed or wrote no results; a goal missed is
reported (MISS), not an error.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import REPO, Row, exit_on_sigterm, machine, verdict
from _common import parser as common_parser

BENCH = Path(__file__).resolve().parent
#: How long a benchmark told to stop may take to clean up before it is killed.
STOP_TIMEOUT = 60.0

#: The order benchmarks run and appear in (any other bench_*.py comes after, by name).
ORDER = ("restart", "camera_restarts", "call", "buffers", "registered", "scale", "storm", "load",
         "fanout", "codec", "hostile")  # fmt: skip


def discover() -> dict[str, Path]:
    """Every benchmark script, by name (``bench_codec.py`` is ``codec``), in ORDER."""
    found = {path.stem.removeprefix("bench_"): path for path in BENCH.glob("bench_*.py")}
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(ORDER)), item[0])))


def interpreter() -> str:
    """The project's virtualenv interpreter, else the one running this."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run_one(name: str, script: Path, extra: Sequence[str]) -> tuple[int, float]:
    """Run one benchmark in the foreground; its exit status and how long it took.

    SIGTERM (or Ctrl-C) here is passed on to the benchmark, which then stops
    what it started; this waits for it before going.
    """
    print(f"=== {name}: {_shown(script)} {' '.join(extra)}".rstrip(), flush=True)
    start = time.monotonic()
    proc = subprocess.Popen([interpreter(), str(script), *extra], cwd=REPO)
    try:
        status = proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    took = time.monotonic() - start
    print(f"=== {name}: exit status {status} after {took:.1f} s\n", flush=True)
    return status, took


# --- headline figures -----------------------------------------------------------------


def headline(data: dict[str, Any]) -> list[Row]:
    """The rows a benchmark's results put in the combined table."""
    if isinstance(data.get("headline"), list):
        return [row for row in data["headline"] if isinstance(row, dict)]
    # A benchmark without a "headline" list: its top-level numbers.
    return [
        {"name": key, "value": value, "unit": ""}
        for key, value in data.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def load_results(
    results: Path, name: str, since: float | None
) -> tuple[dict[str, Any] | None, str]:
    """A benchmark's saved figures, unless missing or older than ``since``; and why not."""
    path = results / f"{name}.json"
    if not path.exists():
        return None, f"no {_shown(path)}"
    if since is not None and path.stat().st_mtime < since:
        return None, f"{_shown(path)} was not rewritten by this run"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"cannot read {_shown(path)}: {exc}"
    if not isinstance(data, dict):
        return None, f"{_shown(path)} is not a JSON object"
    return data, ""


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def print_table(names: Sequence[str], results: Path, since: float | None) -> bool:
    """The combined table, then every goal; False if some benchmark has no usable results."""
    complete = True
    lines: list[tuple[str, str, str, str, str, str]] = []
    notes: list[str] = []
    machines: dict[str, dict[str, Any]] = {}
    for name in names:
        data, why = load_results(results, name, since)
        if data is None:
            complete = False
            lines.append((name, f"({why})", "", "", "", ""))
            continue
        if isinstance(data.get("machine"), dict):
            machines[name] = data["machine"]
        for goal in data.get("goals", []):
            if isinstance(goal, dict):
                notes.append(f"{name:10s} {verdict(goal.get('met')):12s} {goal.get('goal')}: "
                             f"{goal.get('measured')}")  # fmt: skip
        rows = headline(data)
        if not rows:
            lines.append((name, f'(no "headline" list in {name}.json)', "", "", "", ""))
        for row in rows:
            value, ratio = row.get("value"), row.get("ratio")
            lines.append((
                name,
                str(row.get("name", "")),
                f"{value:.2f}" if isinstance(value, int | float) else str(value),
                str(row.get("unit", "")),
                f"{ratio:.2f}" if isinstance(ratio, int | float) else "",
                str(row.get("ratio_to", "")),
            ))  # fmt: skip
    width = max([len(line[1]) for line in lines] + [len("figure")])
    head = f"{'benchmark':10s} {'figure':{width}s} {'value':>10s} {'unit':4s} {'ratio':>8s}  to"
    out = [head, "-" * (len(head) + 10)]
    for name, label, value, unit, ratio, to in lines:
        out.append(f"{name:10s} {label:{width}s} {value:>10s} {unit:4s} {ratio:>8s}  {to}".rstrip())
    if notes:
        out += ["", "goals (a MISS is reported, not an error):", *(f"  {n}" for n in notes)]
    first = next(iter(machines.values()), machine())
    out += ["", "machine: " + ", ".join(
        f"{k} {v}" for k, v in first.items() if k not in ("load_average", "date"))]  # fmt: skip
    out += [f"  {name}: load average {m.get('load_average')} at {m.get('date')}"
            for name, m in machines.items()]  # fmt: skip
    text = "\n".join(out)
    print(text)
    if since is not None:
        (results / "table.txt").write_text(text + "\n")
    return complete


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks (all by default), then print the combined table."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args_in:
        at = args_in.index("--")
        args_in, extra = args_in[:at], args_in[at + 1 :]
    available = discover()
    parser = common_parser(__doc__)  # --quick, --results and --profile, passed down
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(available)}",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing; print the table from the saved results",
    )
    args = parser.parse_args(args_in)
    exit_on_sigterm()
    unknown = [name for name in args.names if name not in available]
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)}; there are: {', '.join(available)}")
    names = args.names or list(available)

    if args.table_only:
        return 0 if print_table(names, args.results, since=None) else 1
    passed = ["--quick"] if args.quick else []
    passed += ["--profile", str(args.profile)] if args.profile else []
    extra = [*passed, "--results", str(args.results), *extra]
    started = time.time()
    failed: dict[str, int] = {}
    took: dict[str, float] = {}
    for name in names:
        status, took[name] = run_one(name, available[name], extra)
        if status != 0:
            failed[name] = status
    complete = print_table(names, args.results, since=started)
    print("run times: " + ", ".join(f"{name} {t:.0f} s" for name, t in took.items()))
    if failed:
        print(f"FAILED: {', '.join(f'{n} (exit status {s})' for n, s in failed.items())}",
              file=sys.stderr)  # fmt: skip
    return 1 if failed or not complete else 0


if __name__ == "__main__":
    sys.exit(main())
