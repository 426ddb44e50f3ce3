"""Running a command as another user: CI runs as root, so other users' paths are shown with setpriv.

Another user may reach neither the checkout nor its venv: both sit in a
directory only root can enter when the checkout is in root's home or in any
``mktemp -d`` (as .ci/run places it). So that user never runs the checkout;
it gets what it needs prepared for it, world-readable:

- ipad installed as a wheel installs it (the package and its runtime
  dependencies in a venv's site-packages, the workers under
  ``share/ipad/workers``) and the test modules, in a temporary directory
  made on first use and removed when the session ends;
- the base interpreter, which this machine keeps under /root (mode 0700):
  the command runs in a private mount namespace where /root is a
  world-searchable tmpfs holding bind mounts of just the interpreter's
  subtrees (the host's /root is never touched).

setpriv execs with root's capabilities, so an interpreter out of the user's
reach still starts; but the dynamic loader and Python then look for their
libraries as that user and may find the system's instead (here Debian's
libpython and standard library). In the namespace the user runs our interpreter.
"""

from __future__ import annotations

import compileall
import functools
import importlib.metadata
import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
import venv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.daemon_process import REPO, TEST_MODULES

#: nobody:nogroup on Debian.
NOBODY = 65534

#: /root opened in the namespace: {subtrees} are its entries to keep. The staging directory
#: is the host's /tmp's, so it is emptied and removed once the binds are in place.
OPEN_ROOT = r"""
keep=$(mktemp -d)
for sub in {subtrees}; do
  mkdir -p "$keep/$sub"; mount --bind "/root/$sub" "$keep/$sub"
done
mount -t tmpfs -o mode=0755 ipad-test-root /root
for sub in {subtrees}; do
  mkdir -p "/root/$sub"; mount --bind "$keep/$sub" "/root/$sub"
  umount "$keep/$sub"; rmdir "$keep/$sub"
done
rmdir "$keep"
"""

#: Then "$@" (the command) with setpriv. It starts in the install, not in the checkout, which
#: Python would put first on sys.path; our interpreter (the checkout's venv) becomes the install's.
AS_USER = r"""
set -e
{open_root}
cd {home}
if [ "$1" = {ours} ]; then shift; set -- {theirs} "$@"; fi
exec {setpriv} "$@"
"""

#: For tests that drop privileges: they need root, setpriv and unshare.
needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("unshare") is None,
    reason="dropping to another user needs root, setpriv and unshare (util-linux)",
)


@dataclass(frozen=True)
class Install:
    """ipad as another user finds it: installed, with the test modules, all world-readable."""

    root: Path

    @property
    def prefix(self) -> Path:
        """The venv: its site-packages hold ipad and its dependencies."""
        return self.root / "venv"

    @property
    def python(self) -> Path:
        """The venv's interpreter, which the user runs in place of ours."""
        return self.prefix / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        """Where the venv's interpreter imports ipad and its dependencies from."""
        prefix = str(self.prefix)
        return Path(sysconfig.get_path("purelib", "venv", {"base": prefix, "platbase": prefix}))

    @property
    def test_modules(self) -> Path:
        """The copy of tests/modules: manifests, their code and tuning files."""
        return self.root / "test-modules"


@functools.cache
def user_install() -> Install:
    """The session's install for other users, made on first use (about a second)."""
    install = Install(Path(tempfile.mkdtemp(prefix="ipad-user-install-")))
    try:
        build(install)
    except BaseException:
        shutil.rmtree(install.root)
        raise
    return install


@pytest.fixture(scope="session", autouse=True)
def user_install_cleanup() -> Iterator[None]:
    """The session's install, if one was made, is removed when the session ends."""
    yield
    if user_install.cache_info().currsize:
        shutil.rmtree(user_install().root)
        user_install.cache_clear()


def build(install: Install) -> None:
    """Install this checkout's ipad, its runtime dependencies and the test modules there."""
    unreachable = [p for p in install.root.parents if not p.stat().st_mode & 0o001]
    if unreachable:
        raise RuntimeError(f"{unreachable[0]} is closed to other users: set TMPDIR elsewhere")
    # Our interpreter's base, with symbolic links, as `python3 -m venv` makes it.
    venv.EnvBuilder(symlinks=True).create(install.prefix)
    site = install.site_packages
    workers = install.prefix / "share" / "ipad" / "workers"  # the wheel's shared-data
    for source, target in ((REPO / "ipad", site / "ipad"), (REPO / "workers", workers),
                           (TEST_MODULES, install.test_modules)):  # fmt: skip
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        compileall.compile_dir(target, quiet=1)  # the user may not write its bytecode
    for dist in runtime_dependencies("ipad"):
        for file in dist.files or ():
            source = Path(str(dist.locate_file(file)))
            if file.parts[0] != ".." and source.is_file():  # its scripts in bin/ are not needed
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, site / file)
    readable_by_all(install.root)


def runtime_dependencies(name: str) -> Iterator[importlib.metadata.Distribution]:
    """The installed distributions ``name`` needs to run (no extras), recursively."""
    seen = {canonicalize_name(name)}
    wanted = [name]
    while wanted:
        for line in importlib.metadata.distribution(wanted.pop()).requires or ():
            requirement = Requirement(line)
            key = canonicalize_name(requirement.name)
            if key in seen or not (
                requirement.marker is None or requirement.marker.evaluate({"extra": ""})
            ):
                continue
            seen.add(key)
            wanted.append(requirement.name)
            yield importlib.metadata.distribution(requirement.name)


def readable_by_all(root: Path) -> None:
    """Directories 0755, files 0644 or (executables) 0755, whatever the umask they were made with."""
    root.chmod(0o755)
    for directory, subdirectories, files in os.walk(root):
        for name in [*subdirectories, *files]:
            path = Path(directory, name)
            if path.is_symlink():
                continue  # the venv's interpreter points at ours: never chmod through it
            mode = path.stat().st_mode
            path.chmod(0o755 if path.is_dir() or mode & 0o100 else 0o644)


def subtrees_of_root(paths: Iterable[Path]) -> list[str]:
    """The entries of /root that ``paths`` live in."""
    return sorted({p.relative_to("/root").parts[0] for p in paths if p.is_relative_to("/root")})


def root_subtrees() -> list[str]:
    """The entries of /root that the interpreter and the checkout live in."""
    needed = {Path(os.path.realpath(sys.executable)), REPO, Path(sys.prefix), Path(sys.base_prefix)}
    return subtrees_of_root(needed)


def interpreter_subtrees() -> list[str]:
    """The entries of /root that the base interpreter, which the install's venv runs, lives in."""
    needed = {Path(os.path.realpath(sys.executable)), Path(sys.base_prefix)}
    return subtrees_of_root(needed)


def setpriv(uid: int = NOBODY, gid: int = NOBODY, groups: Sequence[int] = ()) -> list[str]:
    """The setpriv arguments that run a command as ``uid``:``gid`` with exactly ``groups`` besides."""
    ids = [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={gid}"]
    return [*ids, f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]


def as_user(uid: int = NOBODY, gid: int = NOBODY, groups: Sequence[int] = ()) -> list[str]:
    """A command prefix that runs the rest as that user, on ipad as the user finds it.

    A command that starts with our interpreter (``sys.executable``) runs the
    install's instead (see the module's docstring), so tests and
    tests/daemon_process.py write the same command for root and for others.
    """
    return with_ids(setpriv(uid, gid, groups))


def with_ids(setpriv_command: Sequence[str]) -> list[str]:
    """Like :func:`as_user`, with any setpriv command (``--ruid=0 --euid=...``, say)."""
    install = user_install()
    subtrees = interpreter_subtrees()
    script = AS_USER.format(
        open_root=OPEN_ROOT.format(subtrees=shlex.join(subtrees)) if subtrees else "",
        home=shlex.quote(str(install.root)),
        ours=shlex.quote(sys.executable),
        theirs=shlex.quote(str(install.python)),
        setpriv=shlex.join(setpriv_command),
    )
    shell = ["/bin/sh", "-c", script, "sh"]
    if not subtrees:
        return shell
    return [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private", *shell]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned directory every user can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ipad-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)
