"""`tilecore export --name --version` records a bundle's identity; `tilecore info` prints it with the members,
geometry, thresholds, precisions, files and signature, as text or as JSON."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import faiss
import pytest

from tests.cli import assert_one_line_refusal, describe, run_cli
from tests.tiny import tiny_run
from tilecore.runtime.manifest import MANIFEST_FILE, read_manifest
from tilecore.runtime.signing import generate_keypair, sign_bundle


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("info")
    run = tiny_run(root)
    proc = run_cli("export", run, "--out", root / "bundle", "--name", "gravel-line-3", "--version", "2.1", timeout=300)
    assert proc.returncode == 0, describe(proc)
    return {"root": root, "run": run, "bundle": root / "bundle", "data": root / "data"}


def expected_data_sha256(run: Path, data: Path) -> tuple[str, int]:
    """The fingerprint, computed here from the run's split record: sorted relative names, then each
    name, a NUL and the sha256 of the file."""
    split = json.loads((run / "gravel" / "split.json").read_text())
    paths = sorted((Path(p).relative_to(data).as_posix(), Path(p)) for p in split["train"] + split["validation"])
    digest = hashlib.sha256()
    for name, path in paths:
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), len(paths)


def test_export_records_the_name_version_and_fingerprints(exported: dict) -> None:
    identity = read_manifest(exported["bundle"]).identity
    assert (identity.name, identity.version) == ("gravel-line-3", "2.1")
    assert (identity.training_data_sha256, identity.training_images) == expected_data_sha256(
        exported["run"], exported["data"]
    )
    config = json.loads((exported["run"] / "config.json").read_text())
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    assert identity.config_sha256 == hashlib.sha256(canonical).hexdigest()


def test_info_as_json(exported: dict) -> None:
    proc = run_cli("info", exported["bundle"], "--json", timeout=60)
    assert proc.returncode == 0, describe(proc)
    info = json.loads(proc.stdout)
    manifest = read_manifest(exported["bundle"])
    assert info["identity"] == manifest.identity.to_dict()
    (member,) = info["members"]
    assert member["backbone"] == "resnet18" and member["layers"] == ["layer2", "layer3"] and member["banks"] == 4
    rows = [faiss.read_index(str(exported["bundle"] / r.file)).ntotal for r in manifest.members[0].indexes]
    assert member["rows"] == rows
    assert info["image_size"] == [64, 64] and info["tiling"]["grid"] == [2, 2]
    assert info["thresholds"]["image"] == manifest.thresholds.image
    assert info["precisions"] == {"onnx": ["fp32"], "tensorrt": []}
    files = list(exported["bundle"].iterdir())
    assert info["files"] == {"count": len(files), "bytes": sum(f.stat().st_size for f in files)}
    assert info["signed"] is None


def test_info_for_people(exported: dict) -> None:
    proc = run_cli("info", exported["bundle"], timeout=60)
    assert proc.returncode == 0, describe(proc)
    sha, count = expected_data_sha256(exported["run"], exported["data"])
    text = proc.stdout
    assert "name       gravel-line-3, version 2.1\n" in text
    assert f"data       sha256 {sha} ({count} training + validation images)\n" in text
    assert "member 0   resnet18 [layer2, layer3]" in text and "4 flat bank(s)" in text
    assert "image      64 x 64 px; tiles 32 x 32, stride 32 x 32, grid 2 x 2\n" in text
    assert "precisions onnx fp32; tensorrt none\n" in text and "signed     no\n" in text


def test_info_of_a_signed_bundle_names_the_key(exported: dict, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(exported["bundle"], tmp_path / "b"))
    private, public, fingerprint = generate_keypair(tmp_path / "keys")
    sign_bundle(bundle, private)
    proc = run_cli("info", bundle, timeout=60)
    assert f"signed     yes, key {fingerprint} (not verified (pass --trust KEY))" in proc.stdout, describe(proc)
    proc = run_cli("info", bundle, "--trust", public, "--json", timeout=60)
    assert json.loads(proc.stdout)["signed"] == {"key_fingerprint": fingerprint, "verified": True}, describe(proc)
    _, other, _ = generate_keypair(tmp_path / "other")
    assert_one_line_refusal(run_cli("info", bundle, "--trust", other, timeout=60), "signed by another key")


def test_info_refuses_an_altered_bundle_in_one_line(exported: dict, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(exported["bundle"], tmp_path / "b"))
    index = next(bundle.glob("*.faiss"))
    index.write_bytes(index.read_bytes()[:-1] + b"\0")
    assert_one_line_refusal(run_cli("info", bundle, timeout=60), rf"{index.name} is corrupt or altered")
    (bundle / MANIFEST_FILE).unlink()
    assert_one_line_refusal(run_cli("info", bundle, timeout=60), r"no manifest\.json")


@pytest.mark.parametrize(("option", "value"), [("--name", ""), ("--name", "a\tb"), ("--version", " 3")])
def test_export_refuses_a_bad_name_or_version_before_torch_loads(
    exported: dict, tmp_path: Path, option: str, value: str
) -> None:
    proc = run_cli("export", exported["run"], "--out", tmp_path / "b", option, value, timeout=60)
    assert_one_line_refusal(proc, rf"^error: {option} .*expected a non-empty printable name")
    assert not (tmp_path / "b").exists()
