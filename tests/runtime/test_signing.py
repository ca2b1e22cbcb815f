"""Signed bundles (runtime.signing): a bundle signed at export verifies against its public key, and every
way of changing it afterwards, or of signing it with another key, is refused in one line."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.tiny import tiny_run
from tilecore.export.bundle import export_run
from tilecore.runtime import manifest as manifest_module
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.manifest import MANIFEST_FILE, SIGNATURE_FILE, read_manifest, verify_bundle
from tilecore.runtime.predictor import Predictor
from tilecore.runtime.signing import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_bundle,
)


def short(fingerprint: str) -> str:
    return fingerprint[: len("sha256:") + 16]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rewrite_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    """Edit manifest.json and re-hash it the way an attacker would: the digest file is rewritten to match,
    so every check without a key passes (read_manifest at the end proves it)."""
    path = bundle / MANIFEST_FILE
    old = path.read_bytes()
    manifest = json.loads(old)
    edit(manifest)
    new = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    path.write_bytes(new)
    digest_name = getattr(manifest_module, "DIGEST_FILE", None)
    if digest_name and (bundle / digest_name).is_file():
        digest = bundle / digest_name
        text = digest.read_text()

        def canonical(data: bytes) -> bytes:
            return json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode("utf-8")

        pairs = [(sha256(old), sha256(new)), (sha256(canonical(old)), sha256(canonical(new)))]
        found = [(o, n) for o, n in pairs if o in text]
        assert found, f"{digest_name} holds neither sha256 of {MANIFEST_FILE}: {text!r}"
        digest.write_text(text.replace(*found[0]))
    read_manifest(bundle)  # the re-hashed bundle passes every check that has no key


def drop_signature(bundle: Path, keys: dict) -> None:
    (bundle / SIGNATURE_FILE).unlink()


def sign_with_other_key(bundle: Path, keys: dict) -> None:
    sign_bundle(bundle, keys["other"][0])


def forge_fingerprint(bundle: Path, keys: dict) -> None:
    """Signed by the other key, but claiming the trusted key's fingerprint."""
    sign_bundle(bundle, keys["other"][0])
    path = bundle / SIGNATURE_FILE
    raw = json.loads(path.read_text())
    raw["key_fingerprint"] = keys["trusted"][2]
    path.write_text(json.dumps(raw))


def flip_bank_byte(bundle: Path, keys: dict) -> None:
    path = bundle / "bank_m0_t0_0.faiss"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last stored vector
    path.write_bytes(bytes(data))


def swap_banks_and_rehash(bundle: Path, keys: dict) -> None:
    """Swap two tiles' banks (same shape, every consistency check passes) and fix their sha256 entries."""
    a, b = bundle / "bank_m0_t0_0.faiss", bundle / "bank_m0_t1_1.faiss"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)

    def edit(manifest: dict) -> None:
        manifest["files"][a.name], manifest["files"][b.name] = sha256(data_b), sha256(data_a)

    rewrite_manifest(bundle, edit)


def raise_threshold_and_rehash(bundle: Path, keys: dict) -> None:
    def edit(manifest: dict) -> None:
        manifest["thresholds"]["image"] = manifest["thresholds"]["image"] * 1000.0  # every defect -> "normal"

    rewrite_manifest(bundle, edit)


def truncate_signature(bundle: Path, keys: dict) -> None:
    path = bundle / SIGNATURE_FILE
    path.write_bytes(path.read_bytes()[:40])


def garbage_signature(bundle: Path, keys: dict) -> None:
    (bundle / SIGNATURE_FILE).write_bytes(b"\x00\xffnot a signature\x80" * 4)


def flip_signature_bit(bundle: Path, keys: dict) -> None:
    path = bundle / SIGNATURE_FILE
    raw = json.loads(path.read_text())
    sig = bytearray(base64.b64decode(raw["signature"]))
    sig[10] ^= 0x01
    raw["signature"] = base64.b64encode(bytes(sig)).decode("ascii")
    path.write_text(json.dumps(raw))


# (case, tamper(bundle, keys), what the one-line refusal says); the CLI tests reuse these
TAMPERS: list[tuple[str, Callable[[Path, dict], None], str]] = [
    ("unsigned", drop_signature, r"not signed \(no manifest\.sig\)"),
    ("another key", sign_with_other_key, r"signed by another key \(fingerprint sha256:[0-9a-f]{16}, trusted"),
    ("forged fingerprint", forge_fingerprint, r"manifest\.json changed after signing"),
    ("bank changed", flip_bank_byte, r"bank_m0_t0_0\.faiss"),
    ("banks swapped, manifest re-hashed", swap_banks_and_rehash, r"manifest\.json changed after signing"),
    ("threshold edited, manifest re-hashed", raise_threshold_and_rehash, r"manifest\.json changed after signing"),
    ("signature truncated", truncate_signature, r"manifest\.sig: not a valid tilecore-bundle-signature"),
    ("signature garbage", garbage_signature, r"manifest\.sig: not a valid tilecore-bundle-signature"),
    ("signature bit flipped", flip_signature_bit, r"manifest\.json changed after signing"),
]


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run, two key pairs (trusted, other) and a bundle exported with --sign by the trusted key."""
    root = tmp_path_factory.mktemp("signing")
    run = tiny_run(root)
    keys = {"trusted": generate_keypair(root / "trusted"), "other": generate_keypair(root / "other")}
    manifest = export_run(run, root / "bundle", sign_key=keys["trusted"][0])
    images = sorted((root / "data" / "gravel" / "test").glob("*/*.png"))
    return {"root": root, "run": run, "keys": keys, "bundle": root / "bundle", "manifest": manifest, "images": images}


def copy_bundle(signed: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(signed["bundle"], tmp_path / "bundle"))


def test_signed_export_verifies_and_scores_like_the_unsigned_bundle(signed: dict, tmp_path: Path) -> None:
    bundle, (_, public, fingerprint) = signed["bundle"], signed["keys"]["trusted"]
    assert (bundle / SIGNATURE_FILE).is_file() and SIGNATURE_FILE not in signed["manifest"].files
    assert verify_bundle(bundle, public).key_fingerprint == fingerprint
    unsigned = copy_bundle(signed, tmp_path)
    (unsigned / SIGNATURE_FILE).unlink()
    images = [read_rgb(path) for path in signed["images"]]
    trusted_scores = [r.score for r in Predictor(bundle, "cpu", trust=public).predict_batch(images)]
    plain_scores = [r.score for r in Predictor(unsigned, "cpu").predict_batch(images)]
    assert trusted_scores == plain_scores and len(set(trusted_scores)) == len(images)


@pytest.mark.parametrize(("case", "tamper", "message"), TAMPERS, ids=[case for case, _, _ in TAMPERS])
def test_trust_refuses_a_changed_or_foreign_bundle(
    signed: dict, tmp_path: Path, case: str, tamper: Callable, message: str
) -> None:
    bundle = copy_bundle(signed, tmp_path)
    tamper(bundle, signed["keys"])
    public = signed["keys"]["trusted"][1]
    for check in (lambda: verify_bundle(bundle, public), lambda: Predictor(bundle, "cpu", trust=public)):
        with pytest.raises(TilecoreError, match=message) as refused:
            check()
        assert "\n" not in str(refused.value) and str(bundle) in str(refused.value)


def test_another_key_is_named_by_both_fingerprints(signed: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(signed, tmp_path)
    sign_with_other_key(bundle, signed["keys"])
    other, trusted = signed["keys"]["other"][2], signed["keys"]["trusted"][2]
    expected = rf"fingerprint {short(other)}, trusted {short(trusted)}\)"
    with pytest.raises(TilecoreError, match=expected):
        verify_bundle(bundle, signed["keys"]["trusted"][1])
    assert verify_bundle(bundle, signed["keys"]["other"][1]).key_fingerprint == other  # and its own key accepts it


def test_predictor_checks_the_signature_before_loading_anything(
    signed: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = copy_bundle(signed, tmp_path)
    raise_threshold_and_rehash(bundle, signed["keys"])

    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bundle was read before its signature was checked")

    monkeypatch.setattr("tilecore.runtime.manifest.Manifest.from_dict", too_late)  # nothing parsed before
    monkeypatch.setattr("tilecore.runtime.manifest.sha256_file", too_late)  # nor any file hashed
    monkeypatch.setattr("tilecore.runtime.predictor.open_engine", too_late)
    with pytest.raises(TilecoreError, match=r"manifest\.json changed after signing"):
        Predictor(bundle, "cpu", trust=signed["keys"]["trusted"][1])


def other_key_files(folder: Path) -> dict[str, Path]:
    """Key files that are not an unencrypted Ed25519 key of the right half."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    folder.mkdir()
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    files = {
        "missing": folder / "missing.key",
        "text": folder / "notes.txt",
        "ec": folder / "ec.key",
        "encrypted": folder / "encrypted.key",
    }
    files["text"].write_text("this is not a key\n")
    plain = serialization.NoEncryption()
    files["ec"].write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(pem, pkcs8, plain))
    secret = serialization.BestAvailableEncryption(b"passphrase")
    files["encrypted"].write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(pem, pkcs8, secret))
    return files


def test_bad_signing_keys_are_one_line_errors(signed: dict, tmp_path: Path) -> None:
    files = other_key_files(tmp_path / "keys")
    bundle = copy_bundle(signed, tmp_path)
    for path, message in (
        (files["missing"], r"signing key .*missing\.key: file not found"),
        (files["text"], r"signing key .*notes\.txt: not a PEM private key"),
        (signed["keys"]["trusted"][1], rf"signing key .*{PUBLIC_KEY_FILE}: is a public key; --sign needs the private"),
        (files["ec"], r"signing key .*ec\.key: key type EC \(secp256r1\); bundles are signed with Ed25519"),
        (files["encrypted"], r"signing key .*encrypted\.key: protected by a passphrase"),
    ):
        with pytest.raises(TilecoreError, match=message) as refused:
            sign_bundle(bundle, path)
        assert "\n" not in str(refused.value)
    assert verify_bundle(bundle, signed["keys"]["trusted"][1])  # no failed attempt touched the signature


def test_bad_trusted_keys_are_one_line_errors(signed: dict, tmp_path: Path) -> None:
    files = other_key_files(tmp_path / "keys")
    for path, message in (
        (files["missing"], r"trusted key .*missing\.key: file not found"),
        (files["text"], r"trusted key .*notes\.txt: not a PEM public key"),
        (signed["keys"]["trusted"][0], rf"trusted key .*{PRIVATE_KEY_FILE}: is a private key; devices get the public"),
    ):
        with pytest.raises(TilecoreError, match=message) as refused:
            load_public_key(path)
        assert "\n" not in str(refused.value)


def test_export_checks_the_key_before_the_long_work(
    signed: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("export started before its signing key was checked")

    monkeypatch.setattr("tilecore.export.bundle.load_embedder", too_late)
    with pytest.raises(TilecoreError, match=r"signing key .* is a public key"):
        export_run(signed["run"], tmp_path / "bundle", sign_key=signed["keys"]["trusted"][1])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_signature_leaves_no_bundle(signed: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(folder: Path, key: object) -> None:
        raise TilecoreError(f"bundle {folder}: cannot write {SIGNATURE_FILE} (No space left on device)")

    monkeypatch.setattr("tilecore.export.bundle.sign_bundle", disk_full)
    with pytest.raises(TilecoreError, match="No space left on device"):
        export_run(signed["run"], tmp_path / "bundle", sign_key=signed["keys"]["trusted"][0])
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging folder


def test_keygen_writes_an_owner_only_private_key_and_never_overwrites(tmp_path: Path) -> None:
    private, public, fingerprint = generate_keypair(tmp_path / "keys")
    assert private.stat().st_mode & 0o777 == 0o600 and public.stat().st_mode & 0o777 == 0o644
    assert (private.name, public.name) == (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)
    assert load_private_key(private).fingerprint == load_public_key(public).fingerprint == fingerprint
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(TilecoreError, match=r"tilecore-signing\.key: already exists; tilecore never overwrites"):
        generate_keypair(tmp_path / "keys")
    assert (private.read_bytes(), public.read_bytes()) == before
    public.unlink()  # half a pair left: still refused, the private key kept
    with pytest.raises(TilecoreError, match="already exists"):
        generate_keypair(tmp_path / "keys")
    assert private.read_bytes() == before[0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(TilecoreError, match=r"keygen --out .*file: is a file, expected a folder"):
        generate_keypair(tmp_path / "file")
    assert np.unique([generate_keypair(tmp_path / f"k{i}")[2] for i in range(3)]).size == 3  # fresh keys


WITHOUT_CRYPTOGRAPHY = """
import sys
sys.modules["cryptography"] = None  # as on a runtime installed without it
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.predictor import Predictor
print("unsigned bundle loads:", Predictor(sys.argv[1], "cpu").providers)
try:
    Predictor(sys.argv[1], "cpu", trust=sys.argv[2])
except TilecoreError as exc:
    print("refused:", exc)
"""


def test_a_runtime_without_cryptography_runs_unsigned_bundles_and_says_what_to_install(signed: dict) -> None:
    args = [str(signed["bundle"]), str(signed["keys"]["trusted"][1])]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_CRYPTOGRAPHY, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "unsigned bundle loads: ['CPUExecutionProvider']" in proc.stdout
    assert "refused: signed bundles need the `cryptography` package: pip install 'cryptography>=" in proc.stdout


@pytest.mark.parametrize("data", [b'{"format": ' + b"9" * 5000 + b"}", b"[" * 100_000 + b"]" * 100_000])
def test_a_signature_file_that_breaks_the_json_parser_is_one_line(data: bytes) -> None:
    from tilecore.runtime.signing import Signature

    with pytest.raises(TilecoreError, match=r"^b/manifest.sig: not a valid .* file \(not JSON\); re-export") as caught:
        Signature.from_bytes(data, "b/manifest.sig")
    assert "\n" not in str(caught.value)


def test_bench_workers_check_the_signature_of_the_bundle_they_load(signed: dict, tmp_path: Path) -> None:
    """bench --trust: the plan checks each bundle, and each worker, which loads it again, checks it again."""
    from tilecore.bench.measure import load_scorer
    from tilecore.bench.plan import plan_jobs
    from tilecore.bench.protocol import QUICK

    bundle, public = copy_bundle(signed, tmp_path), signed["keys"]["trusted"][1]
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(signed["images"][0], images / "a.png")
    jobs, _ = plan_jobs([bundle], ["cpu"], ["fp32"], QUICK, tmp_path / "work", images, trust=public)
    assert [job.trust for job in jobs] == [str(public)]
    raise_threshold_and_rehash(bundle, signed["keys"])  # changed between the plan and the worker's load
    with pytest.raises(TilecoreError, match=r"manifest\.json changed after signing"):
        load_scorer(jobs[0])
