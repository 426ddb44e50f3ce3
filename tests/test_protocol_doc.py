"""docs/protocol.md against the codec: every message, field, type, default and error code.

The page is normative (C and C++ implementations are written from it alone),
so its tables must say exactly what ``ipad.protocol.wire`` encodes and
accepts. Each failure names the section and the row or field that is
missing, extra or different, with the row the page should have.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from ipad.protocol import wire as p

PAGE = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

#: msgspec's scalar types and how the page names them (msgpack's names).
SCALARS: dict[type[mi.Type], str] = {
    mi.IntType: "int",
    mi.FloatType: "float",
    mi.BoolType: "bool",
    mi.StrType: "str",
    mi.AnyType: "any",
    mi.NoneType: "nil",
    mi.BytesType: "bin",
}


def type_name(kind: mi.Type) -> str:
    """A field type in the page's notation: ``int``, ``[str]``, ``{str: any}``, ``str | nil``."""
    if type(kind) in SCALARS:
        return SCALARS[type(kind)]
    match kind:
        case mi.VarTupleType(item_type=item) | mi.ListType(item_type=item):
            return f"[{type_name(item)}]"
        case mi.DictType(key_type=key, value_type=value):
            return f"{{{type_name(key)}: {type_name(value)}}}"
        case mi.UnionType(types=types):
            names = [type_name(t) for t in types if not isinstance(t, mi.NoneType)]
            nil = ["nil"] if any(isinstance(t, mi.NoneType) for t in types) else []
            return " | ".join(names + nil)
        case mi.StructType(cls=cls):
            return str(cls.__name__)
    raise NotImplementedError(f"no page notation for {kind!r}: extend type_name")


#: How the page writes a default that is not a string or a number.
LITERALS: dict[Any, str] = {None: "nil", True: "true", False: "false"}


def default_text(field: mi.Field) -> str:
    """A field's default in the page's notation, or ``required``."""
    if field.required:
        return "required"
    if field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT:
        # An UNSET default (left out of the encoding when unset): the page names the
        # value a receiver uses, the empty one of the field's type.
        return "{}" if "{" in type_name(field.type) else "[]"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if isinstance(value, bool) or value is None:
        return LITERALS[value]
    if isinstance(value, str | tuple | list | dict):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return repr(value)


def struct_fields(cls: type[Any]) -> tuple[mi.Field, ...]:
    """The fields of a Struct class."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info.fields


def nested_structs() -> list[type[msgspec.Struct]]:
    """Every Struct a message nests (MethodSpec, SandboxSpec...), found from the codec."""
    found: list[type[msgspec.Struct]] = []

    def visit(kind: mi.Type) -> None:
        match kind:
            case mi.StructType(cls=cls, fields=fields):
                if cls not in found:
                    found.append(cls)
                    for field in fields:
                        visit(field.type)
            case mi.VarTupleType(item_type=item) | mi.ListType(item_type=item):
                visit(item)
            case mi.DictType(value_type=value):
                visit(value)
            case mi.UnionType(types=types):
                for t in types:
                    visit(t)

    for cls in p.MESSAGE_CLASSES.values():
        for field in struct_fields(cls):
            visit(field.type)
    return found


def cells(line: str) -> list[str]:
    """A table row's cells, escaped pipes unescaped and code backticks removed."""
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [part.strip().replace("\\|", "|").strip("`").strip() for part in parts]


def section(text: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, f"docs/protocol.md has no '## {title}' section"
    return match.group(1)


def field_tables(text: str) -> dict[str, dict[str, tuple[str, str]] | None]:
    """Message fields: ``### heading`` -> field -> (type, default); None for a malformed table."""
    tables: dict[str, dict[str, tuple[str, str]] | None] = {}
    body = section(text, "Message fields")
    for block in re.split(r"^### ", body, flags=re.M)[1:]:
        heading, _, rest = block.partition("\n")
        rows = [line for line in rest.splitlines() if line.startswith("|")]
        if not rows:
            tables[heading.strip()] = {} if "No fields." in rest else None
            continue
        header = cells(rows[0])
        if header[:3] != ["Field", "Type", "Default"]:
            tables[heading.strip()] = None
            continue
        tables[heading.strip()] = {
            row[0]: (row[1], row[2]) for row in map(cells, rows[2:]) if len(row) >= 3
        }
    return tables


TEXT = PAGE.read_text(encoding="utf-8")


def expected_headings() -> dict[str, type[msgspec.Struct]]:
    """The ``###`` heading each message and nested struct must have in Message fields."""
    headings: dict[str, type[msgspec.Struct]] = {
        f"{kind.value} {kind.name}": cls for kind, cls in sorted(p.MESSAGE_CLASSES.items())
    }
    headings.update({cls.__name__: cls for cls in nested_structs()})
    return headings


def expected_row(field: mi.Field) -> str:
    """The table row the page should have for ``field`` (to paste, ``|`` escaped)."""
    kind = type_name(field.type).replace("|", "\\|")
    return f"| `{field.name}` | `{kind}` | `{default_text(field)}` | … |"


def test_every_message_and_struct_has_a_field_table() -> None:
    """Message fields has one table per message type (number and name) and per nested struct."""
    tables = field_tables(TEXT)
    expected = expected_headings()
    missing = [h for h in expected if h not in tables]
    extra = [h for h in tables if h not in expected]
    malformed = [h for h, t in tables.items() if t is None and h in expected]
    problems = [f"no '### {h}' table in 'Message fields'" for h in missing]
    problems += [f"'### {h}' in 'Message fields' is no message type or struct of the codec"
                 for h in extra]  # fmt: skip
    problems += [f"'### {h}': no '| Field | Type | Default | Meaning |' table and not "
                 "'No fields.'" for h in malformed]  # fmt: skip
    assert not problems, "docs/protocol.md:\n" + "\n".join(problems)


@pytest.mark.parametrize("heading", list(expected_headings()))
def test_a_field_table_matches_the_codec(heading: str) -> None:
    """Every field of the message is a row with its type and default, and no row is extra."""
    table = field_tables(TEXT).get(heading)
    if table is None:
        pytest.fail(f"docs/protocol.md: '### {heading}' has no field table (see the test above)")
    fields = struct_fields(expected_headings()[heading])
    problems = []
    for field in fields:
        if field.name not in table:
            problems.append(f"missing row for field `{field.name}`: {expected_row(field)}")
            continue
        kind, default = table[field.name]
        if kind != type_name(field.type):
            problems.append(f"`{field.name}`: Type is `{kind}` on the page, "
                            f"`{type_name(field.type)}` in the codec")  # fmt: skip
        if default != default_text(field):
            problems.append(f"`{field.name}`: Default is `{default}` on the page, "
                            f"`{default_text(field)}` in the codec")  # fmt: skip
    names = {field.name for field in fields}
    problems += [f"row `{name}` is not a field of the codec's {heading}"
                 for name in table if name not in names]  # fmt: skip
    assert not problems, f"docs/protocol.md, '### {heading}':\n" + "\n".join(problems)


def test_the_type_tables_list_every_type_with_its_number() -> None:
    """The per-connection tables of Message types name every type, each with its own number."""
    rows = [cells(line) for line in section(TEXT, "Message types").splitlines()
            if re.match(r"^\| *\d+ *\|", line)]  # fmt: skip
    listed = {(int(row[0]), row[1]) for row in rows}
    codec = {(kind.value, kind.name) for kind in p.MESSAGE_CLASSES}
    problems = [f"no row '| {n} | {name} | …' in any table of 'Message types'"
                for n, name in sorted(codec - listed)]  # fmt: skip
    problems += [f"row '| {n} | {name} | …' of 'Message types': no such type in the codec "
                 f"(MsgType)" for n, name in sorted(listed - codec)]  # fmt: skip
    assert not problems, "docs/protocol.md:\n" + "\n".join(problems)


def test_the_error_table_lists_every_code() -> None:
    """The Errors table has one row per ErrorCode, and none that the codec lacks."""
    rows = [cells(line) for line in section(TEXT, "Errors").splitlines() if line.startswith("|")]
    header = next((i for i, row in enumerate(rows) if row[:1] == ["Code"]), None)
    assert header is not None, "docs/protocol.md, 'Errors': no '| Code | Sent by | Meaning |' table"
    listed = [row[0] for row in rows[header + 2 :]]
    codes = [code.value for code in p.ErrorCode]
    problems = [f"no row for error code `{code}`" for code in codes if code not in listed]
    problems += [f"row `{code}` is not an ErrorCode of the codec" for code in listed
                 if code not in codes]  # fmt: skip
    problems += [f"row `{code}` appears {listed.count(code)} times" for code in set(listed)
                 if listed.count(code) > 1]  # fmt: skip
    assert not problems, "docs/protocol.md, 'Errors':\n" + "\n".join(problems)


def test_the_checker_sees_a_drift() -> None:
    """The tables are really read: a field the codec has and the page lacks is reported by name."""
    page = TEXT.replace(
        "| `minor` | `int` | `0` | the highest minor revision the daemon speaks |\n", ""
    )
    assert page != TEXT
    table = field_tables(page)["32 LOAD"]
    assert table is not None
    assert "minor" not in table
    assert "signed" in table
    assert table["signed"] == ("{str: str} | nil", "nil")
