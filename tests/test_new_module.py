"""`ipadctl new-module NAME DIR`: a project whose manifest is valid and whose daemon tests pass.

The generated in-process test (tests/test_NAME.py) needs ipad.testing.ModuleHarness;
here only the daemon-based test file runs, by name, in a bounded pytest subprocess.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipad.cli.ctl import main
from ipad.cli.new_module import class_name, package_name
from ipad.config.manifest import load_manifest

pytestmark = pytest.mark.timeout(120)


def generate(name: str, directory: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipad.cli.ctl", "new-module", *options, name, str(directory)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IPAD_")}


@pytest.mark.parametrize("name", ["af", "2a-x"])
def test_generated_daemon_tests_pass(tmp_path: Path, name: str) -> None:
    """All the generated project's tests, in-process and under a real daemon, pass as generated."""
    project = tmp_path / "project"
    result = generate(name, project)
    assert result.returncode == 0, result.stderr
    ident = name.replace("-", "_")
    for test in (f"tests/test_{ident}.py", f"tests/test_{ident}_daemon.py"):
        assert str(project / test) in result.stdout.splitlines()
    run = subprocess.run(  # as docs/modules.md says: cd DIR && python -m pytest
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=60"],
        cwd=project, env=clean_env(), capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "5 passed" in run.stdout  # 2 in-process, 3 under the daemon


def test_generated_project_layout_and_manifest(tmp_path: Path) -> None:
    """Manifest, package, tuning file and both tests are where docs/modules.md says; all valid."""
    project = tmp_path / "af"
    project.mkdir()  # an existing empty directory is fine
    assert main(["new-module", "af", str(project)]) == 0
    files = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file())
    assert files == [
        "af/af.toml",
        "af/ipa_af/__init__.py",
        "af/tuning/af/uncalibrated.toml",
        "pyproject.toml",
        "tests/test_af.py",
        "tests/test_af_daemon.py",
    ]
    manifest = load_manifest(project / "af" / "af.toml")
    assert (manifest.name, manifest.version, manifest.entry_point) == ("af", "0.1.0", "ipa_af:Af")
    module = ast.parse((project / "af" / "ipa_af" / "__init__.py").read_text())
    version = [n.value for n in module.body if isinstance(n, ast.Assign)
               and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["__version__"]]  # fmt: skip
    assert [v.value for v in version if isinstance(v, ast.Constant)] == [manifest.version]
    harness_test = (project / "tests" / "test_af.py").read_text()
    assert "from ipad.testing import ModuleHarness" in harness_test
    assert "skip" not in harness_test
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nmodule_dirs = ["{project / "af"}"]\n[modules.af]\n'
                      'proxy = "sandboxed"\n')  # fmt: skip
    check = subprocess.run(
        [sys.executable, "-m", "ipad", "--check-config", str(config)],
        env={**clean_env(), "IPAD_CONFIG_PATH": str(project / "af" / "tuning")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "modules: af" in check.stdout


@pytest.mark.parametrize("name", ["a/b", "-af", "", "a b", "af.x", "é", "../af"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    """A name a manifest could not have is a usage error (2), and nothing is written."""
    result = generate(name, tmp_path / "project", "--")  # "--": "-af" is not an option
    assert result.returncode == 2
    assert f"invalid module name {name!r}" in result.stderr
    assert not (tmp_path / "project").exists()


def test_non_empty_directory_is_refused(tmp_path: Path) -> None:
    """A directory with anything in it, or a file, is refused (1) and left as it was."""
    (tmp_path / "keep.txt").write_text("mine")
    result = generate("af", tmp_path)
    assert result.returncode == 1
    assert "is not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    result = generate("af", tmp_path / "keep.txt")
    assert result.returncode == 1
    assert "is not a directory" in result.stderr


def test_python_names() -> None:
    """Package and class names are identifiers for every valid module name."""
    for name in ["af", "my-af", "3a", "a_b-c", "X"]:
        assert package_name(name).isidentifier()
        assert class_name(name).isidentifier()
    assert (package_name("my-af"), class_name("my-af")) == ("ipa_my_af", "MyAf")
    assert class_name("3a") == "Ipa3a"


def test_help_describes_it(capsys: pytest.CaptureFixture[str]) -> None:
    """`ipadctl new-module --help` says what it writes and its exit statuses."""
    with pytest.raises(SystemExit):
        main(["new-module", "--help"])
    out = capsys.readouterr().out
    assert "module package with __version__" in " ".join(out.split())
    assert "2 if NAME is not a valid module name" in " ".join(out.split())


#: A fenced block right after ``<!-- file: PATH -->`` is a file of the tutorial project "af".
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.S)
#: A python block without that line is a standalone snippet.
SNIPPET = re.compile(r"(?<!-->\n)```python\n(?P<body>.*?)```", re.S)
OURS = ("## Testing under a real daemon", "## Starting from a template")


def our_sections() -> str:
    """The sections of docs/modules.md this part wrote (the rest is tested by its own test)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "modules.md").read_text()
    sections = re.split(r"(?m)^(?=## )", text)
    return "".join(s for s in sections if s.startswith(OURS))


def test_docs_examples_run_against_a_generated_project(tmp_path: Path) -> None:
    """The daemon-test file and the snippets of these docs sections pass, on `new-module af`."""
    project = tmp_path / "project"
    assert generate("af", project).returncode == 0
    text = our_sections()
    files = {m["path"]: m["body"] for m in FILE_BLOCK.finditer(text)}
    assert sorted(files) == ["pytest.ini", "tests/test_af_daemon.py"]
    for path, body in files.items():
        (project / path).write_text(body)
    # pytest.ini names the key af is signed with, as in the tutorial's "Signing".
    for args in (["keygen", "vendor.pem", "vendor.pub"], ["sign", "af", "--key", "vendor.pem"]):
        subprocess.run([sys.executable, "-m", "ipad.cli.ctl", *args], cwd=project, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
    snippets = [m["body"] for m in SNIPPET.finditer(text)]
    assert len(snippets) == 1
    (project / "tests" / "test_snippet.py").write_text(
        "def test_snippet() -> None:\n" + textwrap.indent(snippets[0], "    ")
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=60",
         "tests/test_af_daemon.py", "tests/test_snippet.py"],
        cwd=project, env=clean_env(), capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout


def test_generated_code_type_checks_and_lints(tmp_path: Path) -> None:
    """The module and its daemon test pass mypy --strict and ruff's default rules, as generated."""
    project = tmp_path / "project"
    assert generate("my-af", project).returncode == 0
    code = ["my-af/ipa_my_af", "tests/test_my_af_daemon.py"]
    mypy = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *code],
        cwd=project, capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr
    for command in (["check", "--isolated"], ["format", "--isolated", "--check"]):
        ruff = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "."],
            cwd=project, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ruff.returncode == 0, ruff.stdout + ruff.stderr
