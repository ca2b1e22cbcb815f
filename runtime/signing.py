"""Signed bundles: `export --sign KEY` signs a bundle, `run --trust PUBKEY` refuses any other.

The signature is Ed25519 (`cryptography`) over the exact bytes of manifest.json, stored beside it in
manifest.sig with the signing key's fingerprint. The manifest lists the sha256 of every other file and
read_manifest checks them, so one signature covers the whole bundle: a changed bank fails its checksum, a
changed manifest (even with its digest file rewritten) fails the signature. manifest.sig is written last,
just before the export renames the bundle into place, and is not one of the manifest's `files`.

Why not OpenSSF `model-signing` (evaluated: 1.1.1 from PyPI): its key-based mode works offline with a PEM
key, but only EC keys (P-256/384/521), and it pulls in 34 packages (sigstore, tuf, requests, pydantic,
protobuf, an RFC 3161 client, blake3; ~70 MB installed) for a runtime that must stay lean on edge devices;
a clean install also failed to import (it needs pyOpenSSL without declaring it), and it hashes the folder
itself, a second copy of what the manifest already does. `cryptography` is one package (with cffi), works
offline, and Ed25519 has no parameters to get wrong.

Keys are PEM files: PKCS#8 private key (unencrypted, mode 0600, stays on the signing machine) and
SubjectPublicKeyInfo public key (goes to the devices). `cryptography` is imported only when signing or
verifying, so a runtime without it still runs unsigned bundles.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilecore.runtime.artifacts import atomic_write_bytes
from tilecore.runtime.bundle_files import MANIFEST_FILE, SIGNATURE_FILE
from tilecore.runtime.errors import TilecoreError

SIGNATURE_FORMAT = "tilecore-bundle-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
CONTEXT = b"tilecore-bundle-signature-v1\n"  # signed before the manifest bytes: a signature means only this
PRIVATE_KEY_FILE = "tilecore-signing.key"
PUBLIC_KEY_FILE = "tilecore-signing.pub"
CRYPTOGRAPHY_REQUIREMENT = "cryptography>=44,<51"
MAX_KEY_BYTES = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; anything this large is not one
MAX_SIGNATURE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SigningKey:
    """A loaded Ed25519 private key and the fingerprint of its public half."""

    path: Path
    key: Any  # cryptography's Ed25519PrivateKey
    fingerprint: str


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    key: Any  # cryptography's Ed25519PublicKey
    fingerprint: str


@dataclass(frozen=True)
class Signature:
    """The content of manifest.sig."""

    key_fingerprint: str  # "sha256:<hex>" of the raw public key; which key signed (checked by the signature)
    signature: bytes  # 64 bytes, Ed25519 over CONTEXT + manifest.json

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SIGNATURE_FORMAT,
            "format_version": SIGNATURE_VERSION,
            "algorithm": ALGORITHM,
            "signed_file": MANIFEST_FILE,
            "key_fingerprint": self.key_fingerprint,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @staticmethod
    def from_bytes(data: bytes, where: str) -> Signature:
        """Parse manifest.sig; `where` names the file in the one-line refusal."""
        bad = f"{where}: not a valid {SIGNATURE_FORMAT} file"
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, 5000-digit integers
            raise TilecoreError(f"{bad} (not JSON); re-export with --sign") from None
        if not isinstance(raw, dict) or raw.get("format") != SIGNATURE_FORMAT:
            raise TilecoreError(f"{bad} (format is not {SIGNATURE_FORMAT!r})")
        if raw.get("format_version") != SIGNATURE_VERSION or raw.get("algorithm") != ALGORITHM:
            raise TilecoreError(
                f"{bad}: version {raw.get('format_version')!r}, algorithm {raw.get('algorithm')!r}; "
                f"this runtime reads version {SIGNATURE_VERSION}, {ALGORITHM}"
            )
        if raw.get("signed_file") != MANIFEST_FILE:
            raise TilecoreError(f"{bad}: signed_file {raw.get('signed_file')!r}, expected {MANIFEST_FILE!r}")
        fingerprint, signature = raw.get("key_fingerprint"), raw.get("signature")
        if not isinstance(fingerprint, str) or not fingerprint.startswith("sha256:"):
            raise TilecoreError(f"{bad}: key_fingerprint should be 'sha256:<hex>'")
        try:
            sig = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
        except binascii.Error:
            sig = b""
        if len(sig) != 64:
            raise TilecoreError(f"{bad}: signature should be 64 bytes in base64")
        return Signature(fingerprint, sig)


def crypto() -> tuple[Any, Any, Any]:
    """cryptography's (serialization, ed25519, exceptions) modules, or the one line that says what to install."""
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise TilecoreError(
            f"signed bundles need the `cryptography` package: pip install '{CRYPTOGRAPHY_REQUIREMENT}' "
            "(part of tilecore's runtime extra)"
        ) from None
    return serialization, ed25519, exceptions


def fingerprint_of(public_key: Any) -> str:
    """ "sha256:<hex>" of the raw 32-byte Ed25519 public key."""
    serialization, _, _ = crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def key_kind(key: Any) -> str:
    """What a key that is not Ed25519 is, for the refusal: "RSA", "EC (secp256r1)", ..."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC ({key.curve.name})"
    kinds = {"RSA": (rsa.RSAPrivateKey, rsa.RSAPublicKey), "DSA": (dsa.DSAPrivateKey, dsa.DSAPublicKey)}
    return next((kind for kind, types in kinds.items() if isinstance(key, types)), "not Ed25519")


def short(fingerprint: str) -> str:
    return fingerprint[: len("sha256:") + 16]


def read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise TilecoreError(f"{what} {path}: file not found")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise TilecoreError(f"{what} {path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_KEY_BYTES:
        raise TilecoreError(f"{what} {path}: {len(data)}+ bytes, not a PEM key file")
    return data


def load_private_key(path: str | Path) -> SigningKey:
    """Read and check an Ed25519 private key (PEM, PKCS#8, unencrypted), naming the file on any fault."""
    path = Path(path)
    what = "signing key"
    data = read_key_file(path, what)
    serialization, ed25519, exceptions = crypto()
    if b"PUBLIC KEY-----" in data:
        raise TilecoreError(f"{what} {path}: is a public key; --sign needs the private key ({PRIVATE_KEY_FILE})")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted PEM and no password given
        raise TilecoreError(
            f"{what} {path}: protected by a passphrase; tilecore reads unencrypted keys (keep the file mode 0600)"
        ) from None
    except (ValueError, exceptions.UnsupportedAlgorithm):
        raise TilecoreError(f"{what} {path}: not a PEM private key (make one with `tilecore keygen`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise TilecoreError(f"{what} {path}: key type {key_kind(key)}; bundles are signed with Ed25519 keys")
    return SigningKey(path, key, fingerprint_of(key.public_key()))


def load_public_key(path: str | Path) -> TrustedKey:
    """Read and check an Ed25519 public key (PEM), naming the file on any fault."""
    path = Path(path)
    what = "trusted key"
    data = read_key_file(path, what)
    serialization, ed25519, exceptions = crypto()
    if b"PRIVATE KEY-----" in data:
        raise TilecoreError(f"{what} {path}: is a private key; devices get the public key only ({PUBLIC_KEY_FILE})")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, exceptions.UnsupportedAlgorithm):
        raise TilecoreError(f"{what} {path}: not a PEM public key (expected a {PUBLIC_KEY_FILE} of keygen)") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise TilecoreError(f"{what} {path}: key type {key_kind(key)}; bundles are signed with Ed25519 keys")
    return TrustedKey(path, key, fingerprint_of(key))


def read_manifest_bytes(folder: Path) -> bytes:
    if not folder.is_dir():
        raise TilecoreError(f"bundle {folder}: folder not found")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise TilecoreError(f"bundle {folder}: no {MANIFEST_FILE} (not a bundle, or an unfinished export)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TilecoreError(f"bundle {folder}: cannot read {MANIFEST_FILE} ({exc.strerror})") from None


def sign_bundle(folder: str | Path, private_key: str | Path | SigningKey) -> Signature:
    """Sign the bundle in `folder` (its manifest.json as it is now) and write manifest.sig atomically."""
    folder = Path(folder)
    key = private_key if isinstance(private_key, SigningKey) else load_private_key(private_key)
    manifest = read_manifest_bytes(folder)
    signature = Signature(key.fingerprint, key.key.sign(CONTEXT + manifest))
    text = json.dumps(signature.to_dict(), indent=2) + "\n"
    try:
        atomic_write_bytes(folder / SIGNATURE_FILE, text.encode("utf-8"))
    except OSError as exc:
        raise TilecoreError(f"bundle {folder}: cannot write {SIGNATURE_FILE} ({exc.strerror})") from None
    return signature


def read_signature(folder: Path) -> Signature:
    sig_path = folder / SIGNATURE_FILE
    try:
        with open(sig_path, "rb") as f:
            data = f.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as exc:
        raise TilecoreError(f"bundle {folder}: cannot read {SIGNATURE_FILE} ({exc.strerror})") from None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise TilecoreError(f"bundle {folder}: {SIGNATURE_FILE} is {len(data)}+ bytes, not a signature")
    return Signature.from_bytes(data, f"bundle {folder}: {SIGNATURE_FILE}")


def verify_manifest_bytes(folder: Path, manifest: bytes, public_key: str | Path | TrustedKey) -> Signature:
    """Check the bundle's signature over `manifest`, the manifest.json bytes the caller is about to parse."""
    trusted = public_key if isinstance(public_key, TrustedKey) else load_public_key(public_key)
    if not (folder / SIGNATURE_FILE).is_file():
        raise TilecoreError(
            f"bundle {folder}: not signed (no {SIGNATURE_FILE}); the trusted key {short(trusted.fingerprint)} "
            "requires a bundle exported with --sign"
        )
    signature = read_signature(folder)
    if signature.key_fingerprint != trusted.fingerprint:
        raise TilecoreError(
            f"bundle {folder}: signed by another key (fingerprint {short(signature.key_fingerprint)}, "
            f"trusted {short(trusted.fingerprint)})"
        )
    _, _, exceptions = crypto()
    try:
        trusted.key.verify(signature.signature, CONTEXT + manifest)
    except exceptions.InvalidSignature:
        raise TilecoreError(
            f"bundle {folder}: {MANIFEST_FILE} changed after signing (signature check failed for trusted key "
            f"{short(trusted.fingerprint)})"
        ) from None
    return signature


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically with `mode`, refusing to replace an existing file (link, not rename)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.link(tmp, path)  # fails if `path` appeared meanwhile: never overwrites a key
    finally:
        tmp.unlink(missing_ok=True)


def generate_keypair(out_dir: str | Path) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair into `out_dir`: (private key path, public key path, fingerprint).

    The private key is readable by its owner only (0600); neither file is ever overwritten.
    """
    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise TilecoreError(f"keygen {path}: already exists; tilecore never overwrites a key (another --out?)")
    if out_dir.exists() and not out_dir.is_dir():
        raise TilecoreError(f"keygen --out {out_dir}: is a file, expected a folder")
    serialization, ed25519, _ = crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_format = serialization.PublicFormat.SubjectPublicKeyInfo
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, public_format)
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
            write_new_file(path, data, mode)
            written.append(path)
    except FileExistsError as exc:  # appeared between the check above and the link
        for path in written:
            path.unlink(missing_ok=True)
        raise TilecoreError(f"keygen {exc.filename2}: already exists; tilecore never overwrites a key") from None
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise TilecoreError(f"keygen --out {out_dir}: cannot write the key pair ({exc.strerror})") from None
    return private_path, public_path, fingerprint_of(key.public_key())
