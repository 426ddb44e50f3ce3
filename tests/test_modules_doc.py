"""docs/modules.md runs as written: its tutorial project is built from it and its tests pass.

The convention (shared with every section of docs/modules.md): a fenced block
whose line just before is ``<!-- file: PATH -->`` is the file PATH of the
tutorial project ("af"), written out as shown; every other ``python`` block is
a standalone snippet, run with the project importable; a ``sh`` block whose
line just before is ``<!-- run -->`` is run by bash in the project's root; a
``toml`` block that is not a file must at least parse. Then the project's own
tests run with pytest in a subprocess, bounded in time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import attrs
import pytest

from ipad.client import BlockingClient, make_buffer
from tests.daemon_process import DaemonProcess, write_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "modules.md"
FILE_MARKER = re.compile(r"<!-- file: (?P<path>\S+) -->")
RUN_MARKER = "<!-- run -->"
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
#: The files the tutorial must have: a module written only from the docs.
TUTORIAL = {"af/af.toml", "af/ipa_af/__init__.py", "af/tuning/af/uncalibrated.toml",
            "tests/test_af.py"}  # fmt: skip
#: Every subprocess is bounded; the project's test run starts daemons after the merge.
SNIPPET_TIMEOUT = 60
PROJECT_TIMEOUT = 300

pytestmark = pytest.mark.timeout(PROJECT_TIMEOUT + 60)


@attrs.frozen
class Block:
    """One fenced block: its language, text, line number, and what the line before marks."""

    lang: str
    text: str
    line: int
    file: str | None
    run: bool


def blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the marker on the line before it."""
    found: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and not lines[index].startswith("```"):
            index += 1
        if index == len(lines):
            raise AssertionError(f"docs/modules.md:{start + 1}: unclosed code block")
        before = lines[start - 1].strip() if start else ""
        marker = FILE_MARKER.fullmatch(before)
        body = "\n".join(lines[start + 1 : index]) + "\n"
        found.append(Block(fence["lang"], body, start + 1, marker and marker["path"],
                           before == RUN_MARKER))  # fmt: skip
        index += 1
    return found


def write_project(project: Path, doc_blocks: list[Block]) -> set[str]:
    """Write every file block into ``project``; the relative paths written."""
    written: set[str] = set()
    for block in doc_blocks:
        if block.file is None:
            continue
        relative = PurePosixPath(block.file)
        assert not relative.is_absolute(), block.file
        assert ".." not in relative.parts, block.file
        assert block.file not in written, f"line {block.line}: {block.file} written twice"
        target = project / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text)
        written.add(block.file)
    return written


def project_env(project: Path) -> dict[str, str]:
    """The environment the snippets and tests run in: the project importable, ipadctl on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IPAD_", "PYTEST_"))}
    paths = [str(project / "af"), str(project), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run(args: list[str], project: Path, timeout: float, what: str) -> str:
    """Run ``args`` in the project; fail with its output unless it exits 0."""
    done = subprocess.run(args, cwd=project, env=project_env(project), capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{output}"
    return output


def test_every_block_has_a_meaning() -> None:
    """Markers sit just before a block, the tutorial is whole, the shared headings are there."""
    text = DOC.read_text()
    doc_blocks = blocks(text)
    marked = {b.file for b in doc_blocks if b.file}
    assert marked >= TUTORIAL
    lines = [line.strip() for line in text.splitlines()]
    files = sum(1 for line in lines if FILE_MARKER.fullmatch(line))
    assert files == len(marked), "a file marker not just before its block"
    assert lines.count(RUN_MARKER) == sum(b.run for b in doc_blocks)
    for heading in ("## Logging", "## Testing under a real daemon", "## Starting from a template"):
        assert re.search(f"^{re.escape(heading)}", text, re.MULTILINE), heading
    for linking in (ROOT / "README.md", ROOT / "docs" / "architecture.md"):
        assert "modules.md" in linking.read_text(), f"{linking.name} does not link docs/modules.md"


def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    """Files written, snippets and commands run, then the project's tests pass with pytest."""
    project = tmp_path / "project"
    project.mkdir()
    doc_blocks = blocks(DOC.read_text())
    write_project(project, doc_blocks)
    for block in doc_blocks:
        where = f"docs/modules.md:{block.line}"
        if block.file is not None:
            continue
        if block.lang == "python":
            run([sys.executable, "-c", block.text], project, SNIPPET_TIMEOUT, where)
        elif block.lang == "sh" and block.run:
            run(["bash", "-euo", "pipefail", "-c", block.text], project, SNIPPET_TIMEOUT, where)
        elif block.lang == "toml":
            tomllib.loads(block.text)
    output = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(project),
         "tests"],
        project, PROJECT_TIMEOUT, "the tutorial project's tests",
    )  # fmt: skip
    assert re.search(r"\b\d+ passed\b", output), output
    assert not re.search(r"\b(failed|error|skipped)\b", output.splitlines()[-1]), output


def test_the_tutorial_module_runs_sandboxed_under_a_real_daemon(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess], daemon_env: dict[str, str]
) -> None:
    """The af module, as docs/modules.md ships it, is served by a daemon in a sandbox."""
    project = tmp_path / "project"
    project.mkdir()
    write_project(project, blocks(DOC.read_text()))
    for path in [tmp_path, *project.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the sandboxed worker is nobody
    modules = project / "af"
    config = write_config(
        tmp_path,
        f'[daemon]\nmodule_dirs = ["{modules}"]\n',
        modules='[modules.af]\nproxy = "sandboxed"\ntuning = "uncalibrated.toml"\n',
    )
    env = {**daemon_env, "IPAD_CONFIG_PATH": str(modules / "tuning")}
    daemon = start_daemon(config, env=env)
    daemon.wait_for("worker.ready", lambda r: r.get("module") == "af")
    with BlockingClient(daemon.socket) as client:
        af = client.request_proxy("af")
        assert af.info.module_version == "0.1.0"
        af.call("configure", {"lens": {"min_position": 0, "max_position": 1000}})
        fd = make_buffer(bytes([0, 255] * 16))
        try:
            result = af.call("process_stats", {"frame": 1}, fds={"stats": fd})
        finally:
            os.close(fd)
        assert (result.lens_position, result.converged) == (64, False)
