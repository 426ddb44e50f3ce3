"""Whole-config checks: a config passes only if every enabled module can really be run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ipad.config.check import check_config
from ipad.config.problems import ConfigError

from .helpers_fs import make_dir, write_executable, write_file, write_manifest


def setup_tree(root: Path) -> Path:
    """A config with one module whose manifest, worker and tuning file all exist."""
    write_manifest(make_dir(root / "mods"), "cam", worker="cam-worker")
    write_executable(make_dir(root / "bin") / "cam-worker")
    write_file(root / "tuning" / "cam" / "uncalibrated.toml", "gain = 1\n")
    config = root / "c.toml"
    config.write_text('[daemon]\nmodule_dirs = ["mods"]\nworker_dirs = ["bin"]\n[modules.cam]\n')
    return config


def env_for(root: Path) -> dict[str, str]:
    """Environment pointing the tuning search at the test tree."""
    return {"IPAD_CONFIG_PATH": str(root / "tuning")}


def test_complete_module_is_planned(tmp_path: Path) -> None:
    """A module with manifest, worker and tuning file gets a plan naming each of them."""
    root = make_dir(tmp_path / "t")
    checked = check_config(setup_tree(root), environ=env_for(root))
    plan = checked.plans["cam"]
    assert plan.source.manifest.name == "cam"
    assert plan.worker == root.resolve() / "bin" / "cam-worker"
    assert plan.tuning == root / "tuning" / "cam" / "uncalibrated.toml"


def test_disabled_module_is_not_checked_on_disk(tmp_path: Path) -> None:
    """A disabled module need not exist; it is still schema-checked."""
    config = tmp_path / "c.toml"
    config.write_text("[modules.ghost]\nenabled = false\n")
    assert check_config(config, environ={}).plans == {}


def test_missing_manifest_names_searched_dirs(tmp_path: Path) -> None:
    """An enabled module without a manifest is an error listing where it was looked for."""
    root = make_dir(tmp_path / "t")
    config = setup_tree(root)
    config.write_text(config.read_text() + "[modules.ghost]\n")
    with pytest.raises(ConfigError) as info:
        check_config(config, environ=env_for(root))
    [problem] = info.value.problems
    assert problem.key == "modules.ghost"
    assert problem.message == "no manifest ghost.toml found"
    assert str(root.resolve() / "mods") in str(problem.expected)


def test_broken_manifest_is_explained(tmp_path: Path) -> None:
    """When the module's manifest exists but is invalid, its own problems are shown."""
    root = make_dir(tmp_path / "t")
    config = setup_tree(root)
    write_manifest(root / "mods", "cam", api_version=7)
    with pytest.raises(ConfigError) as info:
        check_config(config, environ=env_for(root))
    keys = [(p.file.name, p.key) for p in info.value.problems]
    assert keys == [("c.toml", "modules.cam"), ("cam.toml", "api_version")]


def test_unresolvable_worker_lists_attempts(tmp_path: Path) -> None:
    """A worker that is not found, or not acceptable, is reported with every path tried."""
    root = make_dir(tmp_path / "t")
    config = setup_tree(root)
    (root / "bin" / "cam-worker").chmod(0o777)
    with pytest.raises(ConfigError) as info:
        check_config(config, environ=env_for(root))
    [problem] = info.value.problems
    assert problem.key == "modules.cam.worker"
    assert "no usable worker executable 'cam-worker'" in problem.message
    assert f"{root.resolve() / 'bin' / 'cam-worker'}: writable by" in str(problem.expected)


def test_worker_override_in_config(tmp_path: Path) -> None:
    """`worker` in the module table replaces the manifest's worker name."""
    root = make_dir(tmp_path / "t")
    config = setup_tree(root)
    write_executable(root / "bin" / "other-worker")
    config.write_text(config.read_text() + 'worker = "other-worker"\n')
    checked = check_config(config, environ=env_for(root))
    assert checked.plans["cam"].worker.name == "other-worker"


def test_missing_tuning_file(tmp_path: Path) -> None:
    """No tuning file anywhere is an error naming the paths tried."""
    root = make_dir(tmp_path / "t")
    config = setup_tree(root)
    (root / "tuning" / "cam" / "uncalibrated.toml").unlink()
    with pytest.raises(ConfigError) as info:
        check_config(config, environ=env_for(root))
    [problem] = info.value.problems
    assert problem.key == "modules.cam.tuning"
    assert str(root / "tuning" / "cam" / "uncalibrated.toml") in str(problem.expected)


@pytest.mark.timeout(60)
def test_check_config_command_on_a_full_tree(tmp_path: Path) -> None:
    """`ipad --check-config` lists the planned modules, and fails when a worker goes missing."""
    root = make_dir(tmp_path / "t")
    config = setup_tree(root)
    env = {"IPAD_CONFIG_PATH": str(root / "tuning"), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "ipad", "--check-config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{config}: ok (modules: cam)\n"
    (root / "bin" / "cam-worker").unlink()
    bad = subprocess.run(
        [sys.executable, "-m", "ipad", "--check-config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith(f"{config}: modules.cam.worker: no usable worker executable")
