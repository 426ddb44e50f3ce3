"""``ipadctl metrics [MODULE]``: the daemon's metrics in the OpenMetrics text format."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ipad.client._blocking import BlockingClient

DESCRIPTION = (
    "Print the daemon's metrics in the OpenMetrics text format (calls, errors, latency, "
    "restarts, recovery, uptime and proxies per module; clients, refusals and dropped events "
    "of the daemon), or only the daemon's and MODULE's. An admin operation: the access "
    "policy's admin groups may read them. Exit status 0, 1 on an error (daemon unreachable, "
    "permission denied, too large for one reply), 4 if MODULE is unknown."
)


def add_parser(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register the subcommand with ``add`` (ctl.build_parser's helper)."""
    parser = add("metrics", "metrics in the OpenMetrics text format")
    parser.add_argument("module", nargs="?", help="only this module's (and the daemon's)")


def metrics(client: BlockingClient, args: argparse.Namespace) -> int:
    """Ask for the metrics (ADMIN ``metrics``) and print them as they came.

    An error (an unknown module: exit 4) is ipadctl's to print, as JSON with ``--json``.
    """
    result = client.admin("metrics", args.module, timeout=args.timeout)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        sys.stdout.write(str(result.get("text", "")))
    return 0
