"""Sampling profiles of the daemon for the benchmarks' ``--profile DIR`` (py-spy, bench extra).

With ``--profile DIR`` a benchmark attaches ``py-spy record`` to each daemon
it starts (its fork server and workers included) and stops it before the
daemon, which writes ``DIR/<label>-<pid>.txt`` in py-spy's raw format: one
line per distinct stack, ``frame;frame;... count``. ``summarise`` turns that
into the functions that dominate: where the samples are (self) and what is
on the stack (inclusive), per process, which bench/RESULTS.md quotes where a
figure misses its goal. ``python bench/_profile.py FILE`` prints it again.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

#: Samples per second: enough to see a 1 ms restart's pieces over a run of kills.
RATE = 1000

#: Where daemons' profiles go (set by ``--profile DIR``); None: no profiling.
directory: Path | None = None


class ProfileInto(argparse.Action):
    """``--profile DIR``: every daemon the benchmark starts is recorded into DIR."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        global directory  # noqa: PLW0603 - one setting for the whole benchmark process
        directory = Path(str(values)).resolve()
        setattr(namespace, self.dest, directory)


@contextlib.contextmanager
def py_spy(pid: int, output: Path | None) -> Iterator[None]:
    """Record ``pid`` and its subprocesses into ``output`` while inside (no-op without one)."""
    tool = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if output is None:
        yield
        return
    if not Path(tool).exists():
        raise RuntimeError("--profile needs py-spy: pip install -e '.[bench]'")
    output.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [tool, "record", "--pid", str(pid), "--subprocesses", "--rate", str(RATE),
         "--format", "raw", "--nonblocking", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _frame_name(frame: str) -> str:
    """``function (file.py:line)`` without the line: one name per function."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


#: A frame on the stack that says which of ipad's processes it is (forked ones share a
#: command line), most specific first.
ROLES = (
    ("main (ipad/worker/host.py)", "workers"),
    ("serve (ipad/worker/forkserver.py)", "fork server"),
    ("main (ipad/cli/daemon.py)", "daemon"),
)


def _role(frames: list[str]) -> str:
    for frame, role in ROLES:
        if frame in frames:
            return role
    return "other (start-up, imports)"


def summarise(path: Path, top: int = 12) -> str:
    """The functions with the most samples, self and inclusive, per kind of process."""
    by_process: dict[str, tuple[collections.Counter[str], collections.Counter[str], int]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        frames = [_frame_name(f) for f in frames if not f.startswith(("process ", "thread "))]
        process = _role(frames)
        empty: tuple[collections.Counter[str], collections.Counter[str], int] = (
            collections.Counter(), collections.Counter(), 0)  # fmt: skip
        own, inclusive, total = by_process.get(process, empty)
        if frames:
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
        by_process[process] = (own, inclusive, total + count)
    out = []
    for process, (own, inclusive, total) in sorted(by_process.items(), key=lambda p: -p[1][2]):
        out.append(f"{process[:100]}: {total} samples ({total / RATE:.2f} s on CPU)")
        out.append("  self:")
        out += [f"    {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
        out.append("  inclusive:")
        out += [f"    {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(summarise(Path(argument)))
