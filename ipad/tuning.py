"""Reading a module's tuning data: a schema, defaults, and errors that name the key.

Every IPA module may import this, sandboxed or not: it lives in the ``ipad``
package, which every worker sees (docs/modules.md, "Tuning files"). Like
``ipad.ipa`` it imports nothing slow (no attrs, no pathlib), so a worker still
starts in tens of milliseconds; an attrs class given as a schema is read
through its ``__attrs_attrs__``, without importing attrs.

``context.tuning`` is the parsed tuning TOML file. A module reads it once per
instance with :func:`read_tuning` and one of two kinds of schema:

- a mapping of key to :class:`Number` or :class:`Text` (default and range),
  which gives back a dict with every key, defaults filled in;
- a class (attrs, dataclass or msgspec Struct) whose fields are the keys, with
  their types, defaults and validators, which gives back an instance. Tables
  become nested classes.

Either way an unknown key (with the closest known one suggested), a value of
the wrong type or one out of range raises :class:`TuningError`, whose message
and ``key`` name the key, so a typo never silently leaves a default in force.
The worker host builds one probe instance when it loads a module, so such a
tuning file fails the worker's start with that message.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, overload

import msgspec

#: How close a misspelt tuning key must be to a known one to be suggested (difflib ratio).
SUGGESTION_CUTOFF = 0.6

T = TypeVar("T")


class TuningError(ValueError):
    """A module's tuning data is unusable; the message names the key, as does ``key``."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        #: The key at fault, dotted for a nested table (``lens.steps``); None if not one key.
        self.key = key


class Key:
    """One key of a mapping schema: its default (Number and Text are the kinds)."""

    __slots__ = ("default",)

    def __init__(self, default: Any) -> None:
        self.default = default

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self._names()
        )

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in self._names()))

    def _names(self) -> tuple[str, ...]:
        return tuple(n for cls in type(self).__mro__ for n in getattr(cls, "__slots__", ()))


class Number(Key):
    """A numeric tuning key: its default and the range it must lie in.

    TOML integers are accepted as well as floats; booleans are not numbers here.
    ``low_open`` and ``high_open`` exclude the bound itself from the range.
    """

    __slots__ = ("high", "high_open", "low", "low_open")

    def __init__(
        self,
        default: float,
        low: float = -math.inf,
        high: float = math.inf,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        super().__init__(default)
        self.low = low
        self.high = high
        self.low_open = low_open
        self.high_open = high_open

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """The range in interval notation, such as ``(0, 1]``."""
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"


class Text(Key):
    """A string tuning key and its default."""

    __slots__ = ()

    def __init__(self, default: str) -> None:
        super().__init__(default)


#: A mapping schema: each key and its kind.
Schema = Mapping[str, Key]


@overload
def read_tuning(tuning: Mapping[str, Any], schema: type[T]) -> T: ...
@overload
def read_tuning(tuning: Mapping[str, Any], schema: Schema) -> dict[str, Any]: ...
def read_tuning(tuning: Mapping[str, Any], schema: Schema | type[T]) -> dict[str, Any] | T:
    """Check ``tuning`` against ``schema``; every key's value, defaults filled in.

    ``schema`` is a mapping of key to Number or Text (a dict comes back), or an
    attrs class, dataclass or msgspec Struct (an instance comes back). Raise
    TuningError naming the key on the first unknown key (suggesting the closest
    known one), value of the wrong type, or value out of range.
    """
    if isinstance(schema, Mapping):
        return _read_keys(tuning, schema)
    if isinstance(schema, type) and _fields(schema) is not None:
        return _read_class(tuning, schema, "")
    raise TypeError(
        f"schema {schema!r} is neither a mapping of Number/Text nor an attrs class, "
        "dataclass or msgspec Struct"
    )


def _read_keys(tuning: Mapping[str, Any], keys: Schema) -> dict[str, Any]:
    """A mapping schema: check every key, return a dict with the defaults filled in."""
    _check_known(tuning, list(keys), "")
    values: dict[str, Any] = {}
    for key, spec in keys.items():
        value = tuning.get(key, spec.default)
        if not isinstance(spec, Number | Text):
            raise TypeError(f"tuning key {key!r}: {spec!r} is not a Number or a Text")
        if isinstance(spec, Text):
            if not isinstance(value, str):
                raise TuningError(f"tuning key {key!r}: got {value!r}; expected a string", key)
            values[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TuningError(f"tuning key {key!r}: got {value!r}; expected a number", key)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isnan(number) or not spec.contains(number):
            raise TuningError(
                f"tuning key {key!r}: {value!r} is out of range; expected {spec.describe()}", key
            )
        values[key] = number
    return values


def _check_known(tuning: Mapping[str, Any], known: list[str], prefix: str) -> None:
    """TuningError for the first key of ``tuning`` not in ``known``, with a suggestion."""
    for key in tuning:
        if key not in known:
            import difflib  # noqa: PLC0415 - only on the error path: workers start fast

            close = difflib.get_close_matches(str(key), known, n=1, cutoff=SUGGESTION_CUTOFF)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            names = ", ".join(prefix + k for k in known) or "none"
            raise TuningError(
                f"unknown tuning key {prefix + str(key)!r}{hint}; known keys: {names}",
                prefix + str(key),
            )


def _fields(cls: type) -> dict[str, Any] | None:
    """A schema class's keys and, for attrs, each key's Attribute (its validator); else None."""
    attributes = getattr(cls, "__attrs_attrs__", None)
    if attributes is not None:
        # A private attribute ``_x`` is ``x`` in __init__ (its alias), and so in the file.
        return {getattr(a, "alias", None) or a.name: a for a in attributes if a.init}
    dataclass_fields = getattr(cls, "__dataclass_fields__", None)
    if dataclass_fields is not None:
        return {name: None for name, field in dataclass_fields.items() if field.init}
    struct_fields = getattr(cls, "__struct_fields__", None)
    if struct_fields is not None:
        return dict.fromkeys(struct_fields)
    return None


def _read_class(tuning: Any, cls: type[T], prefix: str) -> T:
    """A class schema: convert each key to its field's type, run its validator, build one."""
    where = f"tuning table {prefix[:-1]!r}" if prefix else "tuning data"
    if not isinstance(tuning, Mapping):
        raise TuningError(f"{where}: got {tuning!r}; expected a table", prefix[:-1] or None)
    fields = _fields(cls)
    assert fields is not None  # noqa: S101 - callers checked
    _check_known(tuning, list(fields), prefix)
    hints = typing.get_type_hints(cls, include_extras=True)  # msgspec.Meta constraints stay
    values: dict[str, Any] = {}
    for name, raw in tuning.items():
        key = prefix + name
        attribute = fields[name]
        hint = hints.get(str(getattr(attribute, "name", name)), Any)
        if isinstance(hint, type) and _fields(hint) is not None:
            values[name] = _read_class(raw, hint, key + ".")
        else:
            try:
                values[name] = msgspec.convert(raw, hint)
            except msgspec.ValidationError as exc:
                text = str(exc)
                path = text.rpartition(" - at `$")
                if path[1]:  # inside a list or a plain dict: the place msgspec found it
                    text, key = path[0], key + path[2].rstrip("`")
                raise TuningError(f"tuning key {key!r}: {text}", key) from None
        validator = getattr(attribute, "validator", None)
        if validator is not None:
            try:
                validator(None, attribute, values[name])
            except (ValueError, TypeError) as exc:
                raise TuningError(f"tuning key {key!r}: {exc}", key) from None
            except Exception:  # noqa: BLE001, S110 - one that needs the instance runs again below
                pass
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:  # a check across keys (__attrs_post_init__)
        raise TuningError(f"{where}: {exc}", prefix[:-1] or None) from None
