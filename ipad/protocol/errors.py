"""Errors a client sees: one exception class per error code, all under IpadError."""

from __future__ import annotations

import re
from typing import Any

from ipad.protocol import wire as p


class IpadError(Exception):
    """An error reply from the daemon or a worker, or a connection that ended."""

    code: str = p.ErrorCode.INTERNAL.value

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class UnsupportedVersion(IpadError):
    """The daemon does not speak any protocol version this client does."""

    code = p.ErrorCode.UNSUPPORTED_VERSION.value


class UnknownModule(IpadError):
    """No enabled module by that name."""

    code = p.ErrorCode.UNKNOWN_MODULE.value


class UnknownProxy(IpadError):
    """No such proxy on this connection."""

    code = p.ErrorCode.UNKNOWN_PROXY.value


class UnknownMethod(IpadError):
    """The module has no such method."""

    code = p.ErrorCode.UNKNOWN_METHOD.value


class BadArguments(IpadError):
    """The arguments do not fit the method's signature or types."""

    code = p.ErrorCode.BAD_ARGUMENTS.value


class ModuleError(IpadError):
    """The module method raised; ``details['traceback']`` has the worker's short traceback.

    Its text says where: ``division by zero (ZeroDivisionError at awb.py:42 in process)``,
    from ``details['exception']`` and ``details['where']`` (or the traceback's last frame);
    the traceback is its note, printed below the client's when nobody catches it.
    """

    code = p.ErrorCode.MODULE_ERROR.value

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)
        tb = self.details.get("traceback")
        if isinstance(tb, str) and tb:
            # Shown under the client's own traceback when nobody catches it (PEP 678).
            self.add_note(f"The module's traceback, in its worker:\n{tb}")

    def __str__(self) -> str:
        details = self.details if isinstance(self.details, dict) else {}
        kind = details.get("exception")
        where = details.get("where") or _last_frame(details.get("traceback"))
        said = [str(part) for part in (kind, where) if isinstance(part, str) and part]
        return f"{self.message} ({' at '.join(said)})" if said else self.message


#: A traceback line naming a frame: ``  File "/path/awb.py", line 42, in process``.
_FRAME = re.compile(r'^\s*File "(?:.*/)?([^"/]+)", line (\d+), in (\S+)', re.MULTILINE)


def _last_frame(traceback: object) -> str:
    """``awb.py:42 in process`` from a formatted traceback's innermost frame, or ""."""
    if not isinstance(traceback, str):
        return ""
    frames = _FRAME.findall(traceback[-8192:])
    if not frames:
        return ""
    name, line, function = frames[-1]
    return f"{name}:{line} in {function}"


class ModuleUnavailable(IpadError):
    """The module's worker is not running, so no proxy can be made now."""

    code = p.ErrorCode.MODULE_UNAVAILABLE.value


class PipelineMismatch(IpadError):
    """The module does not support the requested pipeline handler or version."""

    code = p.ErrorCode.PIPELINE_MISMATCH.value


class WorkerCrashed(IpadError):
    """The proxy's worker died while the call was in flight, or before it was made."""

    code = p.ErrorCode.WORKER_CRASHED.value


class CallNotSent(WorkerCrashed):
    """The call never reached a worker: its proxy could not be brought back (in time).

    Unlike a crash during the call, nothing ran. ``message`` says why (the
    worker's end, the module's cooldown, a proxy the daemon closed),
    ``details`` has the daemon's account (``state``, ``reason``, and
    ``cooldown_interval`` in cooldown) and ``__cause__`` its error, if any.
    """


class BadMessage(IpadError):
    """The peer judged a message malformed."""

    code = p.ErrorCode.BAD_MESSAGE.value


class UnknownCommand(IpadError):
    """The daemon has no such admin command."""

    code = p.ErrorCode.UNKNOWN_COMMAND.value


class InvalidConfig(IpadError):
    """A reload found the new configuration invalid; ``details['problems']`` lists why."""

    code = p.ErrorCode.INVALID_CONFIG.value


class PermissionDenied(IpadError):
    """The daemon's access policy does not let this client's user do that."""

    code = p.ErrorCode.PERMISSION_DENIED.value


class LimitExceeded(IpadError):
    """The request would pass one of the daemon's per-client limits (``details['limit']``)."""

    code = p.ErrorCode.LIMIT_EXCEEDED.value


class TimedOut(IpadError, TimeoutError):
    """The caller's ``timeout`` passed first, counted over the whole call, recovery included.

    A TimeoutError too, for code that catches that. ``details['sent']`` says
    whether the call had reached the worker (it may then have run).
    """

    code = "timed_out"


class Disconnected(IpadError):
    """The daemon closed the connection; ``message`` is its reason when it gave one."""

    code = "disconnected"


_BY_CODE: dict[str, type[IpadError]] = {
    cls.code: cls
    for cls in (
        UnsupportedVersion, UnknownModule, UnknownProxy, UnknownMethod, BadArguments,
        ModuleError, ModuleUnavailable, PipelineMismatch, WorkerCrashed, BadMessage,
        UnknownCommand, InvalidConfig, PermissionDenied, LimitExceeded,
    )
}  # fmt: skip


def error_from_reply(error: p.Error) -> IpadError:
    """The exception for an error reply; unknown codes become a plain IpadError."""
    cls = _BY_CODE.get(error.code, IpadError)
    exc = cls(error.message, dict(error.details))
    exc.code = error.code
    return exc
