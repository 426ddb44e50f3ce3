"""The tree type-checks under mypy --strict and passes ruff, as every commit must."""

from __future__ import annotations

import os
import shutil
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


@pytest.mark.timeout(120)
def test_import_contracts() -> None:
    """Each module imports only what its process may (pyproject's [tool.importlinter]).

    A worker or the fork server must start without trio, threads, pathlib or
    any daemon code; the protocol stays sans-I/O; clients never import the
    daemon. A broken rule fails here with lint-imports' report, naming it.
    """
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def lint_imports_on_a_copy(tmp_path: Path, module: str, line: str) -> str:
    """lint-imports' report on a copy of ipad in which ``module`` got ``line`` added."""
    shutil.copytree(REPO / "ipad", tmp_path / "ipad",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    target = tmp_path / (module.replace(".", "/") + ".py")
    target.write_text(target.read_text() + f"\n{line}\n")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0, result.stdout
    return result.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("module", "line", "rule"),
    [
        ("ipad.worker.sandbox", "import trio", "Workers and the fork server start fast"),
        ("ipad.worker.host", "import threading", "Workers and the fork server start fast"),
        ("ipad.protocol.wire", "import ipad.daemon.events", "The protocol is sans-I/O"),
        ("ipad.client._blocking", "import ipad.daemon.runtime", "Clients never import the daemon"),
        (
            "ipad.client._core",
            "import trio",
            "The blocking client and the client core import no trio",
        ),
        (
            "ipad.config.check",
            "import ipad.daemon.supervisor",
            "Configuration is loaded and checked",
        ),
        ("ipad.daemon.events", "import ipad.daemon.server", "No import cycles"),
        ("ipad.conformance.worker", "import ipad.client", "The conformance kit judges peers"),
    ],
)
def test_a_broken_rule_is_named(tmp_path: Path, module: str, line: str, rule: str) -> None:
    """Each rule catches what it forbids, and the report names the rule broken."""
    report = lint_imports_on_a_copy(tmp_path, module, line)
    broken = report[report.index("Broken contracts") :]
    assert rule in broken, report


def test_starting_a_worker_imports_no_trio() -> None:
    """What a worker, the fork server and the jail import at start, checked in a fresh interpreter."""
    code = (
        "import sys, ipad.worker.host, ipad.worker.forkserver, ipad.worker.jail; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'trio', 'structlog', 'attrs', 'cattrs'} or m in {'threading', 'pathlib'}); "
        "print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=REPO, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    assert result.stdout.strip() == "[]", result.stdout
