"""Bounds on what a worker controls, applied where the daemon receives it.

A worker's module is untrusted: every string it sends on its control socket
(READY's version and method names, an ERROR's message and details, an
INSTANCE_CLOSED's reason) is cut to a documented length (docs/protocol.md)
before the daemon stores, logs or forwards it, so nothing it says can make a
reply or an event the daemon builds exceed the packet limit. And the daemon's
replies that list every module (STATUS_REPLY, MODULES) are made to fit the
packet limit whatever was stored, degrading per entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ipad.protocol import wire as p

#: A module's version as its worker reports it in READY.
MAX_VERSION = 64
#: A method name in READY (and ``undoes``), an error code.
MAX_NAME = 128
#: Methods one READY may announce: PROXY_GRANTED carries them all to every client.
MAX_METHODS = 256
#: An ERROR's message, an INSTANCE_CLOSED's reason, a load failure's text.
MAX_TEXT = 2048
#: An ERROR's ``details``, msgpack-encoded; larger ones are replaced by a note of their size.
MAX_DETAILS = 4096

#: One module's entry of STATUS_REPLY or MODULES once degraded: strings cut to this.
DEGRADED_TEXT = 200

_ENCODER = msgspec.msgpack.Encoder()


def cap(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` characters, else its start and a marked truncation."""
    if len(text) <= limit:
        return text
    dropped = len(text.encode("utf-8", "replace")) - len(text[:limit].encode("utf-8", "replace"))
    return f"{text[:limit]}…[truncated {dropped} bytes]"


def cap_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """``details`` if their encoding fits MAX_DETAILS, else a note of how big they were."""
    size = len(_ENCODER.encode(details))
    if size <= MAX_DETAILS:
        return dict(details)
    return {"truncated": f"details of {size} bytes dropped (more than {MAX_DETAILS})"}


def bound_worker_message(message: p.Message) -> p.Message:
    """A message from a worker's control socket with every string it controls capped.

    A READY whose methods list is too long to forward is turned into the ERROR
    a failed LOAD sends: a module cannot be served without its method list.
    """
    if isinstance(message, p.Ready):
        if len(message.methods) > MAX_METHODS:
            return p.Error(
                p.ErrorCode.MODULE_ERROR,
                f"READY announced {len(message.methods)} methods, more than {MAX_METHODS}",
            )
        methods = tuple(_bound_method(m) for m in message.methods)
        return msgspec.structs.replace(
            message,
            module=cap(message.module, MAX_NAME),
            version=cap(message.version, MAX_VERSION),
            methods=methods if methods != message.methods else message.methods,
            minor=p.agreed_minor(message.minor),
        )
    if isinstance(message, p.Error):
        return p.Error(
            cap(message.code, MAX_NAME), cap(message.message, MAX_TEXT),
            cap_details(message.details) if message.details else {},
        )  # fmt: skip
    if isinstance(message, p.InstanceClosed):
        if len(message.reason) <= MAX_TEXT:
            return message
        return p.InstanceClosed(message.instance_id, cap(message.reason, MAX_TEXT))
    return message


def _bound_method(method: p.MethodSpec) -> p.MethodSpec:
    if len(method.name) <= MAX_NAME and (method.undoes is None or len(method.undoes) <= MAX_NAME):
        return method
    undoes = cap(method.undoes, MAX_NAME) if method.undoes is not None else None
    return p.MethodSpec(cap(method.name, MAX_NAME), method.setup, undoes)


def fit_entries(
    build: Callable[[dict[str, dict[str, Any]]], p.Message],
    entries: dict[str, dict[str, Any]],
) -> p.Message:
    """``build(entries)``, degraded until its payload fits the packet limit.

    First as it is; then with each entry's strings cut and nested values
    summarised (``"degraded": true``); then keeping only each entry's state;
    then with entries left out, the count of them in ``"…omitted"``. Names are
    the configuration's own (a module name is short), so the last step always fits.
    """
    message = build(entries)
    if _fits(message):
        return message
    for degrade in (_degraded, _minimal):
        entries = {name: degrade(entry) for name, entry in entries.items()}
        message = build(entries)
        if _fits(message):
            return message
    names = list(entries)
    while names:
        half = names[: len(names) // 2]
        kept = {name: entries[name] for name in half}
        omitted = len(entries) - len(kept)
        message = build({**kept, "…omitted": {"count": omitted, "degraded": True}})
        if _fits(message):
            return message
        names = half
    return build({"…omitted": {"count": len(entries), "degraded": True}})


def _fits(message: p.Message) -> bool:
    return len(_ENCODER.encode(message)) <= p.MAX_PAYLOAD


def _degraded(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"degraded": True}
    for key, value in entry.items():
        if isinstance(value, str):
            out[key] = cap(value, DEGRADED_TEXT)
        elif isinstance(value, (dict, list, tuple)):
            out[key] = f"({len(value)} items left out to fit the packet limit)"
        else:
            out[key] = value
    return out


def _minimal(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "degraded": True,
        **{k: entry[k] for k in ("state", "valid", "worker_pid", "version") if k in entry},
    }
