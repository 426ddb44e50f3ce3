"""Turn a module's description into a C header: its types as structs, its calls' args writers.

    ipadctl describe awb --json | python3 examples/stubs/describe_to_c.py > awb_stubs.h

The description is the DESCRIPTION message (docs/protocol.md, "Module
descriptions"). For each named object type it emits a struct (``awb_SensorInfo``)
and a function writing it as a msgpack map; for each method, its name, the
names of its Buffer parameters (CALL ``fd_args``, in order), and a function
writing CALL's ``args`` map from typed C parameters. The header writes
through the small msgpack interface of ipad_writer.h, which any msgpack
library can stand in for. Standard library only: run it anywhere.

Mapping: integer -> int64_t, number -> double, boolean -> bool, string and
string enums -> const char *, a named object -> a pointer to its struct, an
array -> pointer and count, anything else (maps of any value, unions, types
the description leaves open) -> ipad_raw, msgpack bytes written as they are.
An optional parameter is a pointer (NULL: left out, the module's default
applies); an optional struct field has ``has_<field>`` (or is NULL).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

#: Kinds of C value: ("int" | "double" | "bool" | "str" | "raw", None), ("struct", name),
#: ("array", element kind).
Kind = tuple[str, Any]

SCALARS = {"int": "int64_t", "double": "double", "bool": "bool", "str": "const char *"}
WRITERS = {"int": "ipad_w_int", "double": "ipad_w_double", "bool": "ipad_w_bool",
           "str": "ipad_w_str"}  # fmt: skip


def ident(text: str) -> str:
    """A C identifier from a name the module chose (untrusted: anything else becomes _)."""
    out = re.sub(r"\W", "_", text, flags=re.ASCII) or "_"
    return f"_{out}" if out[0].isdigit() else out


class Generator:
    """One module's header."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.module = ident(description["module"])
        self.description = description
        self.types: dict[str, Any] = description.get("types") or {}
        self.structs = {
            name: schema for name, schema in self.types.items()
            if isinstance(schema, dict) and isinstance(schema.get("properties"), dict)
        }  # fmt: skip

    def struct_name(self, name: str) -> str:
        """The C name of a named type: prefixed with the module, so two modules never clash."""
        return f"{self.module}_{ident(name)}"

    def kind(self, schema: Any, depth: int = 0) -> tuple[Kind, bool]:  # noqa: PLR0911
        """The C kind of a schema, and whether it may be nil."""
        if not isinstance(schema, dict) or depth > 16:
            return ("raw", None), False
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref[len("#/$defs/") :]
            if name in self.structs:
                return ("struct", name), False
            return self.kind(self.types.get(name), depth + 1)
        branches = schema.get("anyOf")
        kinds = schema.get("type")
        if isinstance(kinds, list):
            branches = [{**schema, "type": k} for k in kinds]
        if isinstance(branches, list):
            real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
            if len(real) == 1:
                return self.kind(real[0], depth + 1)[0], len(real) < len(branches)
            return ("raw", None), False
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            if all(isinstance(v, str) for v in enum):
                return ("str", None), False
            if all(isinstance(v, int) and not isinstance(v, bool) for v in enum):
                return ("int", None), False
            return ("raw", None), False
        simple = {"integer": "int", "number": "double", "boolean": "bool"}
        if kinds in simple:
            return (simple[kinds], None), False
        if kinds == "string" and "contentEncoding" not in schema:
            return ("str", None), False
        if (
            kinds == "array"
            and isinstance(schema.get("items"), dict)
            and "prefixItems" not in schema
        ):
            return ("array", self.kind(schema["items"], depth + 1)[0]), False
        return ("raw", None), False

    def ctype(self, kind: Kind) -> str:
        """The C type that holds one value of ``kind`` (by pointer for structs and raw)."""
        tag, arg = kind
        if tag in SCALARS:
            return SCALARS[tag]
        if tag == "struct":
            return f"const {self.struct_name(arg)} *"
        return "const ipad_raw *"

    def element(self, kind: Kind) -> str:
        """The C type of an array's element (structs and raw values by value)."""
        tag, arg = kind
        if tag == "struct":
            return self.struct_name(arg)
        if tag in SCALARS:
            return SCALARS[tag]
        return "ipad_raw"

    def write(self, kind: Kind, expr: str, count: str = "", indent: str = "    ") -> list[str]:
        """C statements writing ``expr`` (a value, or a pointer for structs and raw)."""
        tag, arg = kind
        if tag in WRITERS:
            return [f"{indent}{WRITERS[tag]}(w, {expr});"]
        if tag == "struct":
            return [f"{indent}ipad_put_{self.struct_name(arg)}(w, {expr});"]
        if tag == "array":
            inner = arg
            item = f"&{expr}[i]" if inner[0] in ("struct", "raw") else f"{expr}[i]"
            if inner[0] == "array":
                return [f"{indent}ipad_w_raw(w, NULL); /* nested arrays: not mapped */"]
            return [f"{indent}ipad_w_array(w, {count});",
                    f"{indent}for (size_t i = 0; i < {count}; i++) {{",
                    *self.write(inner, item, indent=indent + "    "),
                    f"{indent}}}"]  # fmt: skip
        return [f"{indent}ipad_w_raw(w, {expr});"]

    # --- structs -----------------------------------------------------------------------

    def struct(self, name: str, schema: dict[str, Any]) -> list[str]:
        """The struct of a named object type."""
        cname = self.struct_name(name)
        required = set(schema.get("required") or ())
        lines = [f"/* {_comment(schema.get('description', ''))} */", f"struct {cname} {{"]
        for key, sub in schema["properties"].items():
            kind, nullable = self.kind(sub)
            field = ident(key)
            if kind[0] == "array":
                lines += [f"    const {self.element(kind[1])} *{field};",
                          f"    size_t {field}_count;"]  # fmt: skip
            else:
                lines.append(f"    {_declare(self.ctype(kind), field)};")
            if (key not in required or nullable) and kind[0] in ("int", "double", "bool", "array"):
                lines.append(f"    bool has_{field};")
        lines.append("};")
        return lines

    def struct_writer(self, name: str, schema: dict[str, Any]) -> list[str]:
        """The function writing that struct as a msgpack map (optional fields left out)."""
        cname = self.struct_name(name)
        required = set(schema.get("required") or ())
        count, body = [], []
        for key, sub in schema["properties"].items():
            kind, nullable = self.kind(sub)
            field = ident(key)
            flagged = kind[0] in ("int", "double", "bool", "array")
            present = f"v->has_{field}" if flagged else f"v->{field} != NULL"
            value = self.write(kind, f"v->{field}", f"v->{field}_count", "        ")
            optional = key not in required or nullable
            if not optional:
                count.append("1")
                body += [f"    ipad_w_str(w, {json.dumps(key)});",
                         *[line[4:] for line in value]]  # fmt: skip
            elif key in required:  # nullable: always there, nil when absent
                count.append("1")
                body += [f"    ipad_w_str(w, {json.dumps(key)});", f"    if ({present}) {{",
                         *value, "    } else {", "        ipad_w_nil(w);", "    }"]  # fmt: skip
            else:
                count.append(f"({present} ? 1 : 0)")
                body += [f"    if ({present}) {{", f"        ipad_w_str(w, {json.dumps(key)});",
                         *value, "    }"]  # fmt: skip
        return [
            f"static inline void ipad_put_{cname}(ipad_writer *w, const {cname} *v) {{",
            f"    ipad_w_map(w, {' + '.join(count) or '0'});",
            *body,
            "}",
        ]

    # --- methods -----------------------------------------------------------------------

    def method(self, spec: dict[str, Any]) -> list[str]:
        """A method's name, fd_args and the function writing its CALL args."""
        name = ident(spec["name"])
        fn = f"{self.module}_{name}"
        params = spec.get("params")
        lines = [f"/* {spec['name']}(): {_comment(spec.get('doc', ''))}"]
        if spec.get("setup"):
            lines.append(" * Setup: replayed after a worker restart.")
        if spec.get("result") == {"type": "null"}:
            lines.append(" * Returns: nothing (RESULT value nil).")
        elif spec.get("result") is not None:
            kind, _ = self.kind(spec["result"])
            shown = (
                self.element(kind) if kind[0] != "array" else f"array of {self.element(kind[1])}"
            )
            lines.append(f" * Returns: {shown} (RESULT value).")
        lines.append(" */")
        lines.append(f"#define {fn.upper()}_METHOD {json.dumps(spec['name'])}")
        if params is None:
            return [*lines, f"/* {spec['name']}: not described; its args are unknown */", ""]
        buffers = [json.dumps(p["name"]) for p in params if p.get("buffer")]
        lines.append(
            f"static const char *const {fn}_fd_args[] = {{{', '.join([*buffers, 'NULL'])}}};"
        )
        c_params, body, count = ["ipad_writer *w"], [], []
        for param in params:
            if param.get("buffer"):
                continue
            kind, _ = self.kind(param.get("schema"))
            arg = ident(param["name"])
            key = json.dumps(param["name"])
            required = param.get("required", True)
            if kind[0] == "array":
                c_params += [f"const {self.element(kind[1])} *{arg}", f"size_t {arg}_count"]
                present, value = f"{arg} != NULL", self.write(kind, arg, f"{arg}_count", "        ")
            elif kind[0] in ("struct", "raw", "str") or not required:
                pointer = kind[0] not in ("struct", "raw", "str")
                c_params.append(f"const {SCALARS[kind[0]]} *{arg}" if pointer
                                else _declare(self.ctype(kind), arg))  # fmt: skip
                present = f"{arg} != NULL"
                value = self.write(kind, f"*{arg}" if pointer else arg, indent="        ")
            else:
                c_params.append(f"{SCALARS[kind[0]]} {arg}")
                present, value = "", self.write(kind, arg, indent="        ")
            if not present:
                count.append("1")
                body += [f"    ipad_w_str(w, {key});", *[line[4:] for line in value]]
            elif required:  # a pointer: nil when NULL
                count.append("1")
                body += [f"    ipad_w_str(w, {key});", f"    if ({present}) {{", *value,
                         "    } else {", "        ipad_w_nil(w);", "    }"]  # fmt: skip
            else:
                count.append(f"({present} ? 1 : 0)")
                body += [f"    if ({present}) {{", f"        ipad_w_str(w, {key});", *value,
                         "    }"]  # fmt: skip
        return [
            *lines,
            f"/* CALL args of {spec['name']}; pass the descriptors named in {fn}_fd_args. */",
            f"static inline void {fn}_args({', '.join(c_params)}) {{",
            f"    ipad_w_map(w, {' + '.join(count) or '0'});",
            *body,
            "}",
            "",
        ]

    def header(self) -> str:
        """The whole header."""
        guard = f"IPAD_STUBS_{self.module.upper()}_H"
        version = _comment(str(self.description.get("version", "")))
        out = [
            f"/* Generated from `ipadctl describe {self.module} --json`, version {version}. */",
            f"#ifndef {guard}", f"#define {guard}", "", '#include "ipad_writer.h"', "",
        ]  # fmt: skip
        note = self.description.get("note")
        if note:
            out += [f"/* {_comment(note)} */", ""]
        out += [
            f"typedef struct {self.struct_name(n)} {self.struct_name(n)};" for n in self.structs
        ]
        out.append("")
        for name, schema in self.structs.items():
            out += [*self.struct(name, schema), ""]
        out += [f"static inline void ipad_put_{self.struct_name(n)}(ipad_writer *w, "
                f"const {self.struct_name(n)} *v);" for n in self.structs]  # fmt: skip
        out.append("")
        for name, schema in self.structs.items():
            out += [*self.struct_writer(name, schema), ""]
        for spec in self.description.get("methods") or ():
            out += self.method(spec)
        out.append(f"#endif /* {guard} */")
        return "\n".join(out) + "\n"


def _declare(ctype: str, name: str) -> str:
    """``int64_t x``, ``const char *x``."""
    return f"{ctype}{name}" if ctype.endswith("*") else f"{ctype} {name}"


def _comment(text: str) -> str:
    """Text safe inside a C comment, on one line."""
    return " ".join(text.replace("*/", "* /").split())[:300]


def main() -> int:
    """Read DESCRIPTION JSON from the file named, or stdin; write the header to stdout."""
    source = open(sys.argv[1], encoding="utf-8") if len(sys.argv) > 1 else sys.stdin  # noqa: SIM115, PTH123
    with source:
        description = json.load(source)
    sys.stdout.write(Generator(description).header())
    return 0


if __name__ == "__main__":
    sys.exit(main())
