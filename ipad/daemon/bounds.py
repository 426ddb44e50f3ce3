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
import structlog

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

#: A method's docstring in READY (cut, not refused).
MAX_DOC = 4096
#: Parameters one described method may have.
MAX_PARAMS = 64
#: Nesting of one JSON Schema (objects and arrays, counted from the schema itself).
MAX_SCHEMA_DEPTH = 16
#: Objects, arrays and scalars in all of one READY's schemas and types together.
MAX_SCHEMA_NODES = 8192
#: A module's whole description (methods' params, results and docs, and types), msgpack-encoded:
#: PROXY_GRANTED carries it to every client, so it must leave room in the packet limit.
MAX_DESCRIPTION = 64 * 1024

_ENCODER = msgspec.msgpack.Encoder()
log = structlog.get_logger("ipad")

#: The last description each module's worker sent that passed the bounds (``MAX_KEPT`` modules).
_KEPT: dict[str, tuple[tuple[p.MethodSpec, ...], dict[str, Any]]] = {}
MAX_KEPT = 1024


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
        types = message.types
        module = cap(message.module, MAX_NAME)
        # Every worker of a module says the same: judged once (a restart pays a comparison).
        known = _KEPT.get(module)
        same = known is not None and known == (methods, types)
        problem = None if same else description_problem(methods, types)
        if problem is None and not same:
            if len(_KEPT) >= MAX_KEPT:
                _KEPT.pop(next(iter(_KEPT)))
            _KEPT[module] = (methods, types)
        if problem is not None:
            log.warning("worker.description_dropped", module=module, reason=problem)
            methods = tuple(_undescribed(m) for m in methods)
            types = {}
        return msgspec.structs.replace(
            message,
            module=module,
            version=cap(message.version, MAX_VERSION),
            methods=methods if methods != message.methods else message.methods,
            minor=p.agreed_minor(message.minor),
            types=types,
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
    if (
        len(method.name) <= MAX_NAME
        and (method.undoes is None or len(method.undoes) <= MAX_NAME)
        and len(method.doc) <= MAX_DOC
    ):
        return method
    undoes = cap(method.undoes, MAX_NAME) if method.undoes is not None else None
    return msgspec.structs.replace(
        method, name=cap(method.name, MAX_NAME), undoes=undoes, doc=cap(method.doc, MAX_DOC)
    )


def _undescribed(method: p.MethodSpec) -> p.MethodSpec:
    return p.MethodSpec(method.name, method.setup, method.undoes, doc=method.doc)


def description_problem(methods: tuple[p.MethodSpec, ...], types: dict[str, Any]) -> str | None:
    """Why a READY's description cannot be kept (None: it can), its docs already capped.

    A module is untrusted: its description is judged by shape (parameter count
    and names, schema nesting and size), never believed. One that breaks a
    bound is dropped whole, so its clients check nothing before sending, and
    the worker still checks every call.
    """
    budget = _Budget()
    try:
        for name, schema in types.items():
            if len(name) > MAX_NAME:
                return f"a type name of {len(name)} characters (at most {MAX_NAME})"
            budget.walk(schema)
        for method in methods:
            for param in method.params or ():
                if len(method.params or ()) > MAX_PARAMS:
                    return f"{method.name}() has more than {MAX_PARAMS} parameters"
                if len(param.name) > MAX_NAME:
                    return f"{method.name}() has a parameter name longer than {MAX_NAME}"
                budget.walk(param.schema)
                budget.walk(param.default)
            budget.walk(method.result)
    except _OverBudget as exc:
        return str(exc)
    size = len(_ENCODER.encode((methods, types)))
    if size > MAX_DESCRIPTION:
        return f"a description of {size} bytes (at most {MAX_DESCRIPTION})"
    return None


class _OverBudget(Exception):
    """A description breaks a shape bound; the message says which."""


class _Budget:
    """Counts the values of a READY's schemas, and stops the walk at the first bound broken.

    Iterative, so a hostile schema costs the daemon at most MAX_SCHEMA_NODES
    steps and no recursion.
    """

    def __init__(self) -> None:
        self.nodes = 0

    def walk(self, value: Any) -> None:
        stack: list[tuple[Any, int]] = [(value, 0)]
        while stack:
            item, depth = stack.pop()
            self.nodes += 1
            if self.nodes > MAX_SCHEMA_NODES:
                raise _OverBudget(f"schemas of more than {MAX_SCHEMA_NODES} values")
            if depth > MAX_SCHEMA_DEPTH:
                raise _OverBudget(f"a schema nested more than {MAX_SCHEMA_DEPTH} deep")
            if isinstance(item, dict):
                stack.extend((v, depth + 1) for v in item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend((v, depth + 1) for v in item)


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
