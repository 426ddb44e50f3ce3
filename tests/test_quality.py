"""The tree type-checks under mypy --strict and passes ruff, as every commit must."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_strict() -> None:
    """Mypy --strict finds no error in ipad/, tests/ and workers/ (see pyproject)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_ruff() -> None:
    """Ruff's broad rule set finds nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_ruff_format() -> None:
    """The code is formatted as `ruff format` would write it."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "ipad", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
