"""Finding a module's tuning file, as libcamera's ipa::configurationFile does."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import structlog

from ipad.config.paths import install_tuning_dir
from ipad.config.search_path import check_plain_name, dirs_from_env, secure_getenv

log = structlog.get_logger("ipad")

#: The tuning file every module ships for sensors nobody has calibrated yet.
UNCALIBRATED = "uncalibrated.toml"

#: Directories searched for ``<module>/<file>`` before the installed tuning files.
CONFIG_PATH_ENV = "IPAD_CONFIG_PATH"


class TuningFileNotFound(LookupError):
    """No tuning file was found for a module; ``tried`` lists every path looked at, in order."""

    def __init__(self, module: str, tried: Iterable[Path] = (), hint: str | None = None) -> None:
        self.module = module
        self.tried: tuple[Path, ...] = tuple(tried)
        self._hint = hint
        super().__init__(module)

    def __str__(self) -> str:
        if not self.tried:
            return f"no tuning file found for module {self.module!r}; no path to try; {self.hint}"
        lines = "".join(f"\n  {path}" for path in self.tried)
        return f"no tuning file found for module {self.module!r}; tried:{lines}\n{self.hint}"

    @property
    def hint(self) -> str:
        """Where a tuning file can be put or named: the key and the environment variables."""
        if self._hint is not None:  # said by the caller (ipad.testing: its own arguments)
            return self._hint
        return (f"put it in <dir>/{self.module}/ for a <dir> in the configuration's "
                f"[daemon] tuning_dirs or in ${CONFIG_PATH_ENV}, or name it in "
                f"${tuning_env_var(self.module)}")  # fmt: skip


def tuning_env_var(module: str) -> str:
    """Name the variable that names one module's tuning file: ``IPAD_<MODULE>_TUNING_FILE``.

    ``-`` becomes ``_`` since shells cannot set names with dashes, so modules
    ``a-b`` and ``a_b`` share a variable.
    """
    return f"IPAD_{module.upper().replace('-', '_')}_TUNING_FILE"


def find_tuning_file(
    module: str,
    name: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    install_tuning: Path | None = None,
    privileged: bool | None = None,
    tuning_dirs: Sequence[Path] = (),
) -> Path:
    """Return the tuning file ``module`` should use; raise TuningFileNotFound naming every try.

    $IPAD_<MODULE>_TUNING_FILE wins when it is absolute and names a regular
    file; a relative value is ignored with a warning, and so is one naming
    nothing usable. Otherwise ``<dir>/<module>/<name>`` is looked for in each
    $IPAD_CONFIG_PATH directory, then in ``tuning_dirs`` (the configuration's
    key), then in ``install_tuning`` (default: the installed
    tuning files). ``name`` None means UNCALIBRATED; a named file
    that is nowhere falls back to UNCALIBRATED with a warning, so a camera
    still starts with a known-safe tuning. A privileged (setuid/setgid)
    process ignores both variables.
    """
    check_plain_name(module, "module")
    if name is not None:
        check_plain_name(name, "tuning file")
    tried: list[Path] = []
    from_env = _path_from_env(module, environ, privileged)
    if from_env is not None:
        tried.append(from_env)
        if from_env.is_file():
            log.debug("tuning.resolved", module=module, path=str(from_env))
            return from_env
        log.warning("tuning.env_file_unusable", variable=tuning_env_var(module), path=str(from_env))
    env_dirs = dirs_from_env(CONFIG_PATH_ENV, environ, privileged=privileged)
    last = install_tuning_dir() if install_tuning is None else install_tuning
    dirs = list(dict.fromkeys([*env_dirs, *tuning_dirs, last]))
    wanted = UNCALIBRATED if name is None else name
    found = _search(dirs, module, wanted, tried)
    if found is None and wanted != UNCALIBRATED:
        found = _search(dirs, module, UNCALIBRATED, tried)
        if found is not None:
            log.warning(
                "tuning.fallback_uncalibrated", module=module, wanted=wanted, path=str(found)
            )
    if found is None:
        raise TuningFileNotFound(module, tried)
    log.debug("tuning.resolved", module=module, path=str(found))
    return found


def _path_from_env(
    module: str, environ: Mapping[str, str] | None, privileged: bool | None
) -> Path | None:
    """Read the module's tuning file variable as an absolute path; None when unset or ignored."""
    variable = tuning_env_var(module)
    value = secure_getenv(variable, environ, privileged=privileged)
    if value is None:
        return None
    if not value.startswith("/"):
        log.warning("tuning.relative_env_ignored", variable=variable, value=value)
        return None
    return Path(value)


def _search(dirs: Sequence[Path], module: str, filename: str, tried: list[Path]) -> Path | None:
    """Find the first ``<dir>/<module>/<filename>`` that is a regular file; record each try."""
    for directory in dirs:
        candidate = directory / module / filename
        tried.append(candidate)
        if candidate.is_file():
            return candidate
    return None
