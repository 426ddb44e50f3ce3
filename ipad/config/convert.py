"""The one cattrs converter for user-written files, and how its failures become Problems.

The converter is strict where cattrs is lenient by default: ``enabled = 1`` or
``port = "80"`` are type errors, not silently coerced values, and unknown keys
are errors with a suggestion. Wire messages do not go through here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from ipad.config.duration import DURATION_EXPECTED, Duration
from ipad.config.problems import Problem, did_you_mean, join_key
from ipad.config.size import SIZE_EXPECTED, Size

T = TypeVar("T")


class Mismatch(ValueError):
    """A value of the wrong type or form; ``expected`` says what would have been right."""

    def __init__(self, message: str, expected: str) -> None:
        super().__init__(message)
        self.message = message
        self.expected = expected


def _toml_type(value: object) -> str:
    """Name a parsed TOML value's type the way the TOML spec does."""
    names: dict[type, str] = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    for kind, name in names.items():
        if type(value) is kind:
            return name
    return type(value).__name__


def _strict(kind: type[Any], expected: str) -> Callable[[object, type], Any]:
    def hook(value: object, _: type) -> Any:
        # bool is an int subclass in Python but not in TOML.
        if type(value) is kind or (kind is float and type(value) is int):
            return kind(value)
        raise Mismatch(f"got {_toml_type(value)} {value!r}", expected)

    return hook


def _parsed(parse: Callable[[str], T], expected: str) -> Callable[[object, type], T]:
    """A hook for values written as strings and parsed (durations, sizes)."""

    def hook(value: object, _: type) -> T:
        if not isinstance(value, str):
            raise Mismatch(f"got {_toml_type(value)} {value!r}", expected)
        try:
            return parse(value)
        except ValueError as exc:
            raise Mismatch(str(exc), expected) from None

    return hook


def _structure_path(value: object, _: type) -> Path:
    if not isinstance(value, str) or not value:
        raise Mismatch(f"got {_toml_type(value)} {value!r}", "a non-empty path string")
    return Path(value)


def _enum_hook(cl: type[enum.Enum]) -> Callable[[object, type], enum.Enum]:
    choices = ", ".join(repr(m.value) for m in cl)

    def hook(value: object, _: type) -> enum.Enum:
        try:
            return cl(value)
        except ValueError:
            raise Mismatch(f"got {value!r}", f"one of {choices}") from None

    return hook


def _sequence_hook(converter: cattrs.Converter, cl: Any) -> Callable[[object, type], Any]:
    (item_type, *_) = cl.__args__
    inner = converter.get_structure_hook(list[item_type])  # type: ignore[valid-type]

    def hook(value: object, _: type) -> Any:
        if not isinstance(value, list):
            raise Mismatch(f"got {_toml_type(value)} {value!r}", "an array")
        return tuple(inner(value, list[item_type]))  # type: ignore[valid-type]

    return hook


def _mapping_hook(converter: cattrs.Converter, cl: Any) -> Callable[[object, type], Any]:
    generic = converter.gen_structure_mapping(cl)

    def hook(value: object, _: type) -> Any:
        if not isinstance(value, dict):
            raise Mismatch(f"got {_toml_type(value)} {value!r}", "a table")
        return generic(value, cl)

    return hook


def _attrs_hook(converter: cattrs.Converter, cl: type) -> Callable[[object, type], Any]:
    generated: Callable[[Any, type], Any] = make_dict_structure_fn(
        cl, converter, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True
    )

    def hook(value: object, _: type) -> Any:
        if not isinstance(value, dict):
            raise Mismatch(f"got {_toml_type(value)} {value!r}", "a table")
        return generated(value, cl)

    return hook


def make_converter() -> cattrs.Converter:
    """Build the strict converter shared by configuration and manifest loading."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(bool, _strict(bool, "true or false"))
    converter.register_structure_hook(int, _strict(int, "an integer"))
    converter.register_structure_hook(float, _strict(float, "a number"))
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(Duration, _parsed(Duration.parse, DURATION_EXPECTED))
    converter.register_structure_hook(Size, _parsed(Size.parse, SIZE_EXPECTED))
    converter.register_structure_hook(Path, _structure_path)
    converter.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, enum.Enum), lambda v, t: _enum_hook(t)(v, t)
    )
    converter.register_structure_hook_factory(
        lambda t: getattr(t, "__origin__", None) is tuple,
        lambda t: _sequence_hook(converter, t),
    )
    converter.register_structure_hook_factory(
        lambda t: getattr(t, "__origin__", None) is dict,
        lambda t: _mapping_hook(converter, t),
    )
    converter.register_structure_hook_factory(attrs.has, lambda t: _attrs_hook(converter, t))
    return converter


CONVERTER = make_converter()


def structure(
    data: object, cl: type[T], file: Path, root: str = ""
) -> tuple[T | None, list[Problem]]:
    """Structure ``data`` as ``cl``; on failure return None and every problem found."""
    try:
        return CONVERTER.structure(data, cl), []
    except Exception as exc:  # noqa: BLE001 - every failure becomes a Problem naming its key
        return None, list(problems_from(exc, file, root))


def problems_from(exc: BaseException, file: Path, key: str) -> Iterator[Problem]:
    """Flatten a cattrs exception tree into Problems with dotted key paths."""
    if isinstance(exc, BaseValidationError):
        for sub in exc.exceptions:
            yield from problems_from(sub, file, _extend(key, sub))
    elif isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)]
        for extra in sorted(exc.extra_fields):
            suggestion = did_you_mean(extra, known)
            hint = (
                f"did you mean {suggestion!r}?" if suggestion else "known keys: " + ", ".join(known)
            )
            yield Problem(file, join_key(key, extra), "unknown key", hint)
    elif isinstance(exc, Mismatch):
        yield Problem(file, key or "(top level)", exc.message, exc.expected)
    elif isinstance(exc, KeyError):
        yield Problem(file, key, "missing required key")
    else:
        yield Problem(file, key or "(top level)", str(exc) or type(exc).__name__)


def _extend(key: str, exc: BaseException) -> str:
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            return join_key(key, note.name)
        if isinstance(note, IterableValidationNote):
            index = note.index
            return join_key(key, index if isinstance(index, int) else str(index))
    return key
