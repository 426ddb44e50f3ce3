"""A module's MODULE_LOG records into the daemon's log: bounded, rate-limited, at their level.

Each record becomes ``module.log`` (or ``module.exception``, for a call that
raised) at the level the module gave it, with ``module``, ``worker_pid``,
``instance`` and, when the instance serves one, ``proxy_id``; under journald
those are the fields MODULE=, WORKER_PID=, PRIORITY=. The module's own fields
follow under their names, except names the daemon's records or journald use
themselves, which get a ``field_`` prefix: a module can say anything about
itself, never pass for the daemon or another module.

Everything is bounded again here (ipad/protocol/modlog.py), since module code
can write to its control socket itself. Per worker at most DAEMON_LOG_BURST
records per LOG_INTERVAL are logged; the rest are dropped and counted, and
the counts logged (``module.log_suppressed``), as the output relay does. A
worker that sends DAEMON_LOG_FLOOD more within one interval is killed as a
protocol violation: ipad's worker host limits itself far below that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import structlog
import trio

from ipad.daemon.journal import field_name
from ipad.daemon.reactor import TimerHandle, Timers
from ipad.protocol import modlog as b
from ipad.protocol import wire as p
from ipad.protocol.rate_limit import RateLimit

log = structlog.get_logger("ipad")

#: Keys of the daemon's own (and structlog's): a module's field by one of these names is renamed.
RESERVED = frozenset({
    "event", "level", "timestamp", "module", "worker_pid", "instance", "proxy_id", "method",
    "logger", "text", "traceback", "exception", "exc_info", "stack_info", "filename", "lineno",
    "func_name", "pathname", "_callsite", "message", "suppressed", "kind", "exception_type",
})  # fmt: skip
#: journald's well-known fields (and ipad's), which a module's field must not set.
RESERVED_JOURNAL = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "ERRNO", "INVOCATION_ID", "USER_INVOCATION_ID", "TID",
    "UNIT", "USER_UNIT", "DOCUMENTATION", "IPAD_EVENT", "MODULE", "WORKER_PID", "PROXY_ID",
    "INSTANCE", "METHOD", "LOGGER", "TEXT", "TRACEBACK", "EXCEPTION", "EXCEPTION_TYPE",
    "SUPPRESSED",
})  # fmt: skip
RESERVED_JOURNAL_PREFIXES = ("CODE_", "SYSLOG_", "OBJECT_", "COREDUMP_", "IPAD_")


def field_key(key: str) -> str:
    """A module's field name as logged: ``field_`` before one the daemon or journald uses."""
    name = field_name(key)
    if (key in RESERVED or name in RESERVED_JOURNAL
            or name.startswith(RESERVED_JOURNAL_PREFIXES)):  # fmt: skip
        return f"field_{key}"
    return key


def daemon_log_level() -> str:
    """The lowest level the daemon's log keeps now: workers send no module record below it."""
    logger = structlog.get_logger("ipad").bind()
    enabled = getattr(logger, "is_enabled_for", None)
    if enabled is None:  # not a filtering logger: everything is kept
        return ""
    for name in b.LEVELS:
        if enabled(b.LEVEL_NUMBERS[name]):
            return name
    return "critical"


class ModuleLogGate:
    """One worker's MODULE_LOG records: bounded, limited, logged; a flood is a violation."""

    __slots__ = ("dropped", "limit", "module", "pid", "proxy_of", "timer", "timers")

    def __init__(
        self,
        module: str,
        pid: int,
        proxy_of: Callable[[int], int | None] | None = None,
        timers: Timers | None = None,
    ) -> None:
        self.module = module
        self.pid = pid
        #: The proxy an instance serves, if the worker's supervisor can tell.
        self.proxy_of = proxy_of
        self.limit = RateLimit(b.LOG_INTERVAL, b.DAEMON_LOG_BURST)
        #: Records dropped in the current interval (past DAEMON_LOG_FLOOD: a violation).
        self.dropped = 0
        #: Where the drops are reported when the interval ends (None: at the next record).
        self.timers = timers
        self.timer: TimerHandle | None = None

    def receive(self, record: p.ModuleLog, now: float) -> str | None:
        """Log ``record`` if the rate allows; a reason to kill the worker if it floods."""
        allowed, ended = self.limit.allow(now)
        if ended:
            self._report(ended, "daemon")
            self.dropped = 0
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        if not allowed:
            self.dropped += 1
            if self.timer is None and self.timers is not None:
                self.timer = self.timers.call_at(self.limit.deadline, self._expire)
            if self.dropped > b.DAEMON_LOG_FLOOD:
                return (f"more than {b.DAEMON_LOG_BURST + b.DAEMON_LOG_FLOOD} MODULE_LOG "
                        f"records within {b.LOG_INTERVAL:g}s")  # fmt: skip
            return None
        if record.suppressed > 0:
            self._report(record.suppressed, "worker")
        if record.text or record.kind == "exception":
            self._write(record)
        return None

    def flush(self) -> None:
        """The worker is gone: log what the current interval dropped."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._report(self.limit.flush(), "daemon")

    def _expire(self) -> None:
        """The interval with drops is over: log their count now, not at the next record."""
        self.timer = None
        count = self.limit.expire(trio.current_time())
        if count:
            self._report(count, "daemon")
            self.dropped = 0
        elif self.timers is not None and self.limit.deadline < math.inf:  # early: again
            self.timer = self.timers.call_at(self.limit.deadline, self._expire)

    def _report(self, count: int, by: str) -> None:
        if count > 0:
            log.warning("module.log_suppressed", module=self.module, worker_pid=self.pid,
                        suppressed=count, by=by, burst=b.LOG_BURST if by == "worker"
                        else b.DAEMON_LOG_BURST, interval=b.LOG_INTERVAL)  # fmt: skip

    def _write(self, record: p.ModuleLog) -> None:
        exception = record.kind == "exception"
        raw = dict(record.fields)
        # The worker host's report names the exception's type; a module's record cannot.
        exc_type = raw.pop("exception", None) if exception else None
        fields: dict[str, Any] = {field_key(k): v for k, v in b.bound_fields(raw).items()}
        if exception:
            fields["exception_type"] = b.clip(str(exc_type or ""), b.MAX_LOG_NAME)
        instance = record.instance_id if record.instance_id > 0 else None
        proxy_id = None
        if instance is not None and self.proxy_of is not None:
            proxy_id = self.proxy_of(instance)
        # Only when there is one: the console renderer shows a None logger as "[None]".
        if record.logger:
            fields["logger"] = b.clip(record.logger, b.MAX_LOG_NAME)
        if record.traceback:
            fields["traceback"] = b.clip_end(record.traceback, b.MAX_LOG_TRACEBACK)
        level = b.level_name(record.level)
        getattr(log, level)(
            "module.exception" if exception else "module.log",
            text=b.clip(record.text, b.MAX_LOG_TEXT),
            **fields,
            module=self.module,
            worker_pid=self.pid,
            instance=instance,
            proxy_id=proxy_id,
            method=b.clip(record.method, b.MAX_LOG_NAME) or None,
        )
