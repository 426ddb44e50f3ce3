"""``ipadctl events [MODULE] [-n N] [--follow]``: the daemon's events, as journalctl shows logs.

The past events come from the daemon's kept history (SUBSCRIBE with ``since``);
MODULE and -n are applied here, so any daemon that keeps history serves them.
"""

from __future__ import annotations

import argparse
import collections

import msgspec

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

#: Past lines shown when -n is not given, as journalctl's.
DEFAULT_LINES = 10


def lines_arg(text: str) -> int | None:
    """-n's value: a count, or ``all`` (None: no limit)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of lines: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the number of lines cannot be negative")
    return value


def add_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """MODULE, -n and --follow, as ``events`` and ``logs`` share them."""
    parser.add_argument("module", nargs="?", help=f"only the {what} about this module")
    parser.add_argument(
        "-n", "--lines", type=lines_arg, default=DEFAULT_LINES, metavar="N",
        help=f"show the last N past {what} (default {DEFAULT_LINES}; 'all': every one kept)",
    )  # fmt: skip
    parser.add_argument("--follow", "-f", action="store_true", help=f"keep printing new {what}")


def event_line(event: p.Event) -> str:
    """One event as the table shows it: local time, seq, kind:module, the other fields."""
    fields = " ".join(
        f"{k}={shown(v)}"  # reasons and details quote modules: never an escape or a line
        for k, v in msgspec.to_builtins(event).items()
        if v not in (None, {}) and k not in ("seq", "kind", "module", "time")
    )
    where = shown(f"{event.kind}:{event.module}")
    return f"{local_time(event.time)} {event.seq:6d} {where} {fields}".rstrip()


def events(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the last N kept events (of MODULE), then with --follow the new ones."""
    with until_interrupted():
        try:
            return _events(client, args)
        except (KeyboardInterrupt, Interrupted):
            return 0
        except Disconnected as exc:
            fail(args.json, "disconnected", f"the daemon went away: {exc.message}")
            return EXIT_FAILED


def _events(client: BlockingClient, args: argparse.Namespace) -> int:
    module: str | None = args.module
    known = module is None or module in client.status().modules
    subscribed = client.subscribe(since=0)
    recent: collections.deque[p.Event] = collections.deque(maxlen=args.lines)
    for _ in range(subscribed.replayed):
        event = client.next_event(args.timeout)
        if event is None:
            break
        if module is None or event.module == module:
            known = True  # a module a reload removed still has its past
            recent.append(event)
    if not known:
        fail(args.json, "unknown_module", f"no module {module!r}")
        return EXIT_NO_SUCH_MODULE
    show = json_line if args.json else event_line
    for event in recent:
        print(show(event), flush=True)
    while args.follow:
        event = client.next_event(None)
        if event is not None and (module is None or event.module == module):
            print(show(event), flush=True)
    return 0
