"""``ipadctl stop MODULE`` and ``ipadctl start MODULE`` (ADMIN ``stop``/``start`` with a module)."""

from __future__ import annotations

import argparse
import sys

from ipad.cli.ctl_io import EXIT_FAILED, EXIT_NO_SUCH_MODULE, fail, json_line, shown
from ipad.client._blocking import BlockingClient
from ipad.protocol import wire as p
from ipad.protocol.errors import IpadError

#: The state each command brings a module to: anything else is a failure to say.
WANTED = {"stop": "stopped", "start": "running"}


def module_command(client: BlockingClient, args: argparse.Namespace) -> int:
    """Ask the daemon to stop or start MODULE; print ``MODULE: STATE``, exit 1 if not reached."""
    try:
        result = client.admin(args.command, args.module, timeout=args.timeout)
    except IpadError as exc:
        if exc.code != p.ErrorCode.UNKNOWN_MODULE.value:
            raise
        fail(args.json, exc.code, exc.message, exc.details)
        return EXIT_NO_SUCH_MODULE
    state = result.get("state")
    if args.json:
        print(json_line(result))
    else:
        print(f"{result['module']}: {state}")
    if state == WANTED[args.command]:
        return 0
    if not args.json:
        why = result.get("reason") or state
        print(f"ipadctl: {result['module']} did not {args.command}: {shown(why)}", file=sys.stderr)
    return EXIT_FAILED
