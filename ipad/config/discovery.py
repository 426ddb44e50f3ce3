"""Finding the IPA modules installed, configured and named in $IPAD_MODULE_PATH."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import structlog

from ipad.config.manifest import ModuleSource, load_manifest
from ipad.config.paths import install_module_dir
from ipad.config.problems import ManifestError
from ipad.config.search_path import dirs_from_env

log = structlog.get_logger("ipad")

#: Extra module directories searched after the install and configured ones.
MODULE_PATH_ENV = "IPAD_MODULE_PATH"

#: Every file with this suffix in a module directory is a manifest.
MANIFEST_SUFFIX = ".toml"


@attrs.frozen
class Shadowed:
    """A valid manifest not used because a directory earlier in the search holds the same name."""

    name: str
    path: Path
    shadowed_by: Path


@attrs.frozen
class Discovery:
    """What a search for modules found, used, rejected and passed over."""

    #: Module name to the manifest that won, in the order they were found.
    modules: dict[str, ModuleSource]
    #: Manifests that could not be used; each error's problems name the file.
    rejected: tuple[ManifestError, ...]
    shadowed: tuple[Shadowed, ...]
    #: Every directory searched, in order, including those that did not exist.
    searched: tuple[Path, ...]


def discover_modules(
    *,
    module_dirs: Sequence[Path] = (),
    environ: Mapping[str, str] | None = None,
    install: Path | None = None,
    privileged: bool | None = None,
) -> Discovery:
    """Read every manifest in the module search path.

    Directories are searched in this order: ``install`` (default: the
    installed modules), ``module_dirs`` (the configuration's, which must be
    absolute), then the absolute entries of $IPAD_MODULE_PATH, which a
    privileged (setuid/setgid) process ignores. In each directory every
    ``*.toml`` file is a manifest, read in name order; hidden files (such as
    editors' lock files) are skipped. The first valid manifest for a name wins
    and later ones are recorded as shadowed. An invalid manifest is recorded as
    rejected and shadows nothing, so a broken copy early in the path does not
    hide a working one later; discovery always goes on to the next file.
    """
    for extra in module_dirs:
        if not extra.is_absolute():
            raise ValueError(f"module directory {str(extra)!r} must be an absolute path")
    env_dirs = dirs_from_env(MODULE_PATH_ENV, environ, privileged=privileged)
    first = install_module_dir() if install is None else install
    searched = tuple(dict.fromkeys([first, *module_dirs, *env_dirs]))
    modules: dict[str, ModuleSource] = {}
    rejected: list[ManifestError] = []
    shadowed: list[Shadowed] = []
    for directory in searched:
        for path in _manifest_files(directory):
            try:
                manifest = load_manifest(path)
            except ManifestError as exc:
                log.warning(
                    "manifest.rejected",
                    path=str(path),
                    problems=[str(problem) for problem in exc.problems],
                )
                rejected.append(exc)
                continue
            winner = modules.get(manifest.name)
            if winner is not None:
                log.warning(
                    "module.shadowed",
                    module=manifest.name,
                    path=str(path),
                    shadowed_by=str(winner.path),
                )
                shadowed.append(Shadowed(manifest.name, path, winner.path))
                continue
            modules[manifest.name] = ModuleSource(manifest, path)
    return Discovery(modules, tuple(rejected), tuple(shadowed), searched)


def _manifest_files(directory: Path) -> list[Path]:
    """List the manifest files in one directory, sorted; none if it is missing or unreadable."""
    try:
        names = sorted(
            entry.name
            for entry in directory.iterdir()
            if entry.name.endswith(MANIFEST_SUFFIX) and not entry.name.startswith(".")
        )
    except FileNotFoundError:
        log.debug("module_dir.missing", directory=str(directory))
        return []
    except NotADirectoryError:
        log.warning("module_dir.not_a_directory", directory=str(directory))
        return []
    except OSError as exc:
        log.warning("module_dir.unreadable", directory=str(directory), error=str(exc))
        return []
    return [directory / name for name in names]
