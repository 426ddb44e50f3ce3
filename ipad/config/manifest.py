"""IPA module manifests: what a module is, which worker runs it and which pipelines it serves.

A module is described by ``<name>.toml`` in a module directory::

    name = "awb"                  # must equal the file name's stem
    version = "1.0.0"             # the module's version: MAJOR.MINOR.PATCH, digits only
    api_version = 1               # the manifest format; only 1 is known
    worker = "ipad-worker"        # worker executable name: a plain file name
    entry_point = "ipa_modules.awb:GrayWorldAwb"  # optional; "package.module:Class"
    description = "Grey-world auto white balance"  # optional

    [pipeline]
    handlers = ["simple", "rkisp1"]  # pipeline handlers it supports: a non-empty array
    min_version = 1                  # supported pipeline versions, inclusive;
    max_version = 3                  # 0 <= min_version <= max_version

The module name is ASCII letters, digits, ``_`` and ``-``, starting with a
letter or digit, because it names a tuning directory and an environment
variable. Every problem in a manifest is reported at once, each with its key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

from ipad.config.convert import structure
from ipad.config.problems import ManifestError, Problem, join_key
from ipad.config.search_path import is_plain_name

#: Manifest format versions this ipad understands; a newer one may mean things we would ignore.
SUPPORTED_API_VERSIONS = frozenset({1})

#: The key under which problems with the file as a whole (unreadable, not TOML) are reported.
FILE_KEY = "(file)"

#: A module name is safe as a directory name and, upper-cased, inside an environment variable.
MODULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

#: MAJOR.MINOR.PATCH; [0-9] rather than \d, which would also accept non-ASCII digits.
VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")

#: "package.module:Class", what the Python worker host imports.
ENTRY_POINT = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@attrs.frozen
class PipelineSupport:
    """The ``[pipeline]`` table: which pipeline handlers, at which versions, a module serves."""

    handlers: tuple[str, ...]
    min_version: int
    max_version: int

    def supports(self, handler: str, version: int) -> bool:
        """Whether this module can serve ``handler`` at pipeline ``version``."""
        return handler in self.handlers and self.min_version <= version <= self.max_version


@attrs.frozen
class Manifest:
    """One validated module manifest."""

    name: str
    version: str
    api_version: int
    worker: str
    pipeline: PipelineSupport
    #: Only the Python worker host needs it; native workers know what they run.
    entry_point: str | None = None
    description: str = ""


@attrs.frozen
class ModuleSource:
    """A manifest and the file it was read from."""

    manifest: Manifest
    #: The manifest file itself.
    path: Path

    @property
    def directory(self) -> Path:
        """The module directory the manifest was found in."""
        return self.path.parent


def load_manifest(path: Path) -> Manifest:
    """Read and validate one manifest; raise ManifestError listing every problem in it."""
    data, problems = _read(path)
    manifest = None
    if data is not None:
        manifest, problems = structure(data, Manifest, path)
        problems.extend(_semantic_problems(data, path))
    if problems or manifest is None:
        raise ManifestError(problems)
    return manifest


def _read(path: Path) -> tuple[dict[str, object] | None, list[Problem]]:
    """Parse the file as TOML, or say why it could not be."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, [Problem(path, FILE_KEY, f"cannot read: {exc.strerror or exc}")]
    try:
        return tomllib.loads(raw.decode("utf-8")), []
    except UnicodeDecodeError as exc:
        return None, [Problem(path, FILE_KEY, f"not valid UTF-8: {exc.reason}", "a TOML file")]
    except tomllib.TOMLDecodeError as exc:
        return None, [Problem(path, FILE_KEY, f"malformed TOML: {exc}")]


def _semantic_problems(data: Mapping[str, object], path: Path) -> Iterator[Problem]:
    """Check the meaning of every value whose type is right, so one pass reports everything.

    Values of the wrong type are left to the converter, which already reports them.
    """
    name = data.get("name")
    if isinstance(name, str):
        if not MODULE_NAME.fullmatch(name):
            yield Problem(
                path,
                "name",
                f"invalid module name {name!r}",
                "ASCII letters, digits, '_' and '-', starting with a letter or digit",
            )
        elif name != path.stem:
            yield Problem(
                path,
                "name",
                f"name {name!r} differs from the file name {path.name!r}",
                f"the file to be named {name}.toml, or name = {path.stem!r}",
            )
    version = data.get("version")
    if isinstance(version, str) and not VERSION.fullmatch(version):
        yield Problem(
            path, "version", f"malformed version {version!r}", 'MAJOR.MINOR.PATCH, e.g. "1.0.0"'
        )
    api_version = data.get("api_version")
    if type(api_version) is int and api_version not in SUPPORTED_API_VERSIONS:
        known = ", ".join(str(v) for v in sorted(SUPPORTED_API_VERSIONS))
        yield Problem(
            path, "api_version", f"unsupported api_version {api_version}", f"one of: {known}"
        )
    worker = data.get("worker")
    if isinstance(worker, str) and not is_plain_name(worker):
        yield Problem(
            path,
            "worker",
            f"worker {worker!r} is not a plain file name",
            'an executable name without "/", such as "ipad-worker"',
        )
    entry_point = data.get("entry_point")
    if isinstance(entry_point, str) and not ENTRY_POINT.fullmatch(entry_point):
        yield Problem(
            path, "entry_point", f"malformed entry point {entry_point!r}", '"package.module:Class"'
        )
    pipeline = data.get("pipeline")
    if isinstance(pipeline, dict):
        yield from _pipeline_problems(pipeline, path)


def _pipeline_problems(table: Mapping[str, object], path: Path) -> Iterator[Problem]:
    """Check the ``[pipeline]`` table's values."""
    handlers = table.get("handlers")
    if isinstance(handlers, list):
        if not handlers:
            yield Problem(path, "pipeline.handlers", "no pipeline handlers", "at least one name")
        for index, handler in enumerate(handlers):
            if handler == "":
                key = join_key("pipeline.handlers", index)
                yield Problem(path, key, "empty handler name", "a pipeline handler name")
    bounds: dict[str, int] = {}
    for key in ("min_version", "max_version"):
        value = table.get(key)
        if type(value) is not int:
            continue
        if value < 0:
            yield Problem(path, f"pipeline.{key}", f"negative version {value}", "an integer >= 0")
        else:
            bounds[key] = value
    low, high = bounds.get("min_version"), bounds.get("max_version")
    if low is not None and high is not None and low > high:
        yield Problem(
            path,
            "pipeline.min_version",
            f"min_version {low} is greater than max_version {high}",
            "min_version <= max_version",
        )
