"""``ipadctl session MODULE``: a sequence of calls on one proxy, read line by line from stdin.

``call`` opens a new proxy each time, so init -> configure -> process could not
be run from the command line: here one proxy serves every line, as a
pipeline handler's does. Each line is ``METHOD [JSON-OBJECT] [NAME=@FILE...]``
(each ``NAME=@FILE`` passes FILE's bytes, in a memfd, as the Buffer argument
NAME); ``#`` starts a comment line and blank lines are skipped. A failure stops the session (exit 1,
or 2 for a line that cannot be read) unless ``--keep-going`` is given, as
``make -k``: then every line runs and the exit status says whether any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from ipad.cli.ctl_io import EXIT_FAILED, EXIT_USAGE, fail, json_line, shown
from ipad.client._blocking import BlockingClient, BlockingProxy
from ipad.client._buffers import make_buffer
from ipad.protocol.errors import IpadError


class LineError(Exception):
    """A line that is not ``METHOD [JSON-OBJECT]``; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """MODULE and --keep-going."""
    parser.add_argument("module")
    parser.add_argument(
        "--keep-going", "-k", action="store_true",
        help="run every line even after a failure (exit status 1 or 2 if any failed)",
    )  # fmt: skip


def parse_line(line: str) -> tuple[str, dict[str, object], dict[str, str]] | None:
    """``(method, args, files)`` of one line; None for a blank or comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    method, _, rest = text.partition(" ")
    rest = rest.strip()
    args: object = {}
    if rest.startswith(("{", "[", '"')) or rest[:1].isdigit():
        try:
            args, end = json.JSONDecoder().raw_decode(rest)
        except json.JSONDecodeError as exc:
            raise LineError(f"{method}: arguments are not JSON: {exc}") from None
        rest = rest[end:].strip()
    if not isinstance(args, dict):
        raise LineError(f"{method}: arguments must be a JSON object")
    files: dict[str, str] = {}
    for token in rest.split():
        name, sep, path = token.partition("=@")
        if not sep or not name or not path:
            raise LineError(f"{method}: expected NAME=@FILE after the arguments, not {token!r}")
        files[name] = path
    return method, args, files


def session(client: BlockingClient, args: argparse.Namespace) -> int:
    """Run each line of stdin as a call on one proxy of MODULE; print one result a line."""
    proxy = client.request_proxy(args.module)
    try:
        return _run(proxy, args, sys.stdin)
    finally:
        proxy.release()


def _call(proxy: BlockingProxy, method: str, call_args: dict[str, object],
          files: dict[str, str], timeout: float) -> object:  # fmt: skip
    """One call, each file's bytes passed in a memfd of its own (what Buffer arguments take)."""
    fds: dict[str, int] = {}
    try:
        for name, path in files.items():
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise LineError(f"{method}: {name}: cannot open {path}: {exc.strerror}") from None
            fds[name] = make_buffer(data)
        return proxy.call(method, call_args, fds, timeout=timeout)
    finally:
        for fd in fds.values():
            os.close(fd)


def _run(proxy: BlockingProxy, args: argparse.Namespace, lines: TextIO) -> int:
    status = 0
    for number, line in enumerate(lines, 1):
        try:
            parsed = parse_line(line)
            if parsed is None:
                continue
            method, call_args, files = parsed
            result = _call(proxy, method, call_args, files, args.timeout)
        except LineError as exc:
            fail(args.json, "usage", f"line {number}: {exc}")
            status = status or EXIT_USAGE
        except IpadError as exc:
            fail(args.json, exc.code, f"line {number}: {method}: {exc.message}", exc.details)
            status = status or EXIT_FAILED
        else:
            text = (shown(result, "\n\t") if isinstance(result, str) and not args.json
                    else json_line(result))  # fmt: skip
            print(text, flush=True)
            continue
        if not args.keep_going:
            break
    return status
