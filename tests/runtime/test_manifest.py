"""The bundle schema and its integrity: typed fields refused by path, the manifest covered by its digest,
plain file names that must be listed in `files`, and banks and engines that must agree with the manifest."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
import pytest

from tests.cli import assert_one_line_refusal, describe, run_cli
from tests.tiny import tiny_run
from tilecore.export.bundle import export_run
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import (
    DIGEST_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    canonical_json,
    digest_line,
    read_manifest,
    write_manifest,
)
from tilecore.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 2 x 2 tiled run and its bundle (read only: tests copy it before changing anything)."""
    root = tmp_path_factory.mktemp("manifest")
    run = tiny_run(root)
    export_run(run, root / "bundle")
    return {"bundle": root / "bundle", "data": root / "data"}


def raw_manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def copy_bundle(tiny: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny["bundle"], tmp_path / "b"))


def rewrite(bundle: Path, raw: dict) -> None:
    """What an attacker who knows the format does: write any manifest and recompute its digest."""
    data = canonical_json(raw)
    (bundle / MANIFEST_FILE).write_bytes(data)
    (bundle / DIGEST_FILE).write_text(digest_line(data))


def test_round_trip_of_an_exported_bundle(tiny: dict) -> None:
    data = (tiny["bundle"] / MANIFEST_FILE).read_bytes()
    manifest = read_manifest(tiny["bundle"])
    assert canonical_json(manifest.to_dict()) == data  # nothing lost, nothing added, same bytes
    assert Manifest.from_dict(json.loads(data), "x") == manifest
    assert (tiny["bundle"] / DIGEST_FILE).read_text() == f"{hashlib.sha256(data).hexdigest()}  {MANIFEST_FILE}\n"
    assert manifest.thresholds.image == raw_manifest(tiny["bundle"])["thresholds"]["image"]
    (member,) = manifest.members
    assert [r.file for r in member.indexes] == sorted(set(member.banks)) and len(member.banks) == 4
    for record in member.indexes:
        index = faiss.read_index(str(tiny["bundle"] / record.file))
        assert (record.rows, record.dim) == (index.ntotal, index.d) == (record.rows, member.embedding_dim)
    assert not {MANIFEST_FILE, DIGEST_FILE, SIGNATURE_FILE} & set(manifest.files)


def test_an_edited_manifest_is_refused(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    text = (bundle / MANIFEST_FILE).read_text()
    image = raw_manifest(bundle)["thresholds"]["image"]
    edited = text.replace(f'"image": {json.dumps(image)}', '"image": 1433.0')
    assert edited != text
    (bundle / MANIFEST_FILE).write_text(edited)  # every defect would now pass as normal
    with pytest.raises(TilecoreError, match=f"manifest.json does not match {DIGEST_FILE}") as caught:
        Predictor(bundle, device="cpu")
    assert "\n" not in str(caught.value)
    (bundle / DIGEST_FILE).unlink()
    with pytest.raises(TilecoreError, match=f"no {DIGEST_FILE} beside manifest.json"):
        read_manifest(bundle, verify=False)


def test_an_old_format_version_is_refused_in_one_line(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    raw["format_version"] = 1
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    (bundle / DIGEST_FILE).unlink()  # a version 1 bundle had no digest
    with pytest.raises(TilecoreError, match="format version 1, this tilecore reads version 5; re-export"):
        read_manifest(bundle)


def test_a_version_2_bundle_without_identity_is_refused_in_one_line(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    raw["format_version"] = 2  # what tilecore wrote before bundles had an identity
    del raw["identity"]
    rewrite(bundle, raw)
    with pytest.raises(TilecoreError, match="format version 2, this tilecore reads version 5; re-export") as caught:
        read_manifest(bundle)
    assert "\n" not in str(caught.value)
    proc = run_cli("info", bundle, timeout=60)
    assert_one_line_refusal(proc, r"format version 2, this tilecore reads version 5; re-export the bundle")


def test_the_identity_names_the_model_and_its_origins(tiny: dict) -> None:
    identity = read_manifest(tiny["bundle"]).identity
    assert (identity.name, identity.version) == ("gravel", "1")  # export's defaults: the category, version 1
    created = datetime.strptime(identity.created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600
    run = tiny["bundle"].parent / "run"
    config = json.loads((run / "config.json").read_text())
    expected = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert identity.config_sha256 == expected
    assert identity.training_data_sha256 is not None and identity.training_images == 8  # 6 train + 2 validation


@pytest.mark.parametrize(
    "name",
    ["../x.onnx", "/abs/x.onnx", "sub/x.onnx", "sub\\x.onnx", "x\0.onnx", "x\n.onnx", "x\x7f.onnx", "x\u2028.onnx", ""],
)
@pytest.mark.parametrize("where", ["engine", "bank", "files"])
def test_names_outside_the_bundle_are_refused(tiny: dict, tmp_path: Path, name: str, where: str) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    member = raw["members"][0]
    if where == "engine":
        member["engine"], path = name, r"members\[0\]\.engine"
    elif where == "bank":
        old = member["indexes"][0]["file"]
        member["banks"] = [name if b == old else b for b in member["banks"]]
        member["indexes"][0]["file"], path = name, r"members\[0\]\.banks\[\d\]"
    else:
        raw["files"][name], path = "0" * 64, "files"
    rewrite(bundle, raw)
    with pytest.raises(
        TilecoreError, match=rf"manifest.json {path}.*expected a plain file name inside the bundle"
    ) as caught:
        read_manifest(bundle)
    assert "\n" not in str(caught.value)


def test_a_file_that_is_a_symbolic_link_is_refused(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    bank = raw_manifest(bundle)["members"][0]["indexes"][0]["file"]
    outside = tmp_path / "elsewhere.faiss"
    (bundle / bank).rename(outside)
    (bundle / bank).symlink_to(outside)  # the same bytes, so its sha256 still matches
    with pytest.raises(TilecoreError, match=rf"'{bank}' is a symbolic link; a bundle holds its files itself"):
        read_manifest(bundle)


def test_a_digest_file_linked_to_an_endless_device_is_refused_not_read(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    (bundle / DIGEST_FILE).unlink()
    (bundle / DIGEST_FILE).symlink_to("/dev/zero")
    with pytest.raises(TilecoreError, match=rf"no {DIGEST_FILE} beside {MANIFEST_FILE}"):
        read_manifest(bundle)  # not a regular file: refused, never read


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('{"x": ' + "9" * 5000 + "}", "not valid JSON"),
    ],
)
def test_json_that_breaks_parsers_is_one_line(tiny: dict, tmp_path: Path, text: str, message: str) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    (bundle / MANIFEST_FILE).write_text(text)
    (bundle / DIGEST_FILE).write_text(hashlib.sha256(text.encode()).hexdigest() + "  manifest.json\n")
    with pytest.raises(TilecoreError, match=message) as caught:
        read_manifest(bundle)
    assert "\n" not in str(caught.value)


def test_an_integer_too_large_for_a_float_is_refused_by_field(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    raw["thresholds"]["image"] = 10**400  # math.isfinite() raised OverflowError on it
    rewrite(bundle, raw)
    with pytest.raises(TilecoreError, match=r"manifest.json thresholds.image: expected a finite number"):
        read_manifest(bundle)


@pytest.mark.parametrize("victim", ["engine", "bank"])
def test_a_name_missing_from_files_is_refused(tiny: dict, tmp_path: Path, victim: str) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    member = raw["members"][0]
    name = member["engine"] if victim == "engine" else member["indexes"][1]["file"]
    del raw["files"][name]  # the file would load without its sha256 being checked
    rewrite(bundle, raw)
    with pytest.raises(TilecoreError, match=rf"'{name}' is not listed in files"):
        read_manifest(bundle)


def test_a_rehashed_bank_of_another_size_is_refused(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    record = raw["members"][0]["indexes"][0]
    poisoned = faiss.IndexFlatL2(record["dim"])
    poisoned.add(np.full((record["rows"] + 5, record["dim"]), 1e3, dtype=np.float32))
    faiss.write_index(poisoned, str(bundle / record["file"]))
    raw["files"][record["file"]] = hashlib.sha256((bundle / record["file"]).read_bytes()).hexdigest()
    rewrite(bundle, raw)  # every checksum and the digest agree with the poisoned bank
    assert read_manifest(bundle).members[0].indexes[0].rows == record["rows"]
    rows, name = record["rows"] + 5, record["file"]
    with pytest.raises(
        TilecoreError, match=rf"{name} holds {rows} rows of dimension .* the manifest says {rows - 5} x"
    ):
        Predictor(bundle, device="cpu")


def test_an_engine_that_disagrees_with_its_member_is_refused(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    member = raw["members"][0]
    h, w = member["feature_grid"]
    member["feature_grid"] = [h + 1, w]
    rewrite(bundle, raw)
    d = member["embedding_dim"]
    with pytest.raises(TilecoreError, match=rf"gives embeddings \[1, {h}, {w}, {d}\] .* says \[1, {h + 1}, {w}, {d}\]"):
        Predictor(bundle, device="cpu")


def set_path(raw: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("members.0.embedding_dim", "x", r"members\[0\]\.embedding_dim: expected an integer >= 1, got 'x'"),
        ("members.0.embedding_dim", True, r"members\[0\]\.embedding_dim: expected an integer >= 1, got True"),
        ("members.0.num_neighbours", 0, r"members\[0\]\.num_neighbours: expected an integer >= 1, got 0"),
        ("thresholds.pixel", KeyError, r"thresholds\.pixel: missing \(expected a finite number\)"),
        ("thresholds.image", "1.3", r"thresholds\.image: expected a finite number, got '1.3'"),
        ("postprocess.seam_band", 0.9, r"postprocess\.seam_band: expected a finite number >= 0.0 and <= 0.5, got 0.9"),
        ("postprocess.fusion", "median", r"postprocess\.fusion: expected one of 'mean', 'max', 'geometric'"),
        ("members.0.scoring", 3, r"members\[0\]\.scoring: expected one of 'nearest', 'reweighted', got 3"),
        ("members.0.preprocess.std", [0.2, 0.0, 0.2], r"members\[0\]\.preprocess\.std: expected a list of 3 finite"),
        ("tiling.grid", [3, 3], r"tiling\.grid: expected \[2, 2\] for these image, tile and stride sizes"),
        ("tiling.stride", [33, 32], r"tiling: tile stride 33x32: expected 1 <= stride <= tile size 32x32"),
        ("calibration.members", [], r"calibration\.members: expected a list of objects \(at least 1\), got \[\]"),
        ("members.0.indexes.0.rows", 0, r"members\[0\]\.indexes\[0\]\.rows: expected an integer >= 1, got 0"),
        ("members.0.indexes.0.dim", 17, r"members\[0\]\.indexes\[0\]\.dim: 17 differs from embedding_dim 16"),
        ("members", {}, r"members: expected a list of objects \(at least 1\), got {}"),
        ("members.0.layer", ["x"], r"members\[0\]\.layer: unexpected field"),
        ("created_with.numpy", None, r"created_with\.numpy: expected a version string or integer, got None"),
        ("identity", KeyError, r"identity: missing \(expected an object\)"),
        ("identity.name", "", r"identity\.name: expected a non-empty printable string without surrounding spaces"),
        ("identity.version", " 2", r"identity\.version: expected a non-empty printable string without surrounding"),
        ("identity.created", "yesterday", r"identity\.created: expected a UTC time like 2026-12-02T12:00:00Z"),
        ("identity.config_sha256", "abc", r"identity\.config_sha256: expected a sha256 \(64 lowercase hex digits\)"),
        ("identity.training_images", -1, r"identity\.training_images: expected an integer >= 0, got -1"),
        ("identity.signed_by", "me", r"identity\.signed_by: unexpected field"),
    ],
)
def test_wrong_fields_are_refused_by_path(tiny: dict, path: str, value: object, message: str) -> None:
    raw = copy.deepcopy(raw_manifest(tiny["bundle"]))
    set_path(raw, path, value)
    with pytest.raises(TilecoreError, match=f"^bundle B: manifest.json {message}") as caught:
        Manifest.from_dict(raw, "bundle B")
    assert "\n" not in str(caught.value)


def test_non_finite_numbers_are_not_json(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    text = (bundle / MANIFEST_FILE).read_text()
    image = raw_manifest(bundle)["thresholds"]["image"]
    data = text.replace(f'"image": {json.dumps(image)}', '"image": NaN').encode()
    (bundle / MANIFEST_FILE).write_bytes(data)
    (bundle / DIGEST_FILE).write_text(digest_line(data))
    with pytest.raises(TilecoreError, match="manifest.json is not valid JSON \\(NaN is not a JSON number"):
        read_manifest(bundle)


def test_write_manifest_refuses_what_the_runtime_would(tiny: dict, tmp_path: Path) -> None:
    manifest = read_manifest(tiny["bundle"])
    files = {k: v for k, v in manifest.files.items() if not k.endswith(".onnx")}
    broken = Manifest(**{**manifest.__dict__, "files": files})
    with pytest.raises(TilecoreError, match=r"members\[0\]\.engine: 'backbone_\w+\.onnx' is not listed in files"):
        write_manifest(tmp_path, broken)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_wrong_typed_manifest_in_one_line(tiny: dict, tmp_path: Path) -> None:
    bundle = copy_bundle(tiny, tmp_path)
    raw = raw_manifest(bundle)
    raw["members"][0]["banks"] = "bank_m0_t0_0.faiss"  # a string where a list belongs
    rewrite(bundle, raw)
    image = next((tiny["data"] / "gravel" / "test").glob("*/*.png"))
    proc = run_cli("run", bundle, image, "--out", tmp_path / "o", timeout=120)
    assert_one_line_refusal(proc, r"manifest\.json members\[0\]\.banks: expected a list of plain file names")
    assert not proc.stdout.strip(), describe(proc)  # the one line is all the output
