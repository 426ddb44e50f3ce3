"""Module signatures: Ed25519, detached, over a module's manifest and code files.

``<name>.toml.sig`` beside a manifest holds the key id, the SHA-256 of every
file the signature covers (the manifest, and every file of the entry point's
top-level package or module, ``__pycache__`` excepted), and an Ed25519
signature over that list. Verifying recomputes the list: a file changed,
added or removed since signing is named, and so is a signature by a key the
configuration does not trust. ``ipadctl sign`` writes one, ``ipadctl verify``
checks one (docs/security.md).

The ``cryptography`` package is imported only here, and only when something
is signed or checked: the daemon, ``ipadctl`` and workers otherwise never pay for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ipad.config.code_identity import code_files, entry_top
from ipad.config.manifest import ModuleSource, load_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

#: The signature file's suffix, after the manifest's own name.
SIGNATURE_SUFFIX = ".sig"
#: The format of what is signed; a verifier refuses formats it does not know.
FORMAT = "ipad-module-signature-1"


class SignatureError(Exception):
    """A module's signature is missing, made by an unknown key, or no longer matches."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@attrs.frozen
class Verified:
    """A module whose signature checked out: by which key, over which files."""

    key_id: str
    files: tuple[str, ...]
    #: (relative path, SHA-256 hex) of each signed file, as the signature lists them.
    digests: tuple[tuple[str, str], ...] = ()


def signature_path(manifest: Path) -> Path:
    """Where a manifest's signature lives: ``awb.toml`` -> ``awb.toml.sig``."""
    return manifest.with_name(manifest.name + SIGNATURE_SUFFIX)


def covered_files(source: ModuleSource) -> list[Path]:
    """The manifest and the code of its entry point's top-level package (or module file).

    The same files a module's code identity covers (ipad/config/code_identity.py).
    """
    found = code_files(source.directory, entry_top(source), limit=False)
    return [source.path, *(path for path, _ in found)]


def digests(directory: Path, files: Iterable[Path]) -> dict[str, str]:
    """Relative path -> SHA-256 (hex) of each file."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in files
    }


def _message(module: str, key_id: str, files: dict[str, str]) -> bytes:
    """The exact bytes signed: canonical JSON of the format, module, key and file digests."""
    body = {"format": FORMAT, "module": module, "key": key_id, "files": files}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the start of the SHA-256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - see module doc

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or a file holding its 32 raw bytes in base64."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PublicKey,
    )

    data = path.read_bytes()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except ValueError as exc:
        raise SignatureError(path, f"not an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(path, "not an Ed25519 public key")
    return key


def generate_key(private_path: Path, public_path: Path) -> str:
    """Write a new private key (PEM, mode 0600) and its public key (PEM); return its id."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(pem)
    public = private.public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    public_path.write_bytes(public.public_bytes(serialization.Encoding.PEM, spki))
    return key_id(public)


def sign(manifest: Path, private_key: Path) -> Path:
    """Sign one module (its manifest path) with a PEM private key; return the signature file."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(private_key, f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(private_key, "not an Ed25519 private key")
    source = ModuleSource(load_manifest(manifest), manifest)
    ident = key_id(key.public_key())
    files = digests(source.directory, covered_files(source))
    signature = key.sign(_message(source.manifest.name, ident, files))
    out = signature_path(manifest)
    document = {"format": FORMAT, "module": source.manifest.name, "key": ident, "files": files,
                "signature": base64.b64encode(signature).decode()}  # fmt: skip
    out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return out


def verify(source: ModuleSource, trusted: Sequence[Ed25519PublicKey]) -> Verified:
    """Check a module's signature against the trusted keys; SignatureError names file and reason."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

    path = signature_path(source.path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise SignatureError(path, "missing: the module is not signed") from None
    except (OSError, ValueError) as exc:
        raise SignatureError(path, f"unreadable: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SignatureError(path, f"not a signature of format {FORMAT}")
    keys = {key_id(key): key for key in trusted}
    ident = str(document.get("key"))
    if ident not in keys:
        raise SignatureError(path, f"made with key {ident}, which is not a trusted key")
    signed = document.get("files")
    if not isinstance(signed, dict) or document.get("module") != source.manifest.name:
        raise SignatureError(path, "does not sign this module")
    try:
        keys[ident].verify(base64.b64decode(str(document.get("signature"))),
                           _message(source.manifest.name, ident, signed))  # fmt: skip
    except (InvalidSignature, ValueError):
        raise SignatureError(path, f"the signature by {ident} does not verify: tampered") from None
    current = digests(source.directory, covered_files(source))
    for name in sorted(set(signed) | set(current)):
        file = source.directory / name
        if name not in current:
            raise SignatureError(file, "signed but missing")
        if name not in signed:
            raise SignatureError(file, "not covered by the signature (added after signing)")
        if signed[name] != current[name]:
            raise SignatureError(file, "changed since it was signed (tampered)")
    return Verified(ident, tuple(sorted(current)), tuple(sorted(current.items())))
