"""A module's description as the clients use it, sans I/O: arguments checked, results typed.

PROXY_GRANTED (and DESCRIPTION) carry each method's parameters and result as
JSON Schema (ipad/worker/describe.py made them; docs/protocol.md says which
subset). Before a call is sent, its arguments are checked against them: an
unknown or missing parameter, or a value of the wrong type, fails the call
with BadArguments naming the parameter, with no round trip. A result that
the schema says is an object comes back as a Record: a dict (so ``r["gain"]``,
``r == {...}`` and msgpack encoding keep working) with attribute access
(``r.gain``), whose class is named after the module's type (``AwbResult``).

The description comes from an untrusted module: nothing here trusts it beyond
what it costs to be wrong. A schema this code cannot read checks nothing (the
worker checks every call anyway), checking and converting stop at a depth,
and a module that describes itself falsely only makes its own calls fail.
Imports no trio: the blocking client uses it.
"""

from __future__ import annotations

import datetime
import decimal
import keyword
import math
import operator
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ipad.protocol import wire as p
from ipad.protocol.errors import BadArguments, UnknownMethod

#: How deep a value is checked or converted; deeper, it is taken as it is.
MAX_DEPTH = 32
#: Descriptions kept across grants (one per module and version, checked equal before use).
CACHE_SIZE = 64

Check = Callable[[Any, int], str | None]
Convert = Callable[[Any, int], Any]

#: Python types of each JSON Schema type (bool is not an integer or a number here).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "null": (type(None),),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "array": (list, tuple),
    "object": (dict, Mapping),
}
#: Argument values checked as they are; any other (containers too) first as msgpack carries it.
_SCALAR = (type(None), bool, int, float, str, bytes, bytearray)
#: Values msgspec describes as strings (datetime is ``{"type": "string"}``, without a format)
#: but msgpack carries as themselves: accepted where a string is, the worker has the last word.
_STRING_LIKE = (
    datetime.datetime, datetime.date, datetime.time, datetime.timedelta, uuid.UUID,
    decimal.Decimal,
)  # fmt: skip


class Record(dict[str, Any]):
    """A result object: a plain dict that also reads its keys as attributes."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


def _accept(value: Any, depth: int) -> str | None:
    return None


def _same(value: Any, depth: int) -> Any:
    return value


class Description:
    """One module's described methods, compiled lazily into argument checks and result types."""

    def __init__(self, methods: tuple[p.MethodSpec, ...], types: Mapping[str, Any]) -> None:
        self.methods = methods
        self.types = types
        self.specs = {m.name: m for m in methods}
        #: Whether the module described itself (an older worker, or a dropped description: no).
        self.described = bool(methods) and all(m.params is not None for m in methods)
        self._checks: dict[str, dict[str, Check]] = {}
        self._results: dict[str, Convert] = {}
        self._ref_checks: dict[str, Check] = {}
        self._ref_converts: dict[str, Convert] = {}
        self._records: dict[str, type[Record]] = {}

    # --- checking arguments ------------------------------------------------------------

    def check(
        self,
        module: str,
        method: str,
        args: Mapping[str, Any] | None,
        fds: Mapping[str, Any] | None,
    ) -> None:
        """Raise UnknownMethod or BadArguments, naming the parameter, if the call cannot fit."""
        if not self.described:
            return
        spec = self.specs.get(method)
        if spec is None:
            known = ", ".join(sorted(self.specs))
            raise UnknownMethod(f"{module} has no method {method!r}; methods: {known}",
                                {"sent": False})  # fmt: skip
        params = spec.params or ()
        checks = self._checks.get(method)
        if checks is None:
            checks = self._checks[method] = {
                prm.name: self._compile(prm.schema) for prm in params if not prm.buffer
            }
        given = args or {}
        passed = fds or {}
        for name, value in given.items():
            check = checks.get(name)
            if check is None:
                if _is_buffer(spec, name):
                    raise _bad(method, name, "is a Buffer: pass it in fds")
                raise _bad(method, name, "", text=f"{method}() has no argument {name!r}")
            plain = value if type(value) in _SCALAR else _builtins(value)
            problem = check(plain, 0)
            if problem is not None:
                raise _bad(method, name, problem)
        for name in passed:
            if not _is_buffer(spec, name):
                raise _bad(method, name, "is not a Buffer: pass it in args")
        missing = [
            prm.name for prm in params
            if prm.required and prm.name not in given and prm.name not in passed
        ]  # fmt: skip
        if missing:
            text = f"{method}() is missing {', '.join(map(repr, missing))}"
            raise _bad(method, missing[0], "", text=text)

    def _compile(self, schema: Any) -> Check:
        try:
            return self._compile_schema(schema)
        except Exception:  # noqa: BLE001 - a schema we cannot read checks nothing
            return _accept

    def _compile_schema(self, schema: Any) -> Check:  # noqa: PLR0912 - one case per keyword
        if not isinstance(schema, Mapping) or not schema:
            return _accept
        checks: list[Check] = []
        ref = schema.get("$ref")
        if isinstance(ref, str):
            checks.append(self._ref_check(ref))
        any_of = schema.get("anyOf")
        if isinstance(any_of, list) and any_of:
            branches = [self._compile(s) for s in any_of]
            checks.append(lambda v, d: _any_of(branches, v, d))
        if "enum" in schema and isinstance(schema["enum"], list):
            allowed = list(schema["enum"])
            checks.append(lambda v, d: None if _member(v, allowed) else f"{v!r} is not one of "
                          f"{', '.join(map(repr, allowed[:10]))}")  # fmt: skip
        if "const" in schema:
            const = schema["const"]
            checks.append(lambda v, d: None if _member(v, [const]) else f"{v!r} is not {const!r}")
        kinds = schema.get("type")
        if isinstance(kinds, str):
            kinds = [kinds]
        if isinstance(kinds, list) and all(k in _JSON_TYPES for k in kinds):
            binary = "contentEncoding" in schema
            checks.append(_type_check(tuple(kinds), binary))
            if "object" in kinds:
                checks.append(self._object_check(schema))
            if "array" in kinds:
                checks.append(self._array_check(schema))
            if "integer" in kinds or "number" in kinds:
                checks.append(_range_check(schema))
            if "string" in kinds:
                checks.append(_length_check(schema))
        if not checks:
            return _accept
        if len(checks) == 1:
            return checks[0]

        def all_of(value: Any, depth: int) -> str | None:
            for check in checks:
                problem = check(value, depth)
                if problem is not None:
                    return problem
            return None

        return all_of

    def _ref_check(self, ref: str) -> Check:
        name = _ref_name(ref)
        checks = self._ref_checks

        def check(value: Any, depth: int) -> str | None:
            if depth > MAX_DEPTH or name is None:
                return None
            compiled = checks.get(name)
            if compiled is None:
                checks[name] = _accept  # a type that refers to itself: compiled once
                compiled = checks[name] = self._compile(self.types.get(name))
            return compiled(value, depth + 1)

        return check

    def _object_check(self, schema: Mapping[str, Any]) -> Check:
        properties = schema.get("properties")
        props = {
            str(k): self._compile(s) for k, s in (properties or {}).items()
        } if isinstance(properties, Mapping) else {}  # fmt: skip
        required = [r for r in schema.get("required") or () if isinstance(r, str)]
        extra = schema.get("additionalProperties", True)
        extra_check = self._compile(extra) if isinstance(extra, Mapping) else None

        def check(value: Any, depth: int) -> str | None:
            if not isinstance(value, Mapping) or depth > MAX_DEPTH:
                return None  # the type check said it already
            for key, item in value.items():
                sub = props.get(key)
                if sub is None:
                    if extra is False:
                        return f"unknown field {key!r}"
                    sub = extra_check
                if sub is not None:
                    problem = sub(item, depth + 1)
                    if problem is not None:
                        return f"field {key!r}: {problem}"
            for key in required:
                if key not in value:
                    return f"missing field {key!r}"
            return None

        return check

    def _array_check(self, schema: Mapping[str, Any]) -> Check:
        items = schema.get("items", True)
        item_check = self._compile(items) if isinstance(items, Mapping) else None
        prefix = schema.get("prefixItems")
        prefix_checks = [self._compile(s) for s in prefix] if isinstance(prefix, list) else []
        low, high = schema.get("minItems"), schema.get("maxItems")

        def check(value: Any, depth: int) -> str | None:
            if not isinstance(value, (list, tuple)) or depth > MAX_DEPTH:
                return None
            if isinstance(low, int) and len(value) < low:
                return f"{len(value)} items, fewer than {low}"
            if isinstance(high, int) and len(value) > high:
                return f"{len(value)} items, more than {high}"
            for index, item in enumerate(value):
                sub = prefix_checks[index] if index < len(prefix_checks) else item_check
                if sub is None:
                    if items is False:
                        return f"{len(value)} items, more than {len(prefix_checks)}"
                    continue
                problem = sub(item, depth + 1)
                if problem is not None:
                    return f"item {index}: {problem}"
            return None

        return check

    # --- typing results ------------------------------------------------------------------

    def typed(self, method: str, value: Any) -> Any:
        """The result ``value`` of ``method`` with its objects as Records, per the schema."""
        convert = self._results.get(method)
        if convert is None:
            spec = self.specs.get(method)
            schema = spec.result if spec is not None else None
            convert = self._results[method] = self._converter(schema)
        return convert(value, 0)

    def _converter(self, schema: Any) -> Convert:
        try:
            return self._converter_of(schema)
        except Exception:  # noqa: BLE001 - a schema we cannot read converts nothing
            return _same

    def _converter_of(self, schema: Any) -> Convert:  # noqa: PLR0911 - one case per keyword
        if not isinstance(schema, Mapping):
            return _same
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return self._ref_convert(ref)
        any_of = schema.get("anyOf")
        if isinstance(any_of, list):
            branches = [self._converter(s) for s in any_of]
            if all(b is _same for b in branches):
                return _same

            def first_object(value: Any, depth: int) -> Any:
                if isinstance(value, dict):
                    for branch in branches:
                        if branch is not _same:
                            return branch(value, depth)
                return value

            return first_object
        kind = schema.get("type")
        if kind == "object" or (kind is None and "properties" in schema):
            return self._object_converter(schema)
        if kind == "array":
            items = self._converter(schema.get("items"))
            if items is _same:
                return _same
            return lambda v, d: ([items(i, d + 1) for i in v]
                                 if isinstance(v, list) and d <= MAX_DEPTH else v)  # fmt: skip
        return _same

    def _ref_convert(self, ref: str) -> Convert:
        name = _ref_name(ref)
        converts = self._ref_converts

        def convert(value: Any, depth: int) -> Any:
            if depth > MAX_DEPTH or name is None:
                return value
            compiled = converts.get(name)
            if compiled is None:
                converts[name] = _same  # a type that refers to itself: compiled once
                compiled = converts[name] = self._converter(self.types.get(name))
            return compiled(value, depth + 1)

        return convert

    def _object_converter(self, schema: Mapping[str, Any]) -> Convert:
        record = self._record(schema.get("title"))
        properties = schema.get("properties")
        fields = {
            str(k): c for k, s in properties.items() if (c := self._converter(s)) is not _same
        } if isinstance(properties, Mapping) else {}  # fmt: skip

        def convert(value: Any, depth: int) -> Any:
            if not isinstance(value, dict):
                return value
            out = record(value)
            if depth <= MAX_DEPTH:
                for key, sub in fields.items():
                    if key in out:
                        out[key] = sub(out[key], depth + 1)
            return out

        return convert

    def _record(self, title: Any) -> type[Record]:
        name = title if isinstance(title, str) and title.isidentifier() else "Record"
        if keyword.iskeyword(name):
            name = "Record"
        name = name[:64]
        record = self._records.get(name)
        if record is None:
            record = self._records[name] = type(name, (Record,), {"__slots__": ()})
        return record


#: Descriptions by (module, version): a reopen or another proxy of the module reuses the
#: compiled checks when the description is the same.
_CACHE: dict[tuple[str, str], Description] = {}


def description_of(
    module: str, version: str, methods: tuple[p.MethodSpec, ...], types: Mapping[str, Any]
) -> Description:
    """The Description of these methods, compiled ones reused when nothing changed."""
    key = (module, version)
    known = _CACHE.get(key)
    if known is not None and known.methods == methods and known.types == types:
        return known
    if len(_CACHE) >= CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    description = _CACHE[key] = Description(methods, types)
    return description


def _bad(method: str, name: str, problem: str, text: str = "") -> BadArguments:
    """BadArguments naming the parameter; ``details["sent"]`` False: checked before sending."""
    return BadArguments(text or f"{method}() argument {name!r}: {problem}",
                        {"argument": name, "sent": False})  # fmt: skip


def _is_buffer(spec: p.MethodSpec, name: str) -> bool:
    return any(prm.name == name and prm.buffer for prm in spec.params or ())


def _builtins(value: Any) -> Any:
    """An argument as msgpack will carry it: attrs classes, Structs, enums (nested too) as plain.

    Values msgpack carries as themselves (bytes, datetimes...) stay as they are.
    """
    try:
        return msgspec.to_builtins(
            value, builtin_types=(bytes, bytearray, memoryview, *_STRING_LIKE)
        )
    except (TypeError, ValueError):
        return value  # the encoder will say what is wrong with it


def _ref_name(ref: str) -> str | None:
    prefix = "#/$defs/"
    return ref[len(prefix) :] if ref.startswith(prefix) else None


def _any_of(branches: list[Check], value: Any, depth: int) -> str | None:
    problems = []
    for branch in branches:
        problem = branch(value, depth)
        if problem is None:
            return None
        problems.append(problem)
    # A value of one branch's type is told that branch's problem, not every other type.
    closer = [text for text in problems if not text.startswith("expected ")]
    return " and ".join(dict.fromkeys(closer or problems))


def _member(value: Any, allowed: list[Any]) -> bool:
    return any(value == a and type(value) is type(a) for a in allowed) or (
        type(value) in (int, float) and any(
            type(a) in (int, float) and value == a for a in allowed
        )
    )  # fmt: skip


def _type_check(kinds: tuple[str, ...], binary: bool) -> Check:
    accepted = tuple(t for k in kinds for t in _JSON_TYPES[k])
    if binary:
        accepted += (bytes, bytearray, memoryview)
    if "string" in kinds:
        accepted += _STRING_LIKE
    wanted = " or ".join(
        {"null": "null", "boolean": "a boolean", "integer": "an integer", "number": "a number",
         "string": "a string", "array": "an array", "object": "an object"}[k]
        for k in kinds
    )  # fmt: skip

    def check(value: Any, depth: int) -> str | None:
        if isinstance(value, bool) and "boolean" not in kinds:
            return f"expected {wanted}, got a boolean"
        if isinstance(value, accepted):
            return None
        return f"expected {wanted}, got {type(value).__name__}"

    return check


def _range_check(schema: Mapping[str, Any]) -> Check:
    bounds: list[tuple[float, Callable[[float, float], bool], str]] = [
        (float(schema[key]), test, text)
        for key, test, text in (
            ("minimum", operator.ge, ">="), ("maximum", operator.le, "<="),
            ("exclusiveMinimum", operator.gt, ">"), ("exclusiveMaximum", operator.lt, "<"),
        )
        if isinstance(schema.get(key), (int, float))
    ]  # fmt: skip
    if not bounds:
        return _accept

    def check(value: Any, depth: int) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        for bound, test, text in bounds:
            if not test(value, bound):
                return f"{value!r} is not {text} {bound!r}"
        return None

    return check


def _length_check(schema: Mapping[str, Any]) -> Check:
    low, high = schema.get("minLength"), schema.get("maxLength")
    if not isinstance(low, int) and not isinstance(high, int):
        return _accept

    def check(value: Any, depth: int) -> str | None:
        if not isinstance(value, str):
            return None
        if isinstance(low, int) and len(value) < low:
            return f"{len(value)} characters, fewer than {low}"
        if isinstance(high, int) and len(value) > high:
            return f"{len(value)} characters, more than {high}"
        return None

    return check


def schema_text(schema: Any, depth: int = 0) -> str:  # noqa: PLR0911 - one case per keyword
    """A JSON Schema as a short type for people: ``integer``, ``SensorInfo | null``, ``[int]``."""
    if not isinstance(schema, Mapping) or not schema or depth > MAX_DEPTH:
        return "any"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _ref_name(ref) or ref
    if isinstance(schema.get("anyOf"), list):
        return " | ".join(schema_text(s, depth + 1) for s in schema["anyOf"])
    if isinstance(schema.get("enum"), list):
        return " | ".join(repr(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(schema_text({**schema, "type": k}, depth + 1) for k in kind)
    if kind == "array":
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return "(" + ", ".join(schema_text(s, depth + 1) for s in prefix) + ")"
        return f"[{schema_text(schema.get('items'), depth + 1)}]"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping) and "properties" not in schema:
            return f"{{string: {schema_text(extra, depth + 1)}}}"
        return "object"
    if kind == "string" and "contentEncoding" in schema:
        return "bytes"
    return str(kind) if isinstance(kind, str) else "any"
