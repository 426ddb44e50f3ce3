"""``python -m ipad.conformance worker|client [options] -- CMD [ARG...]``: judge a peer.

Prints one line per rule (PASS, FAIL or SKIP, the rule, what was seen), or one
JSON document with ``--json``; exits 0 only if no rule failed, 2 on bad usage.
The whole run is bounded by ``--deadline``: past it, every process the kit
started is killed and reaped, and the run fails.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from ipad.config.paths import install_module_dir, install_tuning_dir
from ipad.conformance.procs import become_subreaper, kill_orphans
from ipad.conformance.report import Report
from ipad.conformance.worker import WorkerOptions, run_worker

#: Exit status of a run whose usage was wrong (argparse's too).
USAGE = 2


class DeadlinePassed(BaseException):
    """The run's --deadline passed: unwinds through every ``finally`` that reaps a process."""


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(
        prog="python -m ipad.conformance",
        description="Drive a third-party ipad worker executable or client through the "
        "protocol and report each rule of docs/protocol.md it keeps or breaks "
        "(docs/conformance.md).",
    )
    modes = top.add_subparsers(dest="mode", required=True)
    worker = modes.add_parser("worker", help="run CMD as the daemon runs a worker")
    client = modes.add_parser("client", help="run CMD as a client of a real and a fake daemon")
    for mode in (worker, client):
        mode.add_argument("--json", action="store_true", help="one JSON document, for machines")
        mode.add_argument(
            "--deadline",
            type=float,
            default=120.0,
            metavar="S",
            help="the whole run's bound in seconds (default 120)",
        )
        mode.add_argument("command", nargs="+", metavar="CMD", help="the program and its arguments")
    worker.add_argument("--module", default="echo", help="LOAD's module (default echo)")
    worker.add_argument(
        "--entry-point",
        default="ipa_modules.echo:Echo",
        help="LOAD's entry_point (default the shipped echo module's)",
    )
    worker.add_argument(
        "--module-dir",
        default=str(install_module_dir()),
        help="LOAD's module_dir (default ipad's shipped modules)",
    )
    worker.add_argument(
        "--tuning",
        default=str(install_tuning_dir() / "echo" / "uncalibrated.toml"),
        help="LOAD's tuning file (default the shipped echo tuning)",
    )
    worker.add_argument(
        "--start-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="LOAD must be answered within it (default 5, as ipad's)",
    )
    worker.add_argument(
        "--reply-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="any other reply must come within it (default 5)",
    )
    worker.add_argument(
        "--stop-timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="the worker must exit within it when told to (default 2, as ipad's)",
    )
    worker.add_argument(
        "--heartbeat-interval",
        type=float,
        default=0.25,
        metavar="S",
        help="LOAD's heartbeat_interval; 0 passes no board (default 0.25)",
    )
    client.add_argument(
        "--calls",
        type=int,
        default=20,
        metavar="N",
        help="IPAD_CONFORMANCE_CALLS for the run against the real daemon (default 20)",
    )
    client.add_argument(
        "--kills",
        type=int,
        default=3,
        metavar="K",
        help="how many times the echo worker is SIGKILLed during that run (default 3)",
    )
    client.add_argument(
        "--client-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="the client must finish the real-daemon run within it (default 60)",
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one mode; the exit status."""
    args = parser().parse_args(argv)
    report = Report(as_json=args.json)

    def deadline_passed(signum: int, frame: FrameType | None) -> None:
        raise DeadlinePassed

    signal.signal(signal.SIGALRM, deadline_passed)
    signal.setitimer(signal.ITIMER_REAL, args.deadline)
    become_subreaper()  # what a peer forks and leaves comes back here, to be killed at the end
    try:
        if args.mode == "worker":
            options = WorkerOptions(
                tuple(args.command),
                args.module,
                args.entry_point,
                args.module_dir,
                args.tuning,
                args.start_timeout,
                args.reply_timeout,
                args.stop_timeout,
                args.heartbeat_interval,
            )
            run_worker(options, report)
        else:
            from ipad.conformance.client import ClientOptions, run_client  # noqa: PLC0415

            if args.calls <= args.kills:
                print("--calls must be more than --kills", file=sys.stderr)
                return USAGE
            client = ClientOptions(tuple(args.command), args.calls, args.kills, args.client_timeout)
            run_client(client, report)
    except DeadlinePassed:
        report.add(
            "kit.deadline", False, f"the run took longer than --deadline {args.deadline:g} s"
        )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        left = kill_orphans()
    if left:
        report.add("kit.no_orphans", False, f"processes the peer left behind, killed: {left}")
    return report.finish(args.mode)


if __name__ == "__main__":
    sys.exit(main())
