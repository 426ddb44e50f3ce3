"""The ``[daemon] tuning_dirs`` key: absolute directories only, searched by the check."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipad.config.loader import parse_config
from ipad.config.problems import ConfigError


def test_relative_tuning_dirs_are_refused_naming_the_key_and_file(tmp_path: Path) -> None:
    """A relative entry is an error at its index, in the config file; absolute ones load."""
    path = tmp_path / "config.toml"
    with pytest.raises(ConfigError) as info:
        parse_config('[daemon]\ntuning_dirs = ["/abs", "vendor/tuning"]\n', path)
    [problem] = info.value.problems
    assert problem.file == path
    assert problem.key == "daemon.tuning_dirs[1]"
    assert "'vendor/tuning' is relative" in str(problem)
    config = parse_config('[daemon]\ntuning_dirs = ["/abs"]\n', path)
    assert config.daemon.tuning_dirs == (Path("/abs"),)
