"""``ipadctl logs [MODULE] [-n N] [--follow]``: the daemon's log, from journald or its ring.

Under systemd (the daemon says so in LOG_RECORDS) journalctl reads the
journal, with the matches the daemon gave for itself; elsewhere the records
come from the daemon's in-memory ring (ipad/daemon/log_ring.py), paged with a
cursor and, with --follow, polled every POLL seconds.
"""

from __future__ import annotations

import argparse
import subprocess
import time

from ipad.cli.ctl_io import (
    EXIT_FAILED,
    EXIT_NO_SUCH_MODULE,
    Interrupted,
    fail,
    json_line,
    local_time,
    shown,
    until_interrupted,
)
from ipad.client._blocking import BlockingClient
from ipad.protocol import wire as p
from ipad.protocol.errors import Disconnected

#: Seconds between two looks at the ring while following.
POLL = 0.5
#: Seconds journalctl gets to end after SIGTERM before it is killed.
JOURNALCTL_STOP = 5.0
#: What -n all asks the ring for: more than it ever holds.
ALL = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--ring, besides the MODULE, -n and --follow of ``events``."""
    parser.add_argument(
        "--ring", action="store_true",
        help="read the daemon's in-memory ring even where it logs to journald",
    )  # fmt: skip


def record_line(record: dict[str, object]) -> str:
    """One record as the table shows it: local time, level, event, the other fields."""
    when = record.get("time")
    # Module records, print() lines: a module's words, never a line or an escape of their own.
    fields = " ".join(f"{shown(k)}={shown(v)}" for k, v in record.items()
                      if k not in ("seq", "time", "level", "event", "exception")
                      and v is not None)  # fmt: skip
    head = f"{local_time(when if isinstance(when, float) else None)} "
    level, event = shown(record.get("level", "")), shown(record.get("event", ""))
    line = f"{head}{level:<8} {event} {fields}".rstrip()
    exception = record.get("exception")
    return f"{line}\n{shown(exception, chr(10) + chr(9))}" if exception else line


def logs(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the last N records (of MODULE); with --follow, new ones until interrupted."""
    minor = client.welcome.minor if client.welcome is not None else 0
    if minor < p.MINOR_CTL_LOGS:
        needed = p.MINOR_CTL_LOGS
        fail(args.json, "unsupported_version",
             f"the daemon speaks protocol minor {minor}: its logs need minor {needed}")  # fmt: skip
        return EXIT_FAILED
    with until_interrupted():
        try:
            return _logs(client, args)
        except (KeyboardInterrupt, Interrupted):
            return 0
        except Disconnected as exc:
            fail(args.json, "disconnected", f"the daemon went away: {exc.message}")
            return EXIT_FAILED


def _ask(client: BlockingClient, args: argparse.Namespace, lines: int,
         after: int | None) -> p.LogRecords:  # fmt: skip
    reply: p.LogRecords = client.request(p.Logs(args.module, lines, after), p.LogRecords,
                                         args.timeout)  # fmt: skip
    return reply


def _logs(client: BlockingClient, args: argparse.Namespace) -> int:
    module: str | None = args.module
    wanted = ALL if args.lines is None else args.lines
    reply = _ask(client, args, wanted, None)
    if reply.journal and not args.ring:
        return _journalctl(reply.journal_match, args)
    if module is not None and not reply.records and module not in client.status().modules:
        fail(args.json, "unknown_module", f"no module {module!r}")
        return EXIT_NO_SUCH_MODULE
    printed = _show(reply, args)
    while reply.more and printed < wanted:
        reply = _ask(client, args, wanted - printed, reply.cursor)
        printed += _show(reply, args)
    cursor = reply.cursor
    while args.follow:
        reply = _ask(client, args, ALL, cursor)
        _show(reply, args)
        cursor = reply.cursor
        if not reply.more:
            time.sleep(POLL)
    return 0


def _show(reply: p.LogRecords, args: argparse.Namespace) -> int:
    show = json_line if args.json else record_line
    for record in reply.records:
        print(show(record), flush=True)
    return len(reply.records)


def _journalctl(match: tuple[str, ...], args: argparse.Namespace) -> int:
    """Run journalctl on the daemon's records (of MODULE); its exit status is ours."""
    argv = ["journalctl", "--no-pager", *match]
    if args.module is not None:
        argv.append(f"MODULE={args.module}")
    argv += ["-n", "all" if args.lines is None else str(args.lines)]
    if args.follow:
        argv.append("-f")
    if args.json:
        argv += ["-o", "json"]
    try:
        child = subprocess.Popen(argv)
    except OSError as exc:
        fail(args.json, "no_journalctl", f"the daemon logs to journald, but journalctl cannot "
             f"run here ({exc.strerror}); try --ring for its recent records")  # fmt: skip
        return EXIT_FAILED
    try:
        return child.wait()
    except (KeyboardInterrupt, Interrupted):  # journalctl -f ends on the same ^C
        child.terminate()
        try:
            child.wait(timeout=JOURNALCTL_STOP)
        except subprocess.TimeoutExpired:  # a journalctl that ignores SIGTERM: ours to reap
            child.kill()
            child.wait()
        return 0
