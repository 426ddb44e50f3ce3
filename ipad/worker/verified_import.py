"""Import a signed module from the very bytes whose SHA-256 the signature lists.

The daemon verifies a module's signature (ipad/config/signing.py) and passes the
signed digests with LOAD; the worker host, before any module code runs,
reads every signed file once, checks it against its digest and keeps the
bytes. Imports that land in the module directory are then served from those
bytes only -- compiled in memory, no ``__pycache__`` read or written -- so a
file edited after the check is never what runs, and a file the signature
does not cover is refused instead of imported. Only the standard library is
used: the worker needs neither ``cryptography`` nor any key.
"""

# os.path, not pathlib: this runs in the worker host, which imports no pathlib (see sandbox.py).
# ruff: noqa: PTH100, PTH118, PTH120

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import sys
from collections.abc import Mapping, Sequence
from types import CodeType, ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from importlib.abc import Loader  # not at run time: it imports importlib.resources (~20 ms)

#: Suffixes Python could import a module from: a file with any of these not signed is refused.
IMPORTABLE_SUFFIXES = tuple(importlib.machinery.all_suffixes())


class CodeRefused(ImportError):
    """A module file is changed, missing or not covered by the signature: it must not run."""

    def __init__(self, file: str, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason
        #: What the worker host reports (it looks for this name: no import of this module).
        self.refused_code = f"{file}: {reason}"


class VerifiedCode:
    """One module directory's signed files, read and checked once; their bytes kept."""

    def __init__(self, root: str, digests: Mapping[str, str]) -> None:
        # Not resolved: a package reached through a symlink keeps its path, as its signature does.
        self.root = os.path.normpath(os.path.abspath(root))
        self._relative: dict[str, str | None] = {}
        #: Relative path -> the verified bytes of each signed Python source file.
        self.sources: dict[str, bytes] = {}
        self.digests = dict(digests)
        #: The signed top-level entries (the entry point's package): nothing beside them is.
        self.signed_tops = sorted(
            {n.split("/", 1)[0] for n in digests if "/" in n or n.endswith(".py")}
        )
        for name, digest in sorted(digests.items()):
            path = os.path.join(self.root, name)
            try:
                with open(path, "rb") as file:  # noqa: PTH123 - no pathlib in the worker host
                    data = file.read()
            except FileNotFoundError:
                raise CodeRefused(path, "signed but missing") from None
            except OSError as exc:
                raise CodeRefused(path, f"unreadable: {exc.strerror or exc}") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise CodeRefused(path, "changed since it was signed (tampered)")
            if name.endswith(".py"):
                self.sources[name] = data

    def relative(self, path: str) -> str | None:
        """``path`` relative to the module directory, or None if it lies outside it."""
        known = self._relative.get(path, "?")
        if known != "?":
            return known
        full = os.path.normpath(os.path.abspath(path))
        rel: str | None = None
        if full == self.root:
            rel = ""
        elif full.startswith(self.root + os.sep):
            rel = full[len(self.root) + 1 :]
        self._relative[path] = rel
        return rel

    def check_loaded(self) -> None:
        """Refuse if code from this directory was imported before, other than from these bytes.

        A fork server's preload or an earlier import would otherwise be
        found in ``sys.modules`` and run without this check.
        """
        # Origins are absolute: the path as given, or resolved (a fork server's preloads).
        prefixes = (self.root + os.sep, os.path.realpath(self.root) + os.sep)
        for module in list(sys.modules.values()):
            spec = getattr(module, "__spec__", None)
            origin = getattr(spec, "origin", None)
            if not isinstance(origin, str) or not origin.startswith(prefixes):
                continue
            rel = origin[len(next(p for p in prefixes if origin.startswith(p))) :]
            loader = getattr(spec, "loader", None)
            if not (isinstance(loader, VerifiedLoader) and loader.digest == self.digests.get(rel)):
                raise CodeRefused(origin, "imported before it was verified against the signature")


class VerifiedFinder:
    """Serves every import that would be found in the module directory from verified bytes.

    It sits first on ``sys.meta_path``: a name found in the directory is
    either one of the signed sources or refused, never left to the path finder.
    """

    def __init__(self, code: VerifiedCode) -> None:
        self.code = code

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A spec for a signed module; CodeRefused for an unsigned one in the directory."""
        last = fullname.rpartition(".")[2]
        for entry in sys.path if path is None else path:
            base = self.code.relative(entry or ".")
            if base is None:
                continue
            prefix = f"{base}/" if base else ""
            package = f"{prefix}{last}/__init__.py"
            if package in self.code.sources:
                return self._spec(fullname, package, is_package=True)
            module = f"{prefix}{last}.py"
            if module in self.code.sources:
                return self._spec(fullname, module, is_package=False)
            self._refuse_unsigned(os.path.join(self.code.root, base), last)
        return None

    def _spec(self, fullname: str, rel: str, *, is_package: bool) -> importlib.machinery.ModuleSpec:
        path = os.path.join(self.code.root, rel)
        loader = VerifiedLoader(self.code.sources[rel], path, self.code.digests[rel])
        spec = importlib.machinery.ModuleSpec(
            fullname, cast("Loader", loader), origin=path, is_package=is_package
        )
        spec.has_location = True  # __file__ is set: tracebacks and the module itself find it
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(path)]
        return spec

    def _refuse_unsigned(self, directory: str, last: str) -> None:
        """A module file or package directory ``last`` that Python could import: refused."""
        candidates = [os.path.join(directory, last)]
        candidates += [os.path.join(directory, last + suffix) for suffix in IMPORTABLE_SUFFIXES]
        for candidate in candidates:
            if os.path.lexists(candidate):
                if self.code.relative(candidate) in self.code.digests:  # an extension module
                    raise CodeRefused(candidate, "signed, but only Python source files can be "
                                      "imported from verified bytes")  # fmt: skip
                raise CodeRefused(candidate, self._uncovered(candidate))

    def _uncovered(self, candidate: str) -> str:
        """Why ``candidate`` is refused: added to the package, or beside it (never signed)."""
        rel = self.code.relative(candidate) or ""
        tops = self.code.signed_tops
        if not tops or rel.split(os.sep, 1)[0] in tops:
            return "not covered by the signature (added after signing?)"
        package = tops[0].removesuffix(".py")
        return (f"not covered by the signature, which covers only the manifest and "
                f"{', '.join(tops)}: put a dependency inside the package (say {package}/_vendor/) "
                "and sign again")  # fmt: skip


class VerifiedLoader:
    """Executes code compiled from bytes that were checked against the signature."""

    def __init__(self, source: bytes, path: str, digest: str) -> None:
        self.source = source
        self.path = path
        self.digest = digest

    def get_source(self, fullname: str) -> str:
        """The verified text (tracebacks show what ran, not what is on disk now)."""
        return self.source.decode("utf-8", "replace")

    def get_code(self, fullname: str) -> CodeType:
        """Compiled from the verified bytes; never from or to ``__pycache__``."""
        return compile(self.source, self.path, "exec", dont_inherit=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        """The default module object."""

    def exec_module(self, module: ModuleType) -> None:
        """Run the module's verified code in its namespace."""
        exec(self.get_code(module.__name__), module.__dict__)  # noqa: S102 - verified module code


class ClosedDirectory:
    """A path entry finder that finds nothing: the module directory, for the path finder.

    ``VerifiedFinder`` looks first; were the path finder to look in the module
    directory after it, a file planted between the two looks (a race won in
    some 80 tries here) would be imported unverified: an optional import, or
    a standard module imported lazily, ran a planted ``NAME.py``.
    """

    def __init__(self, code: VerifiedCode) -> None:
        self.code = code
        self.real_root = os.path.realpath(code.root)

    def __call__(self, entry: str) -> ClosedDirectory:
        """The path hook: this finder for an entry in the module directory, else ImportError."""
        if not self.covers(entry):
            raise ImportError("not in the signed module's directory")
        return self

    def covers(self, entry: object) -> bool:
        """Whether ``entry`` lies in the module directory (as given or resolved)."""
        if not isinstance(entry, str):
            return False
        if self.code.relative(entry or ".") is not None:
            return True
        real = os.path.realpath(entry or ".")
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def find_spec(self, fullname: str, target: ModuleType | None = None) -> None:
        """Nothing: what the directory holds is served by ``VerifiedFinder`` or not at all."""

    def invalidate_caches(self) -> None:
        """Nothing is cached."""


def install(root: str, digests: Mapping[str, str]) -> VerifiedCode:
    """Verify ``root``'s signed files now and serve its imports from them from now on.

    Only from them: the path finder is closed to the directory, whatever
    appears in it later.
    """
    code = VerifiedCode(root, digests)
    code.check_loaded()
    closed = ClosedDirectory(code)
    sys.path_hooks.insert(0, closed)
    for entry in list(sys.path_importer_cache):  # found earlier (a fork server's preloads)
        if closed.covers(entry):
            sys.path_importer_cache[entry] = closed
    sys.meta_path.insert(0, VerifiedFinder(code))
    return code
