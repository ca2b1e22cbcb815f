"""runtime.recalibrate: thresholds from good images, against brute force and numpy, and the new bundle."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_run_stream import tiny_bundle
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import SIGNATURE_FILE, read_manifest, verify_bundle
from tilecore.runtime.predictor import Predictor
from tilecore.runtime.recalibrate import (
    TailQuantile,
    bundle_pixel_quantile,
    fpr_threshold,
    min_good_images,
    recalibrate,
)
from tilecore.runtime.signing import generate_keypair, sign_bundle

# --- the threshold rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fpr", "expected"), [(0.01, 100), (0.05, 20), (0.03, 34), (0.1, 10), (0.5, 2)])
def test_min_good_images(fpr: float, expected: int) -> None:
    assert min_good_images(fpr) == expected


@pytest.mark.parametrize("seed", range(6))
def test_fpr_threshold_flags_at_most_the_target_and_no_fewer_than_it_can(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    scores = rng.normal(size=n).round(int(rng.integers(1, 4)))  # rounding makes ties
    fpr = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
    threshold = fpr_threshold(scores, fpr)
    allowed = math.floor(fpr * n + 1e-9)
    flagged = int(np.sum(scores >= threshold))
    assert flagged <= allowed
    # no larger set of top scores, up to `allowed`, could be flagged: the next score down is the highest unflagged
    ordered = np.sort(scores)[::-1]
    assert ordered[allowed] < threshold
    assert flagged == int(np.sum(scores > ordered[allowed]))


def test_fpr_threshold_hand_worked() -> None:
    scores = np.arange(10, dtype=np.float64)  # 0..9; 0.1 of 10 allows one: 9 flagged, 8 not, midway 8.5
    assert fpr_threshold(scores, 0.1) == pytest.approx(8.5)
    assert fpr_threshold(scores, 0.2) == pytest.approx(7.5)


@pytest.mark.parametrize("quantile", [0.5, 0.9, 0.99, 0.999, 1.0])
def test_tail_quantile_equals_numpy_over_chunks(quantile: float) -> None:
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(int(rng.integers(1, 400)), 7)).astype(np.float32) for _ in range(12)]
    total = sum(c.size for c in chunks)
    tail = TailQuantile(quantile, total)
    for chunk in chunks:
        tail.add(chunk)
    expected = np.quantile(np.concatenate([c.ravel() for c in chunks]).astype(np.float64), quantile)
    assert tail.value() == pytest.approx(float(expected), rel=1e-12, abs=1e-12)
    assert len(tail.top) <= tail.keep


# --- the new bundle ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory)


def good_images(bundle: Path, folder: Path) -> Path:
    """`folder` with ten good images (the tiny set's normals) and one that cannot be read."""
    normals = sorted((bundle.parent / "data" / "gravel").glob("*/good/*.png"))
    assert len(normals) >= 10
    for i, path in enumerate(normals[:10]):
        shutil.copy(path, folder / f"{i:02d}.png")
    (folder / "99_corrupt.png").write_bytes(b"\x89PNG nonsense")
    return folder


@pytest.fixture(scope="module")
def good(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_images(bundle, tmp_path_factory.mktemp("good"))


def test_recalibrate_writes_a_new_checked_bundle_and_leaves_the_old_one(
    bundle: Path, good: Path, tmp_path: Path
) -> None:
    before = (bundle / "manifest.json").read_bytes()
    skipped: list[str] = []
    out = tmp_path / "recalibrated"
    outcome = recalibrate(bundle, str(good), out, 0.1, device="cpu", on_skip=lambda name, _: skipped.append(name))
    assert (bundle / "manifest.json").read_bytes() == before
    assert [Path(n).name for n in skipped] == ["99_corrupt.png"]
    assert [Path(n).name for n, _ in outcome.skipped] == ["99_corrupt.png"]
    manifest = read_manifest(out)  # digest and every file's sha256
    old = read_manifest(bundle)
    record = manifest.thresholds.recalibrated
    assert record is not None and record.source == "calibrate"
    assert (record.images, record.target_fpr) == (10, 0.1)
    assert record.previous == old.thresholds
    assert record.pixel_quantile == bundle_pixel_quantile(old.thresholds)
    assert manifest.files == old.files and manifest.members == old.members
    # the runtime on the new bundle flags at most target_fpr of the good images, as recorded
    predictor = Predictor(out, "cpu")
    from tilecore.runtime.image_io import read_rgb

    results = [predictor.predict(read_rgb(p)) for p in sorted(good.glob("0*.png"))]
    flagged = sum(r.label for r in results)
    assert flagged <= 1 and flagged / 10 == pytest.approx(record.fpr)
    pixels = np.concatenate([r.anomaly_map.ravel() for r in results]).astype(np.float64)
    assert manifest.thresholds.pixel == pytest.approx(float(np.quantile(pixels, record.pixel_quantile)), rel=1e-6)
    # the same images give the same fingerprint; other images another
    again = recalibrate(out, str(good), tmp_path / "again", 0.1, device="cpu")
    assert again.manifest.thresholds.recalibrated.images_sha256 == record.images_sha256
    assert again.manifest.thresholds.recalibrated.previous.image == manifest.thresholds.image
    raw = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert "recalibrated" not in raw["thresholds"]["recalibrated"]["previous"]  # one level of history


def test_recalibrate_refusals(bundle: Path, good: Path, tmp_path: Path) -> None:
    with pytest.raises(TilecoreError, match=r"11 found, --target-fpr 0.05 needs at least 20"):
        recalibrate(bundle, str(good), tmp_path / "few", 0.05, device="cpu")  # refused before any is read
    with pytest.raises(TilecoreError, match=r"10 readable \(1 skipped\), --target-fpr 0.091 needs at least 11"):
        recalibrate(bundle, str(good), tmp_path / "few", 0.091, device="cpu")  # 11 found, one unreadable
    assert not (tmp_path / "few").exists()
    with pytest.raises(TilecoreError, match="is the input bundle"):
        recalibrate(bundle, str(good), bundle, 0.1, device="cpu")
    with pytest.raises(TilecoreError, match="already exists"):
        recalibrate(bundle, str(good), good, 0.1, device="cpu")
    for fpr in (0.0, 1.0, -0.1):
        with pytest.raises(TilecoreError, match="--target-fpr"):
            recalibrate(bundle, str(good), tmp_path / "x", fpr, device="cpu")
    with pytest.raises(TilecoreError, match="camera"):
        recalibrate(bundle, "0", tmp_path / "x", 0.1, device="cpu")
    assert not list(tmp_path.glob(".x.*"))  # no staging folder left


def test_signed_bundle_is_resigned_or_left_unsigned(bundle: Path, good: Path, tmp_path: Path) -> None:
    signed = tmp_path / "signed"
    shutil.copytree(bundle, signed)
    private, public, _ = generate_keypair(tmp_path / "keys")
    sign_bundle(signed, private)
    unsigned = recalibrate(signed, str(good), tmp_path / "unsigned", 0.1, device="cpu")
    assert unsigned.was_signed and not unsigned.signed
    assert not (tmp_path / "unsigned" / SIGNATURE_FILE).exists()
    resigned = recalibrate(signed, str(good), tmp_path / "resigned", 0.1, sign_key=private, device="cpu")
    assert resigned.signed
    verify_bundle(tmp_path / "resigned", public)
