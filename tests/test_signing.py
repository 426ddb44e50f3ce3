"""Module signatures: every tampered case is refused, naming the file and the reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ipad.config.check import check_config
from ipad.config.manifest import ModuleSource, load_manifest
from ipad.config.problems import ConfigError
from ipad.config.signing import SignatureError, generate_key, load_public_key, sign, verify
from tests.daemon_process import REPO, TEST_MODULES


@pytest.fixture
def module(tmp_path: Path) -> Path:
    """A copy of the probe module (manifest and package) in a directory of its own."""
    directory = tmp_path / "modules"
    directory.mkdir()
    shutil.copy(TEST_MODULES / "probe.toml", directory)
    shutil.copytree(TEST_MODULES / "ipad_test_modules", directory / "ipad_test_modules",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return directory / "probe.toml"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh key pair: private, public."""
    private, public = tmp_path / "key.pem", tmp_path / "key.pub"
    generate_key(private, public)
    return private, public


def check(manifest: Path, public: Path) -> None:
    verify(ModuleSource(load_manifest(manifest), manifest), [load_public_key(public)])


def test_a_signed_module_verifies_and_covers_its_code(
    module: Path, keys: tuple[Path, Path]
) -> None:
    """The signature covers the manifest and every file of the entry point's package."""
    sign(module, keys[0])
    verified = verify(ModuleSource(load_manifest(module), module), [load_public_key(keys[1])])
    assert "probe.toml" in verified.files
    assert "ipad_test_modules/probe.py" in verified.files
    assert not any("__pycache__" in f for f in verified.files)


@pytest.mark.parametrize(
    ("tamper", "file", "reason"),
    [
        (lambda d: (d / "ipad_test_modules" / "probe.py").write_text("evil = 1\n"),
         "ipad_test_modules/probe.py", "changed since it was signed (tampered)"),
        (lambda d: (d / "probe.toml").write_text((d / "probe.toml").read_text() + "# x\n"),
         "probe.toml", "changed since it was signed (tampered)"),
        (lambda d: (d / "ipad_test_modules" / "extra.py").write_text("evil = 1\n"),
         "ipad_test_modules/extra.py", "not covered by the signature (added after signing)"),
        (lambda d: (d / "ipad_test_modules" / "slow.py").unlink(),
         "ipad_test_modules/slow.py", "signed but missing"),
    ],
)  # fmt: skip
def test_tampered_files_are_named(
    module: Path, keys: tuple[Path, Path], tamper: object, file: str, reason: str
) -> None:
    """A changed, added or removed file is refused with its name and what happened to it."""
    sign(module, keys[0])
    tamper(module.parent)  # type: ignore[operator]
    with pytest.raises(SignatureError) as caught:
        check(module, keys[1])
    assert (caught.value.file, caught.value.reason) == (module.parent / file, reason)


def test_forged_signature_and_unknown_key_are_refused(
    module: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """A signature edited by hand does not verify; one by an untrusted key names that key."""
    signature = sign(module, keys[0])
    other_private, other_public = tmp_path / "other.pem", tmp_path / "other.pub"
    generate_key(other_private, other_public)
    with pytest.raises(SignatureError, match="which is not a trusted key") as caught:
        check(module, other_public)
    assert caught.value.file == signature
    text = signature.read_text()
    digest = text.split('"ipad_test_modules/probe.py": "')[1][:64]
    signature.write_text(text.replace(digest, "0" * 64))
    with pytest.raises(SignatureError, match="does not verify: tampered"):
        check(module, keys[1])


def config_for(module: Path, public: Path, require: bool, tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nmodule_dirs = ["{module.parent}"]\n'
        f'[signatures]\nrequire_signature = {str(require).lower()}\ntrusted_keys = ["{public}"]\n'
        "[modules.probe]\n"
    )
    return config


def test_check_config_requires_and_checks_signatures(
    module: Path, keys: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """require_signature refuses an unsigned module; a tampered signed one is refused regardless."""
    monkeypatch.setenv("IPAD_CONFIG_PATH", str(TEST_MODULES / "tuning"))
    config = config_for(module, keys[1], True, tmp_path)
    with pytest.raises(ConfigError) as caught:
        check_config(config)
    assert [str(p) for p in caught.value.problems] == [
        f"{module}.sig: (signature): module probe: missing: the module is not signed"
    ]
    sign(module, keys[0])
    assert "probe" in check_config(config).plans
    (module.parent / "ipad_test_modules" / "probe.py").write_text("evil = 1\n")
    for require in (True, False):
        with pytest.raises(ConfigError, match=r"probe\.py: .* changed since it was signed"):
            check_config(config_for(module, keys[1], require, tmp_path))


def test_ipadctl_sign_and_verify(module: Path, keys: tuple[Path, Path]) -> None:
    """`ipadctl sign` signs a directory, `ipadctl verify` checks it; tampering exits 1."""

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ipad.cli.ctl", *args], capture_output=True,
                              text=True, timeout=30, check=False, cwd=REPO)  # fmt: skip

    signed = ctl("sign", str(module.parent), "--key", str(keys[0]))
    assert signed.returncode == 0
    assert "probe: signed by ed25519:" in signed.stdout
    good = ctl("verify", str(module.parent), "--trusted-key", str(keys[1]))
    assert good.returncode == 0
    assert "probe: ok, signed by ed25519:" in good.stdout
    (module.parent / "ipad_test_modules" / "probe.py").write_text("evil = 1\n")
    bad = ctl("verify", str(module), "--trusted-key", str(keys[1]))
    assert bad.returncode == 1
    assert "probe: REFUSED: " in bad.stdout
    assert "probe.py: changed since it was signed" in bad.stdout
