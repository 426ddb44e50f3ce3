"""ipad.tuning, the public tuning helpers: schemas, defaults, and errors that name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Annotated

import attrs
import msgspec
import pytest

from ipad.tuning import Number, Text, TuningError, read_tuning


@attrs.frozen
class Lens:
    """A nested table of the tuning file."""

    steps: int = attrs.field(default=100, validator=attrs.validators.ge(1))


@attrs.frozen
class AfTuning:
    """An attrs schema: types, defaults and validators per key."""

    speed: float = attrs.field(
        default=0.5, validator=[attrs.validators.gt(0), attrs.validators.le(1)]
    )
    label: str = ""
    lens: Lens = attrs.field(factory=Lens)
    curve: tuple[float, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.label == "forbidden":
            raise ValueError("label 'forbidden' is reserved")


KEYS = {"speed": Number(0.5, low=0.0, high=1.0, low_open=True), "label": Text("")}


def test_a_mapping_schema_fills_defaults_and_converts_integers() -> None:
    """Missing keys take their defaults; a TOML integer is a number."""
    assert read_tuning({}, KEYS) == {"speed": 0.5, "label": ""}
    assert read_tuning({"speed": 1}, KEYS) == {"speed": 1.0, "label": ""}


@pytest.mark.parametrize(
    ("tuning", "key", "words"),
    [
        ({"sped": 0.3}, "sped", "did you mean 'speed'?"),
        ({"speed": "fast"}, "speed", "expected a number"),
        ({"speed": True}, "speed", "expected a number"),
        ({"speed": 0.0}, "speed", "out of range; expected (0, 1]"),
        ({"label": 3}, "label", "expected a string"),
    ],
)
def test_a_mapping_schema_names_the_bad_key(
    tuning: dict[str, object], key: str, words: str
) -> None:
    """Unknown keys (with a suggestion), wrong types and out-of-range values name the key."""
    with pytest.raises(TuningError, match=f"'{key}'") as caught:
        read_tuning(tuning, KEYS)
    assert caught.value.key == key
    assert words in str(caught.value)


def test_an_attrs_schema_returns_an_instance_with_defaults() -> None:
    """A class schema gives an instance: nested tables as nested classes, lists as tuples."""
    got = read_tuning({"speed": 1, "lens": {"steps": 7}, "curve": [1, 2.5]}, AfTuning)
    assert got == AfTuning(speed=1.0, lens=Lens(7), curve=(1.0, 2.5))
    assert read_tuning({}, AfTuning) == AfTuning()


@pytest.mark.parametrize(
    ("tuning", "key", "words"),
    [
        ({"sped": 0.3}, "sped", "did you mean 'speed'?"),
        ({"speed": "fast"}, "speed", "Expected `float`, got `str`"),
        ({"speed": 2.0}, "speed", "must be <= 1"),
        ({"lens": {"step": 3}}, "lens.step", "did you mean 'lens.steps'?"),
        ({"lens": {"steps": 0}}, "lens.steps", "must be >= 1"),
        ({"lens": 5}, "lens", "expected a table"),
        ({"curve": [1, "x"]}, "curve[1]", "Expected `float`, got `str`"),
    ],
)
def test_an_attrs_schema_names_the_bad_key(tuning: dict[str, object], key: str, words: str) -> None:
    """Each problem's message and ``key`` name the (dotted) key, validators included."""
    with pytest.raises(TuningError) as caught:
        read_tuning(tuning, AfTuning)
    assert caught.value.key == key
    assert repr(key) in str(caught.value)
    assert words in str(caught.value)


def test_a_check_across_keys_is_a_tuning_error() -> None:
    """What ``__attrs_post_init__`` refuses is a TuningError too, with its message."""
    with pytest.raises(TuningError, match="reserved"):
        read_tuning({"label": "forbidden"}, AfTuning)


def test_dataclasses_and_structs_are_schemas_too() -> None:
    """Any class msgspec can build is a schema; unknown keys are still refused."""

    @dataclasses.dataclass
    class Plain:
        gain: float = 1.0

    class Struct(msgspec.Struct):
        gain: float = 1.0

    assert read_tuning({"gain": 2}, Plain) == Plain(2.0)
    assert read_tuning({"gain": 2}, Struct) == Struct(2.0)
    for schema in (Plain, Struct):
        with pytest.raises(TuningError, match="did you mean 'gain'"):
            read_tuning({"gian": 2}, schema)


class Limits(msgspec.Struct):
    """msgspec constraints on a schema's fields (module level: annotations resolve here)."""

    gain: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    name: Annotated[str, msgspec.Meta(max_length=4)] = "x"


@dataclasses.dataclass
class PlainLimits:
    """The same constraint on a dataclass's field."""

    gain: Annotated[float, msgspec.Meta(gt=0)] = 1.0


def test_msgspec_constraints_of_a_field_are_checked() -> None:
    """Annotated[..., msgspec.Meta(...)] is checked as the key is read, naming the key."""
    assert read_tuning({"gain": 2}, Limits) == Limits(gain=2.0)
    assert read_tuning({"gain": 2}, PlainLimits) == PlainLimits(gain=2.0)
    for schema in (Limits, PlainLimits):
        with pytest.raises(TuningError, match=r"tuning key 'gain': Expected `float` > 0") as bad:
            read_tuning({"gain": 0}, schema)
        assert bad.value.key == "gain"
    with pytest.raises(TuningError, match="tuning key 'name'"):
        read_tuning({"name": "too long"}, Limits)


def test_anything_else_is_not_a_schema() -> None:
    """A schema that is neither kind is the module author's error, said at once."""
    with pytest.raises(TypeError, match="neither a mapping"):
        read_tuning({}, int)


def test_the_helpers_import_nothing_slow() -> None:
    """A worker may import ipad.tuning and still start fast: no attrs, pathlib or ipad.config."""
    code = (
        "import sys, ipad.tuning; "
        "print(sorted(m for m in ('attrs', 'pathlib', 'ipad.config', 'trio') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "[]"


def test_the_shipped_types_reexport_the_helpers() -> None:
    """Code that imported the helpers from ipa_modules.types keeps working."""
    from ipa_modules import types  # noqa: PLC0415 - the compatibility names

    assert types.read_tuning is read_tuning
    assert types.TuningError is TuningError
    assert types.Number is Number
