"""`tilecore keygen`, `export --sign`, `run --trust` and `bench --trust`, each in a real subprocess (but the
fixture's signed export, which goes through the same entry point in this process and so pays no torch import)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli import assert_one_line_refusal, run_cli, run_cli_here
from tests.runtime.test_signing import TAMPERS
from tests.tiny import tiny_run
from tilecore.runtime.manifest import SIGNATURE_FILE
from tilecore.runtime.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_keypair, load_public_key


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run, a key pair from `tilecore keygen`, and its bundle from `tilecore export --sign`."""
    root = tmp_path_factory.mktemp("signing_cli")
    run = tiny_run(root)
    keygen = run_cli("keygen", "--out", root / "keys")
    assert keygen.returncode == 0, keygen.stderr
    private, public = root / "keys" / PRIVATE_KEY_FILE, root / "keys" / PUBLIC_KEY_FILE
    export = run_cli_here("export", run, "--out", root / "bundle", "--sign", private)
    assert export.returncode == 0, export.stderr
    images = root / "images"
    images.mkdir()
    for path in sorted((root / "data" / "gravel" / "test").glob("*/*.png")):
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    trusted = (private, public, load_public_key(public).fingerprint)
    keys = {"trusted": trusted, "other": generate_keypair(root / "other")}
    return {"root": root, "run": run, "keygen": keygen, "export": export, "keys": keys, "images": images}


def scores(out: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {Path(r["input"]).name: r["score"] for r in records}


def test_keygen_writes_the_pair_and_refuses_to_overwrite(cli: dict) -> None:
    private, public, _ = cli["keys"]["trusted"]
    assert private.stat().st_mode & 0o777 == 0o600 and public.is_file()
    assert "fingerprint sha256:" in cli["keygen"].stderr and "0600" in cli["keygen"].stderr
    before = private.read_bytes()
    assert_one_line_refusal(run_cli("keygen", "--out", private.parent), r"tilecore-signing\.key: already exists")
    assert private.read_bytes() == before


def test_export_sign_then_run_trust_scores_like_the_unsigned_run(cli: dict, tmp_path: Path) -> None:
    bundle, key = cli["root"] / "bundle", cli["keys"]["trusted"][1]
    assert "signed with" in cli["export"].stderr and (bundle / SIGNATURE_FILE).is_file()
    unsigned = Path(shutil.copytree(bundle, tmp_path / "unsigned"))
    (unsigned / SIGNATURE_FILE).unlink()
    trusted = run_cli("run", bundle, cli["images"], "--out", tmp_path / "trusted", "--device", "cpu", "--trust", key)
    assert trusted.returncode == 0 and "Traceback" not in trusted.stderr, trusted.stderr
    plain = run_cli("run", unsigned, cli["images"], "--out", tmp_path / "plain", "--device", "cpu")
    assert plain.returncode == 0, plain.stderr
    trusted_scores = scores(tmp_path / "trusted")
    assert trusted_scores == scores(tmp_path / "plain") and len(trusted_scores) == len(list(cli["images"].iterdir()))


@pytest.mark.parametrize(("case", "tamper", "message"), TAMPERS, ids=[case for case, _, _ in TAMPERS])
def test_run_trust_refuses_in_one_line(cli: dict, tmp_path: Path, case: str, tamper: Callable, message: str) -> None:
    bundle = Path(shutil.copytree(cli["root"] / "bundle", tmp_path / "bundle"))
    tamper(bundle, cli["keys"])
    out = tmp_path / "out"
    proc = run_cli("run", bundle, cli["images"], "--out", out, "--device", "cpu", "--trust", cli["keys"]["trusted"][1])
    assert_one_line_refusal(proc, message)
    assert not out.exists()  # refused before --out was touched


def test_trust_with_bad_key_files_and_bench_trust(cli: dict, tmp_path: Path) -> None:
    bundle, private = cli["root"] / "bundle", cli["keys"]["trusted"][0]
    (tmp_path / "notes.txt").write_text("not a key\n")
    for key, message in (
        (private, r"trusted key .*tilecore-signing\.key: is a private key; devices get the public key only"),
        (tmp_path / "notes.txt", r"trusted key .*notes\.txt: not a PEM public key"),
        (tmp_path / "missing.pub", r"trusted key .*missing\.pub: file not found"),
    ):
        assert_one_line_refusal(run_cli("run", bundle, cli["images"], "--out", tmp_path / "o", "--trust", key), message)
    unsigned = Path(shutil.copytree(bundle, tmp_path / "unsigned"))
    (unsigned / SIGNATURE_FILE).unlink()
    other = cli["keys"]["other"][1]
    bench = run_cli("bench", bundle, unsigned, "--quick", "--out", tmp_path / "bench", "--trust", other)
    assert_one_line_refusal(bench, r"bundle .*bundle: signed by another key")
    assert not (tmp_path / "bench").exists()


def test_export_sign_with_bad_key_files_fails_fast(cli: dict, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a key\n")
    out = tmp_path / "bundle"
    for key, message in (
        (tmp_path / "missing.key", r"signing key .*missing\.key: file not found"),
        (tmp_path / "notes.txt", r"signing key .*notes\.txt: not a PEM private key"),
        (cli["keys"]["trusted"][1], r"signing key .*tilecore-signing\.pub: is a public key; --sign needs the private"),
    ):
        assert_one_line_refusal(run_cli("export", cli["run"], "--out", out, "--sign", key), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no bundle, no staging folder
