"""A module's log records and exceptions, sent to the daemon as MODULE_LOG on the control socket.

The worker host makes one LogSender. Each record is clipped to the bounds of
ipad/protocol/modlog.py and rate-limited (LOG_BURST records and
EXCEPTION_BURST exception reports per LOG_INTERVAL; the rest dropped and
counted, the count sent with the next record), then sent without waiting: a
daemon that does not read costs the module its records, never a stalled call.
Records below the daemon's level are not sent at all.

A daemon that did not agree to MODULE_LOG (an older one) gets each record as
a ``<N>``-prefixed line on stderr instead, which its output relay logs at
that level.

Python's ``logging`` is bridged only once something imported it (importing it
would bring threading into every worker): ``bridge`` installs a root handler
that turns every ``logging`` record into a MODULE_LOG, third-party libraries'
included.
"""

from __future__ import annotations

import _thread
import socket
import sys
import time
from collections.abc import Callable, Mapping

import msgspec

from ipad.protocol import modlog as b
from ipad.protocol import wire as p
from ipad.protocol.rate_limit import RateLimit

#: sd-daemon(3) prefixes for the stderr fallback.
_PREFIXES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


class LogSender:
    """Clips, limits and sends a worker's log records; safe to call from any thread."""

    def __init__(self, control: socket.socket, clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.clock = clock
        #: Whether the daemon reads MODULE_LOG (LOAD's minor); else the stderr fallback.
        self.enabled = False
        #: Records below this level are not sent (the daemon's level when LOAD came).
        self.threshold = b.LEVEL_NUMBERS["debug"]
        self.records = RateLimit(b.LOG_INTERVAL, b.LOG_BURST)
        self.exceptions = RateLimit(b.LOG_INTERVAL, b.EXCEPTION_BURST)
        #: Records dropped and not yet reported to the daemon.
        self.pending = 0
        #: The instance and method of the call in flight (set by the host around each call).
        self.instance_id = 0
        self.method = ""
        self._report_at = 0.0
        # Reentrant: a module's signal handler may log while the main thread is in here.
        self._lock = _thread.RLock()
        self.bridged = False

    def configure(self, load: p.Load) -> None:
        """Take LOAD's minor and log level: what to send, and how."""
        self.enabled = load.minor >= p.MINOR_MODULE_LOG
        self.threshold = b.LEVEL_NUMBERS.get(load.log_level, b.LEVEL_NUMBERS["debug"])

    def sink(self, instance_id: int) -> Callable[[str, str, dict[str, object], str], None]:
        """The sink of one instance's ModuleLog (its records name the instance)."""

        def send(level: str, event: str, fields: dict[str, object], tb: str) -> None:
            self.log(level, event, fields, instance_id=instance_id, traceback=tb)

        return send

    def log(
        self,
        level: str,
        text: str,
        fields: Mapping[str, object],
        *,
        instance_id: int = 0,
        logger: str = "",
        traceback: str = "",
    ) -> None:
        """Send one record if the level and the rate limit allow it."""
        if b.LEVEL_NUMBERS.get(level, b.LEVEL_NUMBERS["info"]) < self.threshold:
            return
        method = self.method if instance_id == self.instance_id else ""
        record = p.ModuleLog(
            b.level_name(level), b.clip(str(text), b.MAX_LOG_TEXT), b.bound_fields(fields),
            instance_id=instance_id, method=b.clip(method, b.MAX_LOG_NAME),
            logger=b.clip(logger, b.MAX_LOG_NAME),
            traceback=b.clip_end(traceback, b.MAX_LOG_TRACEBACK),
        )  # fmt: skip
        self._send(record, self.records)

    def exception(self, instance_id: int, method: str, exc: BaseException, tb: str) -> None:
        """Report a call that raised (its client gets the ERROR reply as before)."""
        name = type(exc).__name__
        try:
            said = str(exc)
        except Exception:  # noqa: BLE001 - a module's __str__ may fail; the report must not
            said = ""
        text = f"{name}: {said}" if said else name
        record = p.ModuleLog(
            "error", b.clip(text, b.MAX_LOG_TEXT), {"exception": b.clip(name, b.MAX_LOG_NAME)},
            kind="exception", instance_id=instance_id, method=b.clip(method, b.MAX_LOG_NAME),
            traceback=b.clip_end(tb, b.MAX_LOG_TRACEBACK),
        )  # fmt: skip
        self._send(record, self.exceptions)

    def wait(self) -> float:
        """Seconds until dropped records are due to be reported (-1: none are)."""
        if not self.pending:
            return -1
        return max(0.0, self._report_at - self.clock())

    def tick(self, *, final: bool = False) -> None:
        """Report records dropped LOG_INTERVAL ago (or any, if ``final``) not reported yet."""
        if self.pending and (final or self.clock() >= self._report_at):
            with self._lock:
                count, self.pending = self.pending, 0
            if count and not self._write(p.ModuleLog("warning", "", suppressed=count)):
                with self._lock:
                    self._dropped(count)

    def _send(self, record: p.ModuleLog, limit: RateLimit) -> None:
        with self._lock:
            allowed, _ = limit.allow(self.clock())
            if not allowed:
                self._dropped(1)
                return
            count, self.pending = self.pending, 0
        if count:
            record = msgspec.structs.replace(record, suppressed=count)
        if not self._write(record):
            with self._lock:
                self._dropped(1 + count)

    def _dropped(self, count: int) -> None:
        """Count dropped records (under the lock); the first of a batch sets when to report."""
        if not self.pending:
            self._report_at = self.clock() + b.LOG_INTERVAL
        self.pending += count

    def _write(self, record: p.ModuleLog) -> bool:
        """Send now, without waiting; whether it went."""
        if not self.enabled:
            return _to_stderr(record)
        try:
            packet = p.encode(record)
        except ValueError:  # past the packet limit: cannot be, with the bounds; kept short
            short = msgspec.structs.replace(record, fields={}, traceback="")
            packet = p.encode(short)
        try:
            self.control.send(packet, socket.MSG_DONTWAIT)
        except OSError:  # full (the daemon is busy) or gone: dropped, counted
            return False
        return True

    def bridge(self) -> None:
        """Route Python's ``logging`` to the daemon, once something has imported it."""
        if not self.bridged and "logging" in sys.modules:
            from ipad.worker.logbridge import install  # noqa: PLC0415 - only with logging

            install(self)
            self.bridged = True


def _to_stderr(record: p.ModuleLog) -> bool:
    """The fallback for a daemon without MODULE_LOG: a line its relay logs at the level."""
    parts = [record.text, *(f"{k}={v}" for k, v in record.fields.items())]
    if record.suppressed:
        parts.append(f"suppressed={record.suppressed}")
    line = " ".join(part for part in parts if part).replace("\n", " ")
    try:
        print(f"<{_PREFIXES.get(record.level, 6)}>{line}", file=sys.stderr, flush=True)
        if record.traceback:
            print(record.traceback, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        return False
    return True
