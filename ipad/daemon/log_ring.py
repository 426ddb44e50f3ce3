"""The daemon's recent log records, kept in memory for ``ipadctl logs`` (LOGS, LOG_RECORDS).

Outside systemd the daemon's log is its stderr, gone once read (or never
read); so a structlog step keeps a clipped copy of every record the daemon
logs, whatever the output, in a ring of fixed size. Under systemd the
journal has them all and ``ipadctl logs`` asks journalctl instead; the ring
is kept all the same (it costs at most ``RING_CHARS`` characters of text).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import os
import sys
import time
import traceback
from typing import Any

import msgspec
from structlog.typing import EventDict, WrappedLogger

from ipad.protocol import wire as p

#: Records kept; the oldest go first.
RECORDS = 1000
#: Fields kept per record (the first ones: event and level first).
FIELDS = 32
#: Characters kept of a string field, and of a traceback.
FIELD_CHARS = 512
TRACEBACK_CHARS = 4096
#: Characters of keys and string values one record keeps (its exception apart); the
#: fields past it are left out and counted (``fields_left_out``).
RECORD_CHARS = 4096
#: Characters each of the ring's two parts holds; past it its oldest records go, whatever
#: their number. Modules' records (module.log) reach the ring: counted in records alone,
#: 1000 of them at 32 fields of 512 characters held 35 MB (66 MB in characters past
#: U+FFFF), where the daemon's own records take a few hundred KiB.
RING_CHARS = 512 * 1024
#: Records whose text a module wrote (its log, its exceptions, its print() lines): kept
#: apart from the daemon's own, so that a module that logs all it may (the rate limits let
#: hundreds of records through each 10 s) pushes out none of the daemon's records.
MODULE_WORDS = frozenset({"module.log", "module.exception", "worker.stderr"})
#: Payload bytes of records one LOG_RECORDS carries (MAX_PAYLOAD is 256 KiB).
REPLY_BYTES = 192 * 1024

#: Fields the record carries in its own way (``time``), or that only say where in ipad it was.
_LEFT_OUT = frozenset({"timestamp", "filename", "lineno", "func_name", "pathname", "_callsite"})


def clip(value: object, limit: int = FIELD_CHARS) -> object:
    """A field's value as kept: numbers, booleans and None as they are, the rest a short string."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class _Part:
    """Records of one kind, the oldest dropped past ``size`` records or RING_CHARS characters."""

    def __init__(self, size: int) -> None:
        self.records: collections.deque[dict[str, Any]] = collections.deque()
        self.size = size
        #: Characters the records hold between them (``_chars``).
        self.chars = 0

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.chars += _chars(record)
        while len(self.records) > self.size or (self.chars > RING_CHARS and len(self.records) > 1):
            self.chars -= _chars(self.records.popleft())


class LogRing:
    """The last records, numbered; also whether (and where) the journal has them all.

    Two parts, each of at most ``size`` records and RING_CHARS characters: the
    daemon's own records, and those whose text a module wrote (MODULE_WORDS).
    """

    def __init__(self, size: int = RECORDS) -> None:
        self._own = _Part(size)
        self._words = _Part(size)
        self.seq = 0
        #: Set by the logging set-up: the records go to journald.
        self.journal = False

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record kept, oldest first."""
        return list(heapq.merge(self._own.records, self._words.records, key=_seq))

    @property
    def chars(self) -> int:
        """Characters the records hold between them."""
        return self._own.chars + self._words.chars

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        """The structlog step: keep a clipped copy; never fail the record itself."""
        with contextlib.suppress(Exception):  # logging must not fail for the ring's sake
            self.keep(event_dict)
        return event_dict

    def keep(self, event_dict: EventDict) -> None:
        """Append a clipped copy of one record."""
        self.seq += 1
        record: dict[str, Any] = {"seq": self.seq, "time": time.time()}
        left = RECORD_CHARS
        left_out = 0
        for key, value in event_dict.items():
            if key in _LEFT_OUT:
                continue
            if len(record) >= FIELDS + 1 or left <= 0:  # room kept for fields_left_out
                left_out += 1
                continue
            if key == "exc_info" and value:
                record["exception"] = clip(_traceback(value), TRACEBACK_CHARS)
                continue
            name = str(key)[:64]
            kept = clip(value, min(FIELD_CHARS, max(left - len(name), 1)))
            record[name] = kept
            left -= len(name) + (len(kept) if isinstance(kept, str) else 0)
        if left_out:
            record["fields_left_out"] = left_out
        (self._words if event_dict.get("event") in MODULE_WORDS else self._own).add(record)

    def query(self, module: str | None, lines: int, after: int | None) -> tuple[
        list[dict[str, Any]], int, bool
    ]:  # fmt: skip
        """The matching records (the last ``lines``, or the first after ``after``), as fit.

        Returns (records, cursor, more).
        """
        matching = [r for r in self.records
                    if (module is None or r.get("module") == module)
                    and (after is None or r["seq"] > after)]  # fmt: skip
        lines = max(lines, 0)
        # Without a cursor the last ``lines``; after one, the first ``lines`` that follow it.
        chosen = (matching[-lines:] if lines else []) if after is None else matching[:lines]
        out: list[dict[str, Any]] = []
        size = 0
        for record in chosen:
            size += len(msgspec.msgpack.encode(record))
            if out and size > REPLY_BYTES:
                break
            out.append(record)
        # Nothing to send: go on from the newest record (the ones between did not match).
        cursor = out[-1]["seq"] if out else self.seq
        more = len(out) < len(chosen) or (after is not None and len(matching) > len(chosen))
        return out, cursor, more

    def journal_match(self) -> list[str]:
        """The journalctl matches for this daemon's records: its invocation, else its pid."""
        invocation = os.environ.get("INVOCATION_ID")
        if invocation:
            return [f"_SYSTEMD_INVOCATION_ID={invocation}"]
        return [f"_PID={os.getpid()}"]


def _seq(record: dict[str, Any]) -> int:
    seq: int = record["seq"]
    return seq


def _chars(record: dict[str, Any]) -> int:
    """The characters of a kept record's keys and strings (what its size grows with)."""
    return sum(len(k) + (len(v) if isinstance(v, str) else 0) for k, v in record.items())


def _traceback(exc_info: object) -> str:
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        return "".join(traceback.format_exception(exc_info))
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and exc_info[1] is not None:
        return "".join(traceback.format_exception(*exc_info))
    return str(exc_info)


def log_reply(message: p.Logs, ring: LogRing | None = None) -> p.LogRecords:
    """LOG_RECORDS answering ``message`` from ``ring`` (the daemon's)."""
    ring = RING if ring is None else ring
    records, cursor, more = ring.query(message.module, message.lines, message.after)
    match = tuple(ring.journal_match()) if ring.journal else ()
    return p.LogRecords(tuple(records), cursor, more, ring.journal, match)


#: The daemon's one ring (configure_logging puts it in the processor chain).
RING = LogRing()
