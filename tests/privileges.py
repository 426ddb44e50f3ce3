"""Running a command as another user: CI runs as root, so other users' paths are shown with setpriv.

This machine's Python may live under /root (mode 0700), which another user
cannot enter. Such a command then runs in a private mount namespace where
/root is a world-searchable tmpfs holding bind mounts of just the subtrees
needed (the interpreter, the checkout): the host's /root is never touched.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.daemon_process import REPO

#: nobody:nogroup on Debian.
NOBODY = 65534

#: Mount namespace set-up, then "$@" (the setpriv command); {subtrees} are /root's entries to keep.
OPEN_ROOT = r"""
set -e
keep=$(mktemp -d)
for sub in {subtrees}; do
  mkdir -p "$keep/$sub"; mount --bind "/root/$sub" "$keep/$sub"
done
mount -t tmpfs -o mode=0755 ipad-test-root /root
for sub in {subtrees}; do
  mkdir -p "/root/$sub"; mount --bind "$keep/$sub" "/root/$sub"
done
exec "$@"
"""

#: For tests that drop privileges: they need root, setpriv and unshare.
needs_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("unshare") is None,
    reason="dropping to another user needs root, setpriv and unshare (util-linux)",
)


def root_subtrees() -> list[str]:
    """The entries of /root that the interpreter and the checkout live in."""
    needed = {Path(os.path.realpath(sys.executable)), REPO, Path(sys.prefix), Path(sys.base_prefix)}
    return sorted({p.relative_to("/root").parts[0] for p in needed if p.is_relative_to("/root")})


def setpriv(uid: int = NOBODY, gid: int = NOBODY, groups: Sequence[int] = ()) -> list[str]:
    """The setpriv arguments that run a command as ``uid``:``gid`` with exactly ``groups`` besides."""
    ids = [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={gid}"]
    return [*ids, f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]


def as_user(uid: int = NOBODY, gid: int = NOBODY, groups: Sequence[int] = ()) -> list[str]:
    """A command prefix that runs the rest as that user, with /root opened if it must be."""
    prefix = setpriv(uid, gid, groups)
    subtrees = root_subtrees()
    if not subtrees:
        return prefix
    script = OPEN_ROOT.format(subtrees=" ".join(shlex.quote(sub) for sub in subtrees))
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", *prefix]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned directory every user can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ipad-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)
