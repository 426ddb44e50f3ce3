"""A module's description, read from its methods' annotations: what READY announces.

Each callable method is described by its parameters (name, JSON Schema of the
annotated type, default, whether it is a Buffer), the JSON Schema of its
result and its docstring. Schemas come from ``msgspec.json.schema_components``
(attrs classes, msgspec Structs, dataclasses, enums, Optional, Mapping...);
every named type is defined once, in the module's ``types`` (the ``$defs`` the
schemas refer to as ``#/$defs/Name``). A type msgspec cannot describe is
described as ``{}`` (anything), so an exotic annotation costs a client its
check, never the module its start.

Built once per class (ipad/worker/host.py ``method_specs``; the fork server
builds the tables of the modules it preloads). No trio here: workers import it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from ipad.protocol import wire as p

#: Where a schema refers to a named type: ``#/$defs/Name``, the name a key of ``types``.
REF_TEMPLATE = "#/$defs/{name}"


class Signature:
    """What describing one method needs: read by ``Method`` from its signature and hints."""

    def __init__(
        self,
        function: Callable[..., Any],
        hints: Mapping[str, Any],
        buffers: Sequence[str],
    ) -> None:
        self.doc = inspect.getdoc(function) or ""
        self.result: Any = hints.get("return", Any)
        self.params: list[tuple[str, Any, Any]] = []  # name, type, default (empty: none)
        self.buffers = frozenset(buffers)
        for param in list(inspect.signature(function).parameters.values())[1:]:  # skip self
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue  # a call names its arguments: *args/**kwargs take none of them
            self.params.append((param.name, hints.get(param.name, Any), param.default))


def describe(signatures: Mapping[str, Signature]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(methods, types)``: each method's description fields and the shared named types.

    ``methods`` maps a method name to ``{"params": (ParamSpec...), "result": schema,
    "doc": str}``, the optional fields of its MethodSpec.
    """
    wanted: list[Any] = []
    for sig in signatures.values():
        wanted.extend(hint for name, hint, _ in sig.params if name not in sig.buffers)
        wanted.append(sig.result)
    schemas, types = _schemas(wanted)
    out: dict[str, Any] = {}
    position = 0
    for method, sig in signatures.items():
        params = []
        for name, _, default in sig.params:
            required = default is inspect.Parameter.empty
            if name in sig.buffers:
                schema: dict[str, Any] = {}
            else:
                schema = schemas[position]
                position += 1
            params.append(
                p.ParamSpec(
                    name, schema, required=required,
                    default=None if required else _wire_default(default),
                    buffer=name in sig.buffers,
                )
            )  # fmt: skip
        out[method] = {"params": tuple(params), "result": schemas[position], "doc": sig.doc}
        position += 1
    return out, types


def _schemas(hints: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The schema of each hint and the named types they share; ``{}`` for any undescribable."""
    try:
        schemas, types = msgspec.json.schema_components(hints, ref_template=REF_TEMPLATE)
        return list(schemas), dict(types)
    except (TypeError, ValueError):
        pass  # one hint msgspec cannot describe: find it, one hint at a time
    out: list[dict[str, Any]] = []
    types = {}
    for hint in hints:
        try:
            (schema,), more = msgspec.json.schema_components([hint], ref_template=REF_TEMPLATE)
        except (TypeError, ValueError):
            schema, more = {}, {}
        out.append(schema)
        types.update(more)
    return out, types


def _wire_default(value: Any) -> Any:
    """A default as msgpack carries it; one it cannot carry (any object) is described as nil."""
    try:
        return msgspec.to_builtins(value)
    except (TypeError, ValueError):
        return None
