"""Python's ``logging`` into the daemon's log: a root handler that sends MODULE_LOG records.

Imported only once the module (or a library it uses) imported ``logging``:
``logging`` brings threading, which a worker does not load otherwise.
"""

from __future__ import annotations

import logging
import traceback
from typing import TYPE_CHECKING

from ipad.protocol import modlog as b

if TYPE_CHECKING:  # imported by it, lazily: no cycle
    from ipad.worker.modlog import LogSender


class DaemonHandler(logging.Handler):
    """Each record at its own level, with its logger's name and where it was made."""

    def __init__(self, sender: LogSender) -> None:
        super().__init__(logging.NOTSET)
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        """Send ``record``; a record that cannot be formatted is sent as its raw message."""
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the module's, not ours
            text = f"{record.msg!r} {record.args!r}"
        tb = ""
        if record.exc_info and record.exc_info[1] is not None:
            tb = "".join(traceback.format_exception(record.exc_info[1])).rstrip()
        elif record.stack_info:
            tb = record.stack_info
        level = logging.getLevelName(record.levelno).lower()
        if level not in b.LEVEL_NUMBERS:  # a custom level: the nearest standard one below
            level = max((n for n in b.LEVELS if b.LEVEL_NUMBERS[n] <= record.levelno),
                        key=b.LEVEL_NUMBERS.__getitem__, default="debug")  # fmt: skip
        where = {"where": f"{record.filename}:{record.lineno}"}
        self.sender.log(level, text, where, instance_id=self.sender.instance_id,
                        logger=record.name, traceback=tb)  # fmt: skip


def install(sender: LogSender) -> None:
    """Put the handler on the root logger, which passes the daemon's level and up."""
    root = logging.getLogger()
    if not any(isinstance(handler, DaemonHandler) for handler in root.handlers):
        root.addHandler(DaemonHandler(sender))
    # The root's default, WARNING, would drop info records before they reach the handler.
    root.setLevel(max(sender.threshold, logging.DEBUG))
