"""Tests for reading search directories from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ipad.config.search_path import (
    check_plain_name,
    dirs_from_env,
    is_plain_name,
    is_privileged,
    secure_getenv,
)

VAR = "IPAD_TEST_PATH"


@pytest.mark.parametrize(
    ("uid", "euid", "gid", "egid", "expected"),
    [
        (0, 0, 0, 0, False),
        (1000, 1000, 100, 100, False),
        (1000, 0, 100, 100, True),
        (1000, 1000, 100, 0, True),
        (0, 1000, 0, 100, True),
    ],
)
def test_is_privileged_compares_real_and_effective_ids(
    uid: int, euid: int, gid: int, egid: int, expected: bool
) -> None:
    """A process is privileged exactly when its real and effective user or group differ."""
    assert is_privileged(uid, euid, gid, egid) is expected


def test_is_privileged_defaults_to_the_running_process() -> None:
    """Ids left out are the running process's own."""
    expected = os.getuid() != os.geteuid() or os.getgid() != os.getegid()
    assert is_privileged() is expected


@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_variable_gives_no_dirs(value: str | None) -> None:
    """An unset or empty variable adds no directories and logs nothing."""
    environ = {} if value is None else {VAR: value}
    with capture_logs() as logs:
        assert dirs_from_env(VAR, environ, privileged=False) == []
    assert logs == []


def test_empty_entries_are_skipped_silently() -> None:
    """Doubled, leading and trailing colons add nothing and warn about nothing."""
    with capture_logs() as logs:
        dirs = dirs_from_env(VAR, {VAR: "::/a::/b:"}, privileged=False)
    assert dirs == [Path("/a"), Path("/b")]
    assert logs == []


def test_relative_entries_are_ignored_with_a_warning() -> None:
    """A relative entry is dropped and each one is named in a warning."""
    with capture_logs() as logs:
        dirs = dirs_from_env(VAR, {VAR: "rel:/abs:./here:~/x"}, privileged=False)
    assert dirs == [Path("/abs")]
    warnings = [
        (e["event"], e["variable"], e["entry"]) for e in logs if e["log_level"] == "warning"
    ]
    assert warnings == [
        ("search_path.relative_entry_ignored", VAR, "rel"),
        ("search_path.relative_entry_ignored", VAR, "./here"),
        ("search_path.relative_entry_ignored", VAR, "~/x"),
    ]


def test_privileged_process_ignores_the_variable_with_a_warning() -> None:
    """A setuid or setgid process takes no directories from the environment and says so."""
    with capture_logs() as logs:
        dirs = dirs_from_env(VAR, {VAR: "/a:/b"}, privileged=True)
    assert dirs == []
    assert logs == [
        {"event": "search_path.ignored_privileged", "variable": VAR, "log_level": "warning"}
    ]


def test_order_is_kept_and_duplicates_removed_keeping_the_first() -> None:
    """Directories come out in the variable's order, each once at its first position."""
    dirs = dirs_from_env(VAR, {VAR: "/b:/a:/b/:/c:/a"}, privileged=False)
    assert dirs == [Path("/b"), Path("/a"), Path("/c")]


def test_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping the process environment is used."""
    monkeypatch.setenv(VAR, "/from/env")
    assert dirs_from_env(VAR, privileged=False) == [Path("/from/env")]
    assert secure_getenv(VAR, privileged=False) == "/from/env"


_ENTRY = st.text(alphabet="/ab.", max_size=6)


@given(st.lists(_ENTRY, max_size=8))
def test_result_is_the_ordered_unique_absolute_entries(entries: list[str]) -> None:
    """For any variable, the result is its absolute entries, in order, without repeats."""
    with capture_logs():
        dirs = dirs_from_env(VAR, {VAR: ":".join(entries)}, privileged=False)
    expected = list(dict.fromkeys(Path(e) for e in entries if e.startswith("/")))
    assert dirs == expected


@pytest.mark.parametrize("name", ["ipad-worker", "a.b", "...", "x y", ".hidden"])
def test_plain_names_are_accepted(name: str) -> None:
    """Names that stay inside the directory they are joined onto are plain."""
    assert is_plain_name(name)
    check_plain_name(name, "worker")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "dir/", "a\0b"])
def test_names_that_leave_the_directory_are_refused(name: str) -> None:
    """Empty, dot, dot-dot, slashed and NUL-bearing names raise ValueError naming the role."""
    assert not is_plain_name(name)
    with pytest.raises(ValueError, match=r"worker .* must be a plain file name"):
        check_plain_name(name, "worker")
