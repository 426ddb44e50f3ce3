"""The Python examples of docs/modules-logging.md run, as written, and their tests pass."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "modules-logging.md"


def examples() -> list[str]:
    """The doc's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_the_logging_examples_run(caplog: pytest.LogCaptureFixture) -> None:
    """The example module is importable as written and the example test passes on it."""
    blocks = examples()
    assert len(blocks) == 2
    namespace: dict[str, Any] = {"__name__": "docs_modules_logging"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the doc's own code
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    for test in tests:
        test(caplog)
