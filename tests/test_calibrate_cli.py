"""`tilecore run --threshold` and `tilecore calibrate` through the CLI: recorded, checked, one-line refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.cli import ANSI, assert_one_line_refusal, describe, run_cli
from tests.runtime.test_recalibrate import good_images
from tests.runtime.test_run_stream import tiny_bundle
from tilecore.runtime.manifest import SIGNATURE_FILE, read_manifest
from tilecore.runtime.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, sign_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def good(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_images(bundle, tmp_path_factory.mktemp("good"))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_run_threshold_overrides_are_used_and_recorded(bundle: Path, good: Path, tmp_path: Path) -> None:
    plain = run_cli("run", bundle, good, "--out", tmp_path / "plain", "--device", "cpu")
    assert plain.returncode == 0, describe(plain)
    scored = [r for r in records(tmp_path / "plain") if "score" in r]
    cut = sorted(r["score"] for r in scored)[len(scored) // 2]  # half the images at or above it
    override = run_cli(
        "run", bundle, good, "--out", tmp_path / "set", "--device", "cpu", "--threshold", str(cut),
        "--pixel-threshold", "0.5", "--masks",
    )  # fmt: skip
    assert override.returncode == 0, describe(override)
    bundle_thresholds = read_manifest(bundle).thresholds
    summary = json.loads((tmp_path / "set" / "summary.json").read_text())["thresholds"]
    assert (summary["image"], summary["image_source"]) == (cut, "run")
    assert (summary["pixel"], summary["pixel_source"]) == (0.5, "run")
    assert (summary["bundle_image"], summary["bundle_pixel"]) == (bundle_thresholds.image, bundle_thresholds.pixel)
    before = json.loads((tmp_path / "plain" / "summary.json").read_text())["thresholds"]
    assert (before["image"], before["image_source"], before["pixel_source"]) == (
        bundle_thresholds.image, "bundle", "bundle"
    )  # fmt: skip
    for record in records(tmp_path / "set"):
        if "score" in record:
            assert record["threshold"] == pytest.approx(cut)
            assert record["label"] == ("anomalous" if record["score"] >= cut else "normal")
    labels = [r["label"] for r in records(tmp_path / "set") if "score" in r]
    assert labels.count("anomalous") == len(scored) - len(scored) // 2
    resumed = run_cli("run", bundle, good, "--out", tmp_path / "set", "--device", "cpu", "--resume")
    assert_one_line_refusal(resumed, "image_threshold")  # another threshold never mixes into the same results


def test_run_threshold_must_be_finite(bundle: Path, good: Path, tmp_path: Path) -> None:
    proc = run_cli("run", bundle, good, "--out", tmp_path / "out", "--device", "cpu", "--threshold", "nan")
    assert_one_line_refusal(proc, r"--threshold nan: expected a finite number")


def test_calibrate_signed_bundle_then_resign_and_trust(bundle: Path, good: Path, tmp_path: Path) -> None:
    keys = run_cli("keygen", "--out", tmp_path / "keys")
    assert keys.returncode == 0, describe(keys)
    private, public = tmp_path / "keys" / PRIVATE_KEY_FILE, tmp_path / "keys" / PUBLIC_KEY_FILE
    signed = tmp_path / "signed"
    shutil.copytree(bundle, signed)
    sign_bundle(signed, private)
    proc = run_cli("calibrate", signed, good, "--out", tmp_path / "new", "--target-fpr", "0.1", "--device", "cpu")
    assert proc.returncode == 0, describe(proc)
    text = ANSI.sub("", proc.stderr)
    assert re.search(r"skipped .*99_corrupt\.png", text), describe(proc)
    assert re.search(r"of 10 good images flagged, target 0\.1\).*1 image\(s\) skipped", " ".join(text.split()))
    assert "unsigned" in text and not (tmp_path / "new" / SIGNATURE_FILE).exists()
    record = read_manifest(tmp_path / "new").thresholds.recalibrated
    assert record is not None and record.images == 10
    trusted = run_cli("run", tmp_path / "new", good, "--out", tmp_path / "out", "--device", "cpu", "--trust", public)
    assert_one_line_refusal(trusted, "not signed")
    resigned = tmp_path / "resigned"
    proc = run_cli("calibrate", signed, good, "--out", resigned, "--target-fpr", "0.1", "--sign", private)
    assert proc.returncode == 0, describe(proc)
    trusted = run_cli("run", resigned, good, "--out", tmp_path / "out2", "--device", "cpu", "--trust", public)
    assert trusted.returncode == 0, describe(trusted)
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert summary["thresholds"]["recalibrated"]["images_sha256"] == record.images_sha256


def test_calibrate_refuses_in_one_line(bundle: Path, good: Path, tmp_path: Path) -> None:
    few = run_cli("calibrate", bundle, good, "--out", tmp_path / "few", "--device", "cpu")  # default fpr 0.01
    assert_one_line_refusal(few, r"11 found, --target-fpr 0\.01 needs at least 100")  # before any is read
    same = run_cli("calibrate", bundle, good, "--out", bundle, "--target-fpr", "0.1")
    assert_one_line_refusal(same, "is the input bundle")
    assert not (tmp_path / "few").exists()
