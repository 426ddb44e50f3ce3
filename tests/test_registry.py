"""Proxy kinds: registration by decorator and by entry point, and the first kind."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ipad.config.kind_isolated import IsolatedProcess, is_python_script
from ipad.config.proxy_kinds import REGISTRY, DuplicateProxyKind, ProxyKind, ProxyRegistry


class _Plain(ProxyKind):
    def worker_argv(self, executable: Path) -> list[str]:
        return [str(executable), "--plain"]


def test_decorator_registers_and_names() -> None:
    """A decorated class is found by name and told its name."""
    registry = ProxyRegistry(group="ipad.tests.none")

    @registry.register("plain")
    class Plain(_Plain):
        pass

    assert registry.kinds() == {"plain": Plain}
    assert Plain.name == "plain"
    created = registry.create("plain")
    assert isinstance(created, Plain)
    assert created.worker_argv(Path("/w")) == ["/w", "--plain"]


def test_duplicate_name_is_an_error() -> None:
    """Registering a name twice raises and keeps the first registration."""
    registry = ProxyRegistry(group="ipad.tests.none")
    registry.add("plain", _Plain)

    class Other(_Plain):
        pass

    with pytest.raises(DuplicateProxyKind, match=r"'plain' is already registered by .*_Plain"):
        registry.add("plain", Other)
    assert registry.kinds()["plain"] is _Plain


def test_non_proxy_class_is_refused() -> None:
    """Only ProxyKind subclasses can be registered."""
    registry = ProxyRegistry(group="ipad.tests.none")
    with pytest.raises(TypeError, match="not a ProxyKind subclass"):
        registry.add("bad", int)  # type: ignore[arg-type]


def test_unknown_kind_lists_registered() -> None:
    """Asking for an unknown kind names the registered ones."""
    registry = ProxyRegistry(group="ipad.tests.none")
    registry.add("plain", _Plain)
    with pytest.raises(LookupError, match="unknown proxy kind 'jail'; registered: plain"):
        registry.create("jail")


def test_builtin_isolated_kind_is_registered() -> None:
    """The daemon's registry has the isolated kind once it is first consulted."""
    assert REGISTRY.kinds()["isolated"] is IsolatedProcess


def _write_plugin(root: Path, dist: str, entries: str, code: str) -> None:
    """Install a real (if tiny) distribution with entry points into ``root``."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entries)
    (root / f"{dist}.py").write_text(code)


PLUGIN_CODE = """
from pathlib import Path
from ipad.config.proxy_kinds import ProxyKind

class Jail(ProxyKind):
    def worker_argv(self, executable: Path) -> list[str]:
        return ["jail", str(executable)]

class NotAKind:
    pass
"""


def test_entry_point_kinds_are_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party package adds a kind through the ipad.proxies entry-point group."""
    group = "ipad.tests.proxies_good"
    _write_plugin(tmp_path, "ipadjail", f"[{group}]\njail = ipadjail:Jail\n", PLUGIN_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ProxyRegistry(group=group)
    kinds = registry.kinds()
    assert set(kinds) == {"jail"}
    assert registry.create("jail").worker_argv(Path("/w")) == ["jail", "/w"]
    sys.modules.pop("ipadjail", None)


def test_bad_entry_points_are_logged_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin that fails to import, is not a kind, or takes a used name is skipped with an error."""
    group = "ipad.tests.proxies_bad"
    entries = (
        f"[{group}]\nbroken = ipadbroken_missing:Nope\nodd = ipadbad:NotAKind\n"
        "isolated = ipadbad:Jail\ngood = ipadbad:Jail\n"
    )
    _write_plugin(tmp_path, "ipadbad", entries, PLUGIN_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = ProxyRegistry(group=group)
    registry.add("isolated", IsolatedProcess)
    with capture_logs() as logs:
        kinds = registry.kinds()
    assert set(kinds) == {"isolated", "good"}
    assert kinds["isolated"] is IsolatedProcess
    events = {(e["event"], e["proxy"]) for e in logs if e["log_level"] == "error"}
    assert events == {
        ("proxy.entry_point_failed", "broken"),
        ("proxy.entry_point_rejected", "odd"),
        ("proxy.entry_point_rejected", "isolated"),
    }
    sys.modules.pop("ipadbad", None)


def test_isolated_starts_python_scripts_with_this_interpreter(tmp_path: Path) -> None:
    """A Python worker is run by sys.executable in isolated mode; anything else directly."""
    script = tmp_path / "py-worker"
    script.write_text("#!/usr/bin/env python3\nprint('hi')\n")
    binary = tmp_path / "bin-worker"
    binary.write_bytes(b"\x7fELF\x02\x01\x01")
    shell = tmp_path / "sh-worker"
    shell.write_text("#!/bin/sh\nexit 0\n")
    kind = IsolatedProcess()
    assert kind.worker_argv(script) == [sys.executable, "-I", str(script)]
    assert kind.worker_argv(binary) == [str(binary)]
    assert kind.worker_argv(shell) == [str(shell)]
    assert is_python_script(tmp_path / "missing") is False
