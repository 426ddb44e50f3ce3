"""What the ``ipadctl`` subcommands in their own modules share: exit statuses, output, signals.

The values are those of ipad/cli/ctl.py (tests/test_ctl_ops.py checks they agree); they
live here too so that a subcommand's module need not import the command it registers in.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import msgspec

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NO_SUCH_MODULE = 4


def shown(value: object, keep: str = "") -> str:
    """``value`` as text for a terminal: every control character escaped but those in ``keep``.

    What ipadctl prints comes in good part from modules (their log records, print()
    lines, exception messages, crash stacks): a module is untrusted, so none of it
    may reach the operator's terminal as escape sequences, or start a line of its
    own that passes for a record of the daemon or of another module.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def fail(as_json: bool, code: str, message: str, details: Any = None) -> None:
    """Say what failed: ``{"error": ...}`` on stdout with --json, else on stderr."""
    if as_json:
        error = {"code": code, "message": message, "details": details or {}}
        print(json.dumps({"error": error}), flush=True)
    else:
        print(f"ipadctl: {shown(message)}", file=sys.stderr, flush=True)
        if details and "traceback" in details:
            print(shown(details["traceback"], "\n\t"), file=sys.stderr)


def json_line(value: object) -> str:
    """One value as compact JSON on one line (a stream of them is JSON lines)."""
    return json.dumps(msgspec.to_builtins(value), sort_keys=True)


def local_time(seconds: float | None) -> str:
    """Wall-clock seconds since the epoch as ISO-8601 local time, to the millisecond."""
    if seconds is None:
        return "-"
    when = datetime.datetime.fromtimestamp(seconds).astimezone()
    return when.isoformat(timespec="milliseconds")


class Interrupted(Exception):
    """SIGTERM arrived while following: end as after ^C."""


@contextlib.contextmanager
def until_interrupted() -> Iterator[None]:
    """Turn SIGTERM into Interrupted for the block, as SIGINT is KeyboardInterrupt.

    ``--follow`` runs until the operator (^C) or a supervisor (SIGTERM) ends
    it; either is the way it is meant to end, so the caller exits 0.
    """

    def raise_interrupted(_: int, __: FrameType | None) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
