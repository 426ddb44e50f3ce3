"""The ``ipad`` command: run the daemon, or check a configuration and exit."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ipad._version import __version__
from ipad.config.model import DaemonSettings, LogFormat, LogLevel
from ipad.daemon.spawn import StartedProcess
from ipad.daemon.start_forkserver import start_forkserver

if TYPE_CHECKING:
    from ipad.config.check import CheckedConfig
    from ipad.config.problems import ConfigError

#: Used when neither --config nor $IPAD_CONFIG names a file.
DEFAULT_CONFIG = Path("/etc/ipad/config.toml")

#: Exit status for an invalid configuration or a daemon that cannot start.
EXIT_CONFIG = 1

#: Exit status when a signal interrupted the orderly shutdown (128 + SIGINT, as shells do).
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The daemon's command line."""
    parser = argparse.ArgumentParser(
        prog="ipad",
        description="Run IPA modules in supervised, isolated worker processes.",
    )
    parser.add_argument("--version", action="version", version=f"ipad {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"configuration file (default: $IPAD_CONFIG, else {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--check-config",
        type=Path,
        metavar="PATH",
        default=None,
        help="check the configuration at PATH and everything it refers to, then exit",
    )
    parser.add_argument(
        "--log-level", choices=[lvl.value for lvl in LogLevel], help="override [daemon] log_level"
    )
    parser.add_argument(
        "--log-format",
        choices=[fmt.value for fmt in LogFormat],
        help="override [daemon] log_format (journal is chosen by itself under systemd)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ipad`` and ``python -m ipad``."""
    args = build_parser().parse_args(argv)
    if args.check_config is not None:
        _configure_early_logging()
        return _check_only(args.check_config)
    open_files = raise_open_files_limit()  # before any worker: they all inherit it
    # First thing: the fork server's ~100 ms start-up then overlaps the imports and the
    # configuration check below, and the daemon's own start (ipad/daemon/start_forkserver.py).
    early = start_forkserver()
    try:
        return _serve(args, early, open_files)
    finally:
        early.discard()  # only if the daemon never took charge of it


def _configure_early_logging() -> None:
    from ipad.daemon.log_setup import configure_logging  # noqa: PLC0415 - after the fork server started

    # Until the configuration is read, only warnings (a shadowed module, an
    # ignored search path entry) are worth showing, and only on stderr.
    configure_logging(LogLevel.WARNING, LogFormat.CONSOLE)


def _serve(
    args: argparse.Namespace, early: StartedProcess, open_files: tuple[int, int] | None = None
) -> int:
    import structlog  # noqa: PLC0415 - after the fork server started

    from ipad.config.check import check_config  # noqa: PLC0415
    from ipad.config.problems import ConfigError  # noqa: PLC0415
    from ipad.daemon.journal import stderr_is_journal  # noqa: PLC0415
    from ipad.daemon.log_setup import configure_logging  # noqa: PLC0415

    _configure_early_logging()
    path = args.config or Path(os.environ.get("IPAD_CONFIG") or DEFAULT_CONFIG)
    try:
        checked = check_config(path)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    chosen: tuple[LogLevel, LogFormat] | None = None

    def relog(daemon: DaemonSettings) -> None:
        """Log as ``daemon`` says, unless the command line said otherwise; at start and reload."""
        nonlocal chosen
        level = LogLevel(args.log_level) if args.log_level else daemon.log_level
        fmt = LogFormat(args.log_format) if args.log_format else daemon.log_format
        if args.log_format is None and stderr_is_journal():
            fmt = LogFormat.JOURNAL
        if chosen == (level, fmt):
            return
        configure_logging(level, fmt)
        if chosen is not None:
            structlog.get_logger("ipad").info(
                "daemon.logging_changed", log_level=level.value, log_format=fmt.value
            )
        chosen = (level, fmt)

    relog(checked.config.daemon)
    if open_files is not None:
        was, now = open_files
        structlog.get_logger("ipad").info("daemon.open_files", soft_limit=now, was=was)
    return _run(checked, early, relog)


#: The most descriptors Linux lets a process have unless /proc/sys/fs/nr_open says otherwise.
NR_OPEN = 1 << 20


def raise_open_files_limit() -> tuple[int, int] | None:
    """Take the hard limit of open files as our soft one; (old, new) if that changed it.

    Each module holds about eight descriptors (control socket, pidfd, output
    pipe and heartbeat board of its worker and of its standby), each client
    one or more: systemd's default soft limit of 1024 runs out near 120
    modules. The daemon uses epoll, never select(), so a high limit is safe;
    its workers inherit it (a sandboxed one sets its own, ``open_files``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return None  # above nr_open, say: keep what we have
    return soft, target


def _run(
    checked: CheckedConfig, early: StartedProcess, relog: Callable[[DaemonSettings], None]
) -> int:
    import structlog  # noqa: PLC0415
    import trio  # noqa: PLC0415 - --check-config and --help need not pay for importing trio

    from ipad.daemon.listener import ListenerError  # noqa: PLC0415
    from ipad.daemon.runtime import run_daemon  # noqa: PLC0415
    from ipad.daemon.systemd import ActivationError  # noqa: PLC0415

    # A fatal signal -- systemd's watchdog sends SIGABRT to a stuck daemon --
    # prints every thread's Python stack first: the journal then shows where it hung.
    faulthandler.enable(all_threads=True)
    # What is imported and checked so far lives as long as the daemon: the collector
    # need not walk it again and again while the workers start.
    gc.freeze()
    try:
        trio.run(run_daemon, checked, early, relog)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ListenerError, ActivationError, OSError) as exc:
        structlog.get_logger("ipad").error("daemon.start_failed", error=str(exc))
        return EXIT_CONFIG
    return 0


def _check_only(path: Path) -> int:
    from ipad.config.check import check_config  # noqa: PLC0415 - only for this
    from ipad.config.problems import ConfigError  # noqa: PLC0415

    try:
        checked = check_config(path)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    modules = ", ".join(sorted(checked.plans)) or "none"
    print(f"{path}: ok (modules: {modules})")
    return 0


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
