"""The ``ipadctl`` admin command; its operations arrive as the daemon grows them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The admin command line; common options come before the operation."""
    parser = argparse.ArgumentParser(
        prog="ipadctl",
        description="Inspect and control a running ipad daemon.",
    )
    parser.add_argument("--version", action="version", version=f"ipadctl {__version__}")
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="daemon socket (default: $IPAD_SOCKET, else the per-user or system default)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ipadctl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage()
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
