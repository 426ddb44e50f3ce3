"""Tests for finding a module's tuning file."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ipad.config.paths import install_tuning_dir
from ipad.config.tuning import (
    CONFIG_PATH_ENV,
    UNCALIBRATED,
    TuningFileNotFound,
    find_tuning_file,
    tuning_env_var,
)

from .helpers_fs import make_dir, write_file

MODULE = "awb"
ENV_VAR = "IPAD_AWB_TUNING_FILE"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two $IPAD_CONFIG_PATH directories and an install tuning directory, all empty."""
    return (
        make_dir(tmp_path / "conf1"),
        make_dir(tmp_path / "conf2"),
        make_dir(tmp_path / "install"),
    )


def _tuning(directory: Path, filename: str = UNCALIBRATED, module: str = MODULE) -> Path:
    """Write a tuning file where the search looks for it."""
    return write_file(directory / module / filename, "[algorithms]\n")


def test_env_var_name_is_derived_from_the_module() -> None:
    """The variable is upper-cased with dashes turned into underscores."""
    assert tuning_env_var("awb") == "IPAD_AWB_TUNING_FILE"
    assert tuning_env_var("rpi-vc4") == "IPAD_RPI_VC4_TUNING_FILE"


def test_env_var_wins(tmp_path: Path, dirs: tuple[Path, Path, Path]) -> None:
    """An absolute $IPAD_<MODULE>_TUNING_FILE naming a file wins over every directory."""
    conf1, _, install = dirs
    _tuning(conf1, "imx219.toml")
    _tuning(install, "imx219.toml")
    chosen = write_file(tmp_path / "mine.toml")
    environ = {ENV_VAR: str(chosen), CONFIG_PATH_ENV: str(conf1)}
    found = find_tuning_file(
        MODULE, "imx219.toml", environ=environ, install_tuning=install, privileged=False
    )
    assert found == chosen


def test_relative_env_var_is_ignored_with_a_warning(dirs: tuple[Path, Path, Path]) -> None:
    """A relative tuning file variable is ignored, logged, and the directories are searched."""
    _, _, install = dirs
    expected = _tuning(install)
    with capture_logs() as logs:
        found = find_tuning_file(
            MODULE, environ={ENV_VAR: "mine.toml"}, install_tuning=install, privileged=False
        )
    assert found == expected
    assert {
        "event": "tuning.relative_env_ignored",
        "variable": ENV_VAR,
        "value": "mine.toml",
        "log_level": "warning",
    } in logs


def test_env_var_naming_no_file_is_tried_and_passed_over(
    tmp_path: Path, dirs: tuple[Path, Path, Path]
) -> None:
    """A variable naming something that is not a file is warned about, then the search goes on."""
    _, _, install = dirs
    expected = _tuning(install)
    missing = tmp_path / "missing.toml"
    with capture_logs() as logs:
        found = find_tuning_file(
            MODULE, environ={ENV_VAR: str(missing)}, install_tuning=install, privileged=False
        )
    assert found == expected
    assert {
        "event": "tuning.env_file_unusable",
        "variable": ENV_VAR,
        "path": str(missing),
        "log_level": "warning",
    } in logs


def test_privileged_process_ignores_the_env_var(
    tmp_path: Path, dirs: tuple[Path, Path, Path]
) -> None:
    """A setuid or setgid process reads neither tuning variable."""
    conf1, _, install = dirs
    _tuning(conf1)
    expected = _tuning(install)
    environ = {ENV_VAR: str(write_file(tmp_path / "mine.toml")), CONFIG_PATH_ENV: str(conf1)}
    with capture_logs() as logs:
        found = find_tuning_file(MODULE, environ=environ, install_tuning=install, privileged=True)
    assert found == expected
    assert [e["variable"] for e in logs if e["event"] == "search_path.ignored_privileged"] == [
        ENV_VAR,
        CONFIG_PATH_ENV,
    ]


def test_config_path_comes_before_the_install_dir(dirs: tuple[Path, Path, Path]) -> None:
    """$IPAD_CONFIG_PATH directories are searched, in order, before the installed files."""
    conf1, conf2, install = dirs
    expected = _tuning(conf2, "imx219.toml")
    _tuning(install, "imx219.toml")
    environ = {CONFIG_PATH_ENV: f"{conf1}:{conf2}"}
    found = find_tuning_file(
        MODULE, "imx219.toml", environ=environ, install_tuning=install, privileged=False
    )
    assert found == expected
    _tuning(conf1, "imx219.toml")
    found = find_tuning_file(
        MODULE, "imx219.toml", environ=environ, install_tuning=install, privileged=False
    )
    assert found == conf1 / MODULE / "imx219.toml"


def test_install_dir_is_used_when_config_path_has_nothing(dirs: tuple[Path, Path, Path]) -> None:
    """The installed tuning file is found when no configured directory holds one."""
    conf1, _, install = dirs
    expected = _tuning(install, "imx219.toml")
    with capture_logs() as logs:
        found = find_tuning_file(
            MODULE,
            "imx219.toml",
            environ={CONFIG_PATH_ENV: str(conf1)},
            install_tuning=install,
            privileged=False,
        )
    assert found == expected
    assert logs == [
        {"event": "tuning.resolved", "module": MODULE, "path": str(expected), "log_level": "debug"}
    ]


def test_directory_is_not_a_tuning_file(dirs: tuple[Path, Path, Path]) -> None:
    """A directory carrying the tuning file's name is passed over."""
    conf1, _, install = dirs
    make_dir(conf1 / MODULE / UNCALIBRATED)
    expected = _tuning(install)
    environ = {CONFIG_PATH_ENV: str(conf1)}
    assert find_tuning_file(MODULE, environ=environ, install_tuning=install) == expected


def test_missing_named_file_falls_back_to_uncalibrated(dirs: tuple[Path, Path, Path]) -> None:
    """A named tuning file found nowhere gives way to uncalibrated.toml, with a warning."""
    conf1, _, install = dirs
    expected = _tuning(install)
    with capture_logs() as logs:
        found = find_tuning_file(
            MODULE,
            "imx219.toml",
            environ={CONFIG_PATH_ENV: str(conf1)},
            install_tuning=install,
            privileged=False,
        )
    assert found == expected
    assert {
        "event": "tuning.fallback_uncalibrated",
        "module": MODULE,
        "wanted": "imx219.toml",
        "path": str(expected),
        "log_level": "warning",
    } in logs


def test_named_file_anywhere_beats_uncalibrated_earlier(dirs: tuple[Path, Path, Path]) -> None:
    """The named file in the install dir wins over uncalibrated.toml in a configured dir."""
    conf1, _, install = dirs
    _tuning(conf1)
    expected = _tuning(install, "imx219.toml")
    environ = {CONFIG_PATH_ENV: str(conf1)}
    found = find_tuning_file(
        MODULE, "imx219.toml", environ=environ, install_tuning=install, privileged=False
    )
    assert found == expected


def test_not_found_lists_every_path_tried(tmp_path: Path, dirs: tuple[Path, Path, Path]) -> None:
    """The error names the variable's file and each directory's candidates, in search order."""
    conf1, conf2, install = dirs
    missing = tmp_path / "missing.toml"
    environ = {ENV_VAR: str(missing), CONFIG_PATH_ENV: f"{conf1}:{conf2}:{conf1}"}
    with pytest.raises(TuningFileNotFound) as info:
        find_tuning_file(
            MODULE, "imx219.toml", environ=environ, install_tuning=install, privileged=False
        )
    expected = (
        missing,
        conf1 / MODULE / "imx219.toml",
        conf2 / MODULE / "imx219.toml",
        install / MODULE / "imx219.toml",
        conf1 / MODULE / UNCALIBRATED,
        conf2 / MODULE / UNCALIBRATED,
        install / MODULE / UNCALIBRATED,
    )
    error = info.value
    assert (error.module, error.tried) == (MODULE, expected)
    assert (
        str(error)
        == f"no tuning file found for module {MODULE!r}; tried:"
        + "".join(f"\n  {path}" for path in expected)
        + f"\n{error.hint}"
    )
    # Where else it could be: the configuration key and both environment variables.
    assert "[daemon] tuning_dirs" in error.hint
    assert f"${CONFIG_PATH_ENV}" in error.hint
    assert f"${ENV_VAR}" in error.hint
    assert isinstance(error, LookupError)


def test_tuning_dirs_are_searched_after_the_config_path_before_the_install(
    tmp_path: Path, dirs: tuple[Path, Path, Path]
) -> None:
    """``tuning_dirs`` (the configuration's) come between $IPAD_CONFIG_PATH and the install."""
    conf1, conf2, install = dirs
    vendor = tmp_path / "vendor"
    _tuning(install)
    found = _tuning(vendor)
    environ = {CONFIG_PATH_ENV: str(conf1)}
    assert find_tuning_file(MODULE, environ=environ, install_tuning=install, privileged=False,
                            tuning_dirs=[vendor]) == found  # fmt: skip
    first = _tuning(conf1)
    assert find_tuning_file(MODULE, environ=environ, install_tuning=install, privileged=False,
                            tuning_dirs=[vendor]) == first  # fmt: skip
    with pytest.raises(TuningFileNotFound) as info:
        find_tuning_file(MODULE, "x.toml", environ={}, install_tuning=conf2, privileged=False,
                         tuning_dirs=[tmp_path / "none"])  # fmt: skip
    assert tmp_path / "none" / MODULE / "x.toml" in info.value.tried


def test_uncalibrated_is_searched_once_when_asked_for(dirs: tuple[Path, Path, Path]) -> None:
    """Without a name there is nothing to fall back from, so each directory is tried once."""
    _, _, install = dirs
    with pytest.raises(TuningFileNotFound) as info:
        find_tuning_file(MODULE, environ={}, install_tuning=install, privileged=False)
    assert info.value.tried == (install / MODULE / UNCALIBRATED,)


def test_install_dir_defaults_to_the_shipped_one() -> None:
    """Without ``install_tuning`` the shipped tuning directory is searched."""
    with pytest.raises(TuningFileNotFound) as info:
        find_tuning_file("no-such-module", environ={}, privileged=False)
    assert info.value.tried == (install_tuning_dir() / "no-such-module" / UNCALIBRATED,)


@pytest.mark.parametrize("name", ["", ".", "..", "../awb/imx219.toml", "/etc/passwd"])
def test_tuning_name_must_be_a_plain_file_name(name: str, dirs: tuple[Path, Path, Path]) -> None:
    """A tuning file name that could leave the module's directory raises ValueError."""
    with pytest.raises(ValueError, match=r"tuning file .* must be a plain file name"):
        find_tuning_file(MODULE, name, environ={}, install_tuning=dirs[2])


@pytest.mark.parametrize("module", ["", "..", "a/b"])
def test_module_must_be_a_plain_file_name(module: str, dirs: tuple[Path, Path, Path]) -> None:
    """A module name that could leave the tuning directory raises ValueError."""
    with pytest.raises(ValueError, match=r"module .* must be a plain file name"):
        find_tuning_file(module, environ={}, install_tuning=dirs[2])
