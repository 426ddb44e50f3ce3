"""A module's code identity: what is hashed, when it is hashed anew, and its bounds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ipad.config import code_identity
from ipad.config.code_identity import CodeTooLarge, CodeWatch, package_identity, signed_identity
from ipad.config.manifest import ModuleSource, load_manifest
from ipad.config.signing import covered_files, digests

MANIFEST = """\
name = "af"
version = "1.0.0"
api_version = 1
worker = "ipad-worker"
entry_point = "af_pkg.module:AF"

[pipeline]
handlers = ["simple"]
min_version = 1
max_version = 1
"""


def module(root: Path) -> ModuleSource:
    """A module ``af`` in ``root``: a manifest and a package of two files."""
    (root / "af_pkg").mkdir()
    (root / "af_pkg" / "__init__.py").write_text("")
    (root / "af_pkg" / "module.py").write_text("VALUE = 1\n")
    (root / "af.toml").write_text(MANIFEST)
    return ModuleSource(load_manifest(root / "af.toml"), root / "af.toml")


def test_an_edit_an_added_file_or_the_manifest_change_the_identity(tmp_path: Path) -> None:
    """Each of the covered files counts; compiled caches do not."""
    source = module(tmp_path)
    watch = CodeWatch(source)
    first = watch.identify()
    assert first.code_id.startswith("sha256:")
    assert len(first.code_id) == len("sha256:") + 16
    (tmp_path / "af_pkg" / "__pycache__").mkdir()
    (tmp_path / "af_pkg" / "__pycache__" / "module.cpython-311.pyc").write_bytes(b"x")
    assert watch.identify().code_id == first.code_id
    (tmp_path / "af_pkg" / "module.py").write_text("VALUE = 2\n")
    second = watch.identify()
    assert second.code_id != first.code_id
    assert second.package_id != first.package_id
    (tmp_path / "af_pkg" / "extra.py").write_text("")
    third = watch.identify()
    assert third.code_id != second.code_id
    (tmp_path / "af.toml").write_text(MANIFEST.replace("1.0.0", "1.0.1"))
    fourth = watch.identify()
    assert fourth.code_id != third.code_id
    assert fourth.package_id == third.package_id  # the manifest is no package file


def test_unchanged_files_are_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the fingerprint (size, mtime, ctime, inode) holds, identify only stats."""
    watch = CodeWatch(module(tmp_path))
    first = watch.identify()

    def no_reading(*_: object) -> None:
        raise AssertionError("hashed again although nothing moved")

    monkeypatch.setattr(CodeWatch, "_hash", no_reading)
    assert watch.identify() is first
    assert watch.unchanged_since(first)


def test_same_content_rewritten_keeps_the_identity(tmp_path: Path) -> None:
    """A file rewritten with the same bytes moves the fingerprint, not the identity."""
    watch = CodeWatch(module(tmp_path))
    first = watch.identify()
    path = tmp_path / "af_pkg" / "module.py"
    path.write_text(path.read_text())
    os.utime(path, ns=(1, 1))
    again = watch.identify()
    assert again.fingerprint != first.fingerprint
    assert again.code_id == first.code_id
    assert not watch.unchanged_since(first)


def test_a_signed_modules_identity_is_its_signatures_and_matches_the_disk(tmp_path: Path) -> None:
    """The identity over the signed digests equals the one hashed from the same files."""
    source = module(tmp_path)
    signed = tuple(sorted(digests(source.directory, covered_files(source)).items()))
    from_disk = CodeWatch(source).identify()
    from_signature = signed_identity(source, signed)
    assert from_signature.code_id == from_disk.code_id
    assert from_signature.package_id == from_disk.package_id
    assert package_identity(tmp_path, "af_pkg") == from_disk.package_id


@pytest.mark.parametrize("bound", ["files", "depth", "bytes", "entries", "fifos"])
def test_a_module_past_a_bound_has_no_identity_and_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """Too many files, too deep or too big: CodeTooLarge names the bound, never a long walk."""
    source = module(tmp_path)
    package = tmp_path / "af_pkg"
    if bound == "files":
        monkeypatch.setattr(code_identity, "MAX_FILES", 10)
        for index in range(11):
            (package / f"m{index}.py").write_text("")
        expected = "more than 10 files"
    elif bound == "depth":
        monkeypatch.setattr(code_identity, "MAX_DEPTH", 3)
        deep = package.joinpath(*["d"] * 5)
        deep.mkdir(parents=True)
        expected = "deeper than 3 directory levels"
    elif bound == "bytes":
        monkeypatch.setattr(code_identity, "MAX_BYTES", 1000)
        (package / "big.py").write_bytes(b"#" * 1001)
        expected = "more than 1000 bytes"
    else:  # no code, but each a stat at every walk: a hostile tree of 10^5 of them
        monkeypatch.setattr(code_identity, "MAX_ENTRIES", 10)
        for index in range(11):
            target = package / f"d{index}" if bound == "entries" else package / "sub" / f"f{index}"
            if bound == "entries":
                target.mkdir()
            else:
                target.parent.mkdir(exist_ok=True)
                os.mkfifo(target)
        expected = "more than 10 directory entries"
    with pytest.raises(CodeTooLarge, match=expected):
        CodeWatch(source).identify()
    assert package_identity(tmp_path, "af_pkg") is None
    assert len(covered_files(source)) > 2  # signing walks it whole: it has no such bound


def test_a_directory_symlink_loop_is_not_followed(tmp_path: Path) -> None:
    """A symlink back to the package is no directory to walk: the walk ends."""
    source = module(tmp_path)
    (tmp_path / "af_pkg" / "loop").symlink_to(tmp_path / "af_pkg")
    assert CodeWatch(source).identify().code_id.startswith("sha256:")


def test_a_file_swapped_for_a_fifo_after_its_stat_does_not_block(tmp_path: Path) -> None:
    """Between the walk and the read a file becomes a FIFO: read as nothing, never waited on."""
    source = module(tmp_path)
    watch = CodeWatch(source)
    path = tmp_path / "af_pkg" / "module.py"
    stamps = code_identity.fingerprint(source)
    path.unlink()
    os.mkfifo(path)
    identity = watch._hash(stamps)  # the stamps of the file as it was
    assert identity.code_id.startswith("sha256:")
    assert code_identity.fingerprint(source) != stamps  # so identify hashes again, and knows


def test_a_file_that_grew_after_its_stat_is_read_no_further(tmp_path: Path) -> None:
    """Reads stop one byte past the size the stat said."""
    path = tmp_path / "grown.py"
    path.write_bytes(b"x" * 100)
    assert code_identity._read_bounded(path, 10) == b"x" * 11
