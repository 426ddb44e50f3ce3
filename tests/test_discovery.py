"""Tests for discovering IPA modules along the module search path."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ipad.config.discovery import MODULE_PATH_ENV, Shadowed, discover_modules
from ipad.config.paths import install_module_dir

from .helpers_fs import make_dir, write_file, write_manifest


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Three empty module directories: installed, configured and one for the environment."""
    return (
        make_dir(tmp_path / "install"),
        make_dir(tmp_path / "configured"),
        make_dir(tmp_path / "env"),
    )


def test_modules_are_found_in_every_directory_in_search_order(
    dirs: tuple[Path, Path, Path],
) -> None:
    """Modules from the install, configured and environment directories are all found, in order."""
    install, configured, env = dirs
    write_manifest(env, "agc")
    write_manifest(configured, "lsc")
    write_manifest(install, "awb")
    write_manifest(install, "af")
    found = discover_modules(
        install=install,
        module_dirs=[configured],
        environ={MODULE_PATH_ENV: str(env)},
        privileged=False,
    )
    assert list(found.modules) == ["af", "awb", "lsc", "agc"]
    assert found.modules["lsc"].path == configured / "lsc.toml"
    assert found.modules["lsc"].manifest.name == "lsc"
    assert found.searched == (install, configured, env)
    assert found.rejected == ()
    assert found.shadowed == ()


def test_earlier_directory_shadows_later_one(dirs: tuple[Path, Path, Path]) -> None:
    """The first directory holding a module wins; the later copies are recorded and logged."""
    install, configured, env = dirs
    for directory in dirs:
        write_manifest(directory, "awb")
    with capture_logs() as logs:
        found = discover_modules(
            install=install,
            module_dirs=[configured],
            environ={MODULE_PATH_ENV: str(env)},
            privileged=False,
        )
    assert found.modules["awb"].path == install / "awb.toml"
    assert found.shadowed == (
        Shadowed("awb", configured / "awb.toml", install / "awb.toml"),
        Shadowed("awb", env / "awb.toml", install / "awb.toml"),
    )
    assert [e for e in logs if e["event"] == "module.shadowed"] == [
        {
            "event": "module.shadowed",
            "module": "awb",
            "path": str(directory / "awb.toml"),
            "shadowed_by": str(install / "awb.toml"),
            "log_level": "warning",
        }
        for directory in (configured, env)
    ]


def test_environment_entries_are_searched_in_their_order(tmp_path: Path) -> None:
    """Of two $IPAD_MODULE_PATH entries holding a module, the one listed first wins."""
    install, first, second = (make_dir(tmp_path / n) for n in ("install", "first", "second"))
    write_manifest(first, "awb")
    write_manifest(second, "awb")
    environ = {MODULE_PATH_ENV: f"{second}:{first}"}
    found = discover_modules(install=install, environ=environ, privileged=False)
    assert found.modules["awb"].path == second / "awb.toml"


def test_invalid_manifest_is_rejected_and_discovery_continues(
    dirs: tuple[Path, Path, Path],
) -> None:
    """A broken manifest is recorded and logged while the files after it are still read."""
    install, _, _ = dirs
    write_manifest(install, "aaa", api_version=7)
    write_file(install / "bad.toml", "this is not toml")
    write_manifest(install, "zzz")
    with capture_logs() as logs:
        found = discover_modules(install=install, environ={}, privileged=False)
    assert list(found.modules) == ["zzz"]
    assert [err.problems[0].file for err in found.rejected] == [
        install / "aaa.toml",
        install / "bad.toml",
    ]
    rejected = [e for e in logs if e["event"] == "manifest.rejected"]
    assert [e["path"] for e in rejected] == [str(install / "aaa.toml"), str(install / "bad.toml")]
    assert rejected[0]["problems"] == [
        f"{install / 'aaa.toml'}: api_version: unsupported api_version 7 (one of: 1)"
    ]
    assert all(e["log_level"] == "warning" for e in rejected)


def test_invalid_manifest_does_not_shadow_a_valid_later_one(
    dirs: tuple[Path, Path, Path],
) -> None:
    """A broken copy early in the path leaves a valid copy later in the path in use."""
    install, configured, _ = dirs
    write_manifest(install, "awb", version="latest")
    write_manifest(configured, "awb")
    found = discover_modules(
        install=install, module_dirs=[configured], environ={}, privileged=False
    )
    assert found.modules["awb"].path == configured / "awb.toml"
    assert found.shadowed == ()
    assert len(found.rejected) == 1


def test_relative_environment_entries_are_ignored(dirs: tuple[Path, Path, Path]) -> None:
    """A relative $IPAD_MODULE_PATH entry is neither searched nor silently dropped."""
    install, _, env = dirs
    write_manifest(env, "agc")
    with capture_logs() as logs:
        found = discover_modules(
            install=install,
            environ={MODULE_PATH_ENV: f"modules:{env}"},
            privileged=False,
        )
    assert found.searched == (install, env)
    assert list(found.modules) == ["agc"]
    assert {
        "event": "search_path.relative_entry_ignored",
        "variable": MODULE_PATH_ENV,
        "entry": "modules",
        "log_level": "warning",
    } in logs


def test_privileged_process_ignores_the_environment(dirs: tuple[Path, Path, Path]) -> None:
    """A setuid or setgid process loads no module found through $IPAD_MODULE_PATH."""
    install, _, env = dirs
    write_manifest(env, "agc")
    found = discover_modules(install=install, environ={MODULE_PATH_ENV: str(env)}, privileged=True)
    assert found.modules == {}
    assert found.searched == (install,)


def test_missing_directories_are_skipped(tmp_path: Path) -> None:
    """A directory that does not exist is searched in name only and logged at debug."""
    install = tmp_path / "absent"
    configured = make_dir(tmp_path / "configured")
    write_manifest(configured, "awb")
    with capture_logs() as logs:
        found = discover_modules(
            install=install, module_dirs=[configured], environ={}, privileged=False
        )
    assert list(found.modules) == ["awb"]
    assert found.searched == (install, configured)
    assert {"event": "module_dir.missing", "directory": str(install), "log_level": "debug"} in logs


def test_only_visible_toml_files_are_manifests(dirs: tuple[Path, Path, Path]) -> None:
    """Other files and hidden files such as editor lock files are not read."""
    install, _, _ = dirs
    write_manifest(install, "awb")
    write_file(install / "README.md", "# modules\n")
    write_file(install / "awb.toml.orig", "junk")
    write_file(install / ".#awb.toml", "junk")
    found = discover_modules(install=install, environ={}, privileged=False)
    assert list(found.modules) == ["awb"]
    assert found.rejected == ()


def test_install_dir_defaults_to_the_shipped_one() -> None:
    """Without ``install`` the first directory searched is ipad's module directory."""
    found = discover_modules(environ={}, privileged=False)
    assert found.searched == (install_module_dir(),)


def test_relative_configured_dir_is_refused() -> None:
    """Configured module directories must already be absolute."""
    with pytest.raises(ValueError, match="must be an absolute path"):
        discover_modules(module_dirs=[Path("modules")], environ={})
