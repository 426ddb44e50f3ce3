"""Problems found in a user's file, and the one error that carries all of them.

A configuration or manifest is checked completely before anything is reported,
so a user fixes every mistake in one pass instead of one per run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

#: How close a misspelt key must be to a known one to be suggested (difflib ratio).
SUGGESTION_CUTOFF = 0.6


@attrs.frozen
class Problem:
    """One thing wrong in one file, located by a dotted key path."""

    file: Path
    key: str
    message: str
    expected: str | None = None

    def __str__(self) -> str:
        text = f"{self.file}: {self.key}: {self.message}"
        if self.expected:
            text += f" ({self.expected})"
        return text


class ProblemsError(Exception):
    """A file could not be used; ``problems`` says every reason, each with its key."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        if not problems:
            raise ValueError("ProblemsError needs at least one problem")
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(ProblemsError):
    """The daemon configuration is invalid."""


class ManifestError(ProblemsError):
    """An IPA module manifest is invalid."""


def join_key(parent: str, child: str | int) -> str:
    """Extend a dotted key path, quoting names that are not bare TOML keys."""
    if isinstance(child, int):
        return f"{parent}[{child}]"
    part = child if _is_bare_key(child) else '"' + child.replace('"', '\\"') + '"'
    return f"{parent}.{part}" if parent else part


def _is_bare_key(name: str) -> bool:
    return bool(name) and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """Return the known name closest to a misspelt one, if any is close enough."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=SUGGESTION_CUTOFF)
    return matches[0] if matches else None
