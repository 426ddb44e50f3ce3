"""Real files and directories for tests, with the exact modes the checks under test look at."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

#: A worker body that runs anywhere /bin/sh does; its content never matters to the tests.
WORKER_SCRIPT = "#!/bin/sh\nexit 0\n"

#: A manifest every rule accepts, for a file named awb.toml.
VALID_MANIFEST: dict[str, object] = {
    "name": "awb",
    "version": "1.0.0",
    "api_version": 1,
    "worker": "ipad-worker",
    "entry_point": "ipa_modules.awb:GrayWorldAwb",
    "description": "Grey-world auto white balance",
    "pipeline": {"handlers": ["simple", "rkisp1"], "min_version": 1, "max_version": 3},
}


def make_dir(path: Path, mode: int = 0o755) -> Path:
    """Create ``path`` and any missing parents with ``mode``, whatever the umask says.

    Directories that already exist keep their mode, so a test can loosen one on purpose.
    """
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(mode)
    return path


def write_file(path: Path, text: str = "", mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` with exactly ``mode``, creating its directory if needed."""
    make_dir(path.parent)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def write_executable(path: Path, mode: int = 0o755) -> Path:
    """Write a shell-script worker at ``path`` with exactly ``mode``."""
    return write_file(path, WORKER_SCRIPT, mode)


def toml_text(data: Mapping[str, object]) -> str:
    """Render strings, integers, arrays and one level of tables as TOML.

    JSON's string and array syntax is valid TOML for the values tests use.
    """
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, object]]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def write_manifest(
    directory: Path, name: str = "awb", file_stem: str | None = None, **changes: object
) -> Path:
    """Write a valid manifest for ``name``, with ``changes`` applied, as ``<file_stem>.toml``.

    A change whose value is None removes that key.
    """
    data: dict[str, object] = {**VALID_MANIFEST, "name": name, **changes}
    data = {key: value for key, value in data.items() if value is not None}
    return write_file(directory / f"{file_stem or name}.toml", toml_text(data))
