"""The ``isolation`` key of a module: validated like its neighbours, "module" by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipad.config.loader import parse_config
from ipad.config.model import Isolation
from ipad.config.problems import ConfigError


def test_isolation_defaults_to_one_worker_per_module(tmp_path: Path) -> None:
    """Without the key a module keeps today's behaviour: one shared worker."""
    config = parse_config("[modules.awb]\n", tmp_path / "c.toml")
    assert config.modules["awb"].isolation is Isolation.MODULE


def test_isolation_per_proxy_is_read(tmp_path: Path) -> None:
    """``isolation = "proxy"`` is read for that module only."""
    text = '[modules.awb]\nisolation = "proxy"\n[modules.agc]\n'
    config = parse_config(text, tmp_path / "c.toml")
    assert config.modules["awb"].isolation is Isolation.PROXY
    assert config.modules["agc"].isolation is Isolation.MODULE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("'camera'", "got 'camera' (one of 'module', 'proxy')"),
        ("1", "got 1 (one of 'module', 'proxy')"),
    ],
)
def test_a_bad_isolation_names_key_and_file(tmp_path: Path, value: str, expected: str) -> None:
    """A value other than "module" or "proxy" is an error naming the file, the key and the choices."""
    path = tmp_path / "c.toml"
    with pytest.raises(ConfigError) as info:
        parse_config(f"[modules.awb]\nisolation = {value}\n", path)
    [problem] = [str(p) for p in info.value.problems]
    assert problem.startswith(f"{path}: modules.awb.isolation: {expected}")
