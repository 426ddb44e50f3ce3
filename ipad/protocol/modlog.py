"""Bounds of MODULE_LOG records, shared by the worker that clips them and the daemon that checks.

Pure functions and numbers, no I/O: the worker host (ipad/worker/modlog.py)
clips every record to these bounds before it sends it, and the daemon
(ipad/daemon/modlog.py) applies the same bounds again to what arrives, since
module code can write to its control socket itself.
"""

from __future__ import annotations

from collections.abc import Mapping

#: The levels a record may have, lowest first (anything else is logged as ``info``).
LEVELS = ("debug", "info", "warning", "error", "critical")
#: ``logging`` level numbers, for the levels above.
LEVEL_NUMBERS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

#: Characters of a record's text (event name or message) kept; the rest is cut and marked.
MAX_LOG_TEXT = 1024
#: Fields one record keeps; past it the rest are dropped and counted (``fields_dropped``).
MAX_LOG_FIELDS = 32
#: Characters of a field's name; a longer field is dropped (and counted).
MAX_LOG_KEY = 64
#: Characters of a field's value kept (values that are not strings are made strings first).
MAX_LOG_VALUE = 512
#: Characters of a traceback kept (its end: where it was raised).
MAX_LOG_TRACEBACK = 8192
#: Characters of a logger's or method's name kept.
MAX_LOG_NAME = 128

#: Records the worker host sends per LOG_INTERVAL seconds; it drops and counts the rest.
LOG_BURST = 200
#: Exception reports (a call that raised) the worker host sends per LOG_INTERVAL, apart.
EXCEPTION_BURST = 50
LOG_INTERVAL = 10.0
#: What the daemon logs per LOG_INTERVAL for one worker: twice what an honest host sends
#: (the two sides' intervals need not line up), plus its reports of what it dropped.
DAEMON_LOG_BURST = 2 * (LOG_BURST + EXCEPTION_BURST + 1)
#: Records past DAEMON_LOG_BURST in one interval that the daemon drops before it kills the
#: worker as a protocol violation: only module code writing to the control socket sends them.
DAEMON_LOG_FLOOD = DAEMON_LOG_BURST

Scalar = str | int | float | bool | None


def clip(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` characters, else its start and a marked truncation."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def clip_end(text: str, limit: int) -> str:
    """``text`` if at most ``limit`` characters, else its end (a traceback's last frames)."""
    if len(text) <= limit:
        return text
    return f"[{len(text) - limit} characters cut]…{text[-limit:]}"


def bound_value(value: object) -> Scalar:
    """A field's value as a bounded scalar: strings clipped, anything else made a string."""
    if value is None or isinstance(value, (bool, int, float)):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            return clip(str(value), MAX_LOG_VALUE)  # msgpack carries 64-bit integers only
        return value
    if not isinstance(value, str):
        try:
            value = repr(value)
        except Exception:  # noqa: BLE001 - a module's __repr__ may fail; its record must not
            value = f"<unrepresentable {type(value).__name__}>"
    return clip(value, MAX_LOG_VALUE)


def bound_fields(fields: Mapping[str, object]) -> dict[str, Scalar]:
    """At most MAX_LOG_FIELDS fields, names and values bounded; what was dropped, counted."""
    out: dict[str, Scalar] = {}
    dropped = 0
    for key, value in fields.items():
        if key == "fields_dropped" and type(value) is int and 0 <= value < 2**31:
            dropped += value  # counted by the worker already: kept, whatever the order
            continue
        if len(out) >= MAX_LOG_FIELDS - 1 or not isinstance(key, str) or len(key) > MAX_LOG_KEY:
            dropped += 1
            continue
        out[key] = bound_value(value)
    if dropped:
        out["fields_dropped"] = dropped
    return out


def level_name(level: str) -> str:
    """``level`` if it is one of LEVELS, else ``info``."""
    return level if level in LEVEL_NUMBERS else "info"
