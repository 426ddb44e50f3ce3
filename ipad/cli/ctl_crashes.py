"""``ipadctl crashes [MODULE] [-n N]``: the daemon's recent crash reports (ADMIN ``crashes``).

The reports hold the Python stacks of crashed workers, which may show data the
module handled: the daemon gives them only to admin clients (docs/operations.md,
"Crash reports").
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ipad.cli.ctl_io import shown
from ipad.client._blocking import BlockingClient

DESCRIPTION = (
    "Show the recent crash reports of every module, or only MODULE's, oldest first: time, "
    "worker pid, what ended it (a signal, an exit status, hung, oom, protocol), the method "
    "in flight and its proxy, then each one's reason and Python stack. Admin clients only. "
    "Exit status 0, 4 if MODULE is unknown, 1 on another error."
)

#: Records shown unless -n says otherwise.
DEFAULT_COUNT = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's own arguments."""
    parser.add_argument("module", nargs="?", help="show only this module's crashes")
    parser.add_argument(
        "-n", "--lines", type=int, default=DEFAULT_COUNT, metavar="N",
        help=f"show the newest N crashes (default {DEFAULT_COUNT})",
    )  # fmt: skip
    parser.add_argument(
        "--no-stack", action="store_true", help="the table only, without reasons and stacks"
    )


def crashes(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the crash reports; an error (an unknown module: exit 4) is ipadctl's to print."""
    result = client.admin("crashes", args.module, timeout=args.timeout)
    records: list[dict[str, Any]] = list(result.get("crashes", []))
    records = records[-args.lines :] if args.lines > 0 else []
    if args.json:
        print(json.dumps({**result, "crashes": records}, indent=2, sort_keys=True))
        return 0
    if not records:
        print("no crashes recorded")
        return 0
    rows = [["TIME", "MODULE", "PID", "KIND", "METHOD", "PROXY", "RAN"]]
    rows += [[shown(cell) for cell in _row(record)] for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not args.no_stack:
        for record in records:
            print(f"\n{_when(record['time'])} {shown(record['module'])} pid "
                  f"{record['worker_pid']}: {shown(record['reason'])}")  # fmt: skip
            # The stack is the worker's word: indented, no line of it passes for a header.
            # The daemon escapes it already; a daemon of another version may not.
            stack = shown(record["stack"], "\n\t")
            print("\n".join(f"    {line}".rstrip() for line in stack.splitlines())
                  or "(no Python stack: a native worker, or none was written)")  # fmt: skip
    return 0


def _row(record: dict[str, Any]) -> list[str]:
    method = record.get("method")
    proxy = record.get("proxy_id")
    ran = record.get("running_for")
    return [
        _when(record["time"]), str(record["module"]), str(record["worker_pid"]),
        str(record["kind"]), f"{method}()" if method else "-",
        str(proxy) if proxy is not None else "-", f"{ran:.3f}s" if ran is not None else "-",
    ]  # fmt: skip


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
