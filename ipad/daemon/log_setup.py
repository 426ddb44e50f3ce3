"""Logging set-up: one structlog processor chain whose last step picks the output.

Console, JSON lines and journald are interchangeable final renderers of the
same event dicts, so every output carries the same event name and fields.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from ipad.config.model import LogFormat, LogLevel
from ipad.daemon.journal import JOURNAL_SOCKET, JournalLogger, journal_message
from ipad.daemon.log_ring import RING

#: Call-site fields; journald shows them as CODE_FILE, CODE_LINE and CODE_FUNC.
_CALLSITE = structlog.processors.CallsiteParameterAdder(
    {
        structlog.processors.CallsiteParameter.PATHNAME,
        structlog.processors.CallsiteParameter.LINENO,
        structlog.processors.CallsiteParameter.FUNC_NAME,
    }
)


#: Structured tracebacks without local variables: those may hold data that must not be logged.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


#: The key by which a record names the code that decided on it, where that is not the code
#: that logs it: a module's lifecycle machine words records its supervisor writes.
CALLSITE = "_callsite"


#: Call sites are named from the directory holding the ipad package: ``ipad/daemon/lifecycle.py``
#: says which process's code it is, where a bare ``lifecycle.py`` would not.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _decided_at(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """A ``_callsite`` of (path, line, function) replaces the call site found on the stack."""
    where = event_dict.pop(CALLSITE, None)
    if where is not None:
        event_dict["pathname"], event_dict["lineno"], event_dict["func_name"] = where
    path = event_dict.pop("pathname", None)
    if path is not None:
        event_dict["filename"] = _source_file(path)
    return event_dict


def _source_file(path: str) -> str:
    """``ipad/daemon/lifecycle.py`` for ipad's own files, the path as it is for others'."""
    try:
        return str(Path(path).relative_to(_SOURCE_ROOT))
    except ValueError:
        return path


def shared_processors() -> list[Processor]:
    """The steps every output shares, before its renderer."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _CALLSITE,
        _decided_at,
        structlog.processors.StackInfoRenderer(),
    ]


def render_journal(_: WrappedLogger, __: str, event_dict: EventDict) -> bytes:
    """Final step for journald: a human MESSAGE plus every field as its own journal field."""
    fields = dict(event_dict)
    exc_text = ""
    if "exception" in fields:
        exc_text = "\n" + str(fields["exception"])
    shown = " ".join(
        f"{k}={v}" for k, v in fields.items() if k not in _NOT_IN_MESSAGE and v is not None
    )
    message = f"{fields.get('event', '')} {shown}".rstrip() + exc_text
    return journal_message(fields, message)


#: Fields the journal already shows apart from MESSAGE's text.
_NOT_IN_MESSAGE = frozenset(
    {"event", "level", "timestamp", "filename", "lineno", "func_name", "exception"}
)


def _terminal_safe(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Console only: every control character in a key or a string value escaped.

    Modules' records, print() lines and field names reach this log (module.log,
    worker.stderr): the console renderer prints a string without spaces as it
    is, and the ``logger`` column always, so an escape sequence would reach the
    terminal and a newline would start a line passing for another record.
    """
    if all(_printable(k) and (not isinstance(v, str) or _printable(v))
           for k, v in event_dict.items()):  # fmt: skip
        return event_dict
    return {_escaped(k) if isinstance(k, str) else k: _escaped(v) if isinstance(v, str) else v
            for k, v in event_dict.items()}  # fmt: skip


def _printable(text: object) -> bool:
    return not isinstance(text, str) or text.isprintable()


def _escaped(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _drop_callsite(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in ("filename", "lineno", "func_name"):
        event_dict.pop(key, None)
    return event_dict


def renderers(fmt: LogFormat, stream: TextIO) -> list[Processor]:
    """The last steps of the chain for one output format."""
    if fmt is LogFormat.JSON:
        return [_DICT_TRACEBACKS, structlog.processors.JSONRenderer()]
    if fmt is LogFormat.JOURNAL:
        return [structlog.processors.format_exc_info, render_journal]
    colors = stream.isatty()
    return [_drop_callsite, _terminal_safe, structlog.dev.ConsoleRenderer(colors=colors)]


def configure_logging(
    level: LogLevel = LogLevel.INFO,
    fmt: LogFormat = LogFormat.CONSOLE,
    stream: TextIO | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> None:
    """Configure structlog globally for the daemon or a CLI.

    The journal format falls back to the console, saying so, where no journald listens.
    """
    out = sys.stderr if stream is None else stream
    factory: Callable[..., Any]
    missing = fmt is LogFormat.JOURNAL and not Path(journal_socket).exists()
    if missing:
        fmt = LogFormat.CONSOLE
    if fmt is LogFormat.JOURNAL:
        journal = JournalLogger(journal_socket, out)

        def factory(*_: object) -> JournalLogger:
            return journal
    else:
        factory = structlog.WriteLoggerFactory(file=out)
    RING.journal = fmt is LogFormat.JOURNAL
    structlog.configure(
        # The ring (``ipadctl logs``) keeps a clipped copy of each record, whatever the output.
        processors=[*shared_processors(), RING, *renderers(fmt, out)],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.value.upper()]
        ),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    if missing:
        structlog.get_logger("ipad").warning(
            "journal.unavailable", socket=journal_socket, fallback="console"
        )
