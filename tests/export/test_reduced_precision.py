"""Reduced-precision CPU engines at export: written beside fp32, checked on validation, refused below the floor."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.tiny import tiny_run
from tilecore.export.bundle import export_run
from tilecore.export.reduced_precision import score_difference
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.manifest import read_manifest
from tilecore.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("precision"), tiling={})  # untiled


def test_score_difference_arithmetic() -> None:
    check = score_difference(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.5, 1.9, 3.0]), threshold=1.8)
    assert check["max_score_diff"] == 0.5 and check["images"] == 4
    assert check["label_agreement"] == 1.0  # 1.5 and 1.0 both below 1.8; 1.9 and 2.0 both above
    assert check["flipped_labels"] == 0 and check["nearest_to_threshold"] == pytest.approx(0.2)  # 2.0 - 1.8
    flip = score_difference(np.array([1.0, 2.0]), np.array([2.0, 2.0]), 1.5)
    assert flip["label_agreement"] == 0.5 and flip["flipped_labels"] == 1


def test_int8_graph_is_written_checked_and_selectable(run: Path, tmp_path: Path) -> None:
    export_run(run, tmp_path / "b", precisions=("int8",), precision_floor=0.0)
    manifest = read_manifest(tmp_path / "b")  # verifies every checksum, the int8 graph's included
    (graph,) = manifest.reduced_precision.int8.values()
    assert graph.file.endswith(".int8.onnx") and graph.file in manifest.files
    check = graph.validation
    images = [read_rgb(p) for p in json.loads((run / "gravel" / "split.json").read_text())["validation"]]
    fp32 = np.array([r.score for r in Predictor(tmp_path / "b", device="cpu").predict_batch(images)])
    int8_predictor = Predictor(tmp_path / "b", device=check.backend, precision="int8")
    int8 = np.array([r.score for r in int8_predictor.predict_batch(images)])
    assert not np.array_equal(int8, fp32)  # a different engine ran
    # what the manifest says, recomputed from both engines' scores on the tiny run's 2 validation images
    diff, threshold = np.abs(int8 - fp32), manifest.thresholds.image
    flipped = (int8 >= threshold) != (fp32 >= threshold)
    assert check.images == len(images) == 2
    assert check.max_score_diff == pytest.approx(diff.max(), abs=1e-5)
    assert check.p99_score_diff == pytest.approx(np.percentile(diff, 99), abs=1e-5)
    assert check.flipped_labels == flipped.sum() and check.label_agreement == pytest.approx(1 - flipped.mean())
    assert check.nearest_to_threshold == pytest.approx(np.abs(fp32 - threshold).min(), abs=1e-5)


def test_precision_below_the_floor_is_refused_and_nothing_written(run: Path, tmp_path: Path) -> None:
    with pytest.raises(TilecoreError, match="below the floor"):
        export_run(run, tmp_path / "b", precisions=("int8",), precision_floor=1.01)
    assert not any(tmp_path.iterdir())  # no bundle and no staging folder left behind


def test_unknown_precision_is_refused(run: Path, tmp_path: Path) -> None:
    with pytest.raises(TilecoreError, match="--precision 'fp8'"):
        export_run(run, tmp_path / "b", precisions=("fp8",))


def test_bf16_check_is_recorded(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="bf16 is checked through OpenVINO, part of the dev install")
    import openvino

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16")
    manifest = export_run(run, tmp_path / "b", precisions=("bf16",), precision_floor=0.0)
    check = manifest.reduced_precision.bf16
    assert check.backend == "openvino" and check.max_score_diff > 0  # bf16 really changed something


def test_int8_max_error_keeps_costly_layers_float(run: Path, tmp_path: Path) -> None:
    export_run(run, tmp_path / "all", precisions=("int8",), precision_floor=0.0)
    export_run(run, tmp_path / "ac", precisions=("int8",), precision_floor=0.0, int8_max_error=0.004)
    (everything,) = read_manifest(tmp_path / "all").reduced_precision.int8.values()
    (controlled,) = read_manifest(tmp_path / "ac").reduced_precision.int8.values()
    assert "accuracy control (embedding error <= 0.004)" in controlled.method
    assert everything.embedding_error > 0.004  # all-int8 misses the bound, so some layers must go back to float
    assert controlled.embedding_error <= 0.004
    int8_convs = [int(g.method.split(" of ")[0].rsplit(" ", 1)[1]) for g in (everything, controlled)]
    assert int8_convs[1] < int8_convs[0]


@pytest.mark.parametrize(("precisions", "max_error"), [(("int8",), 0.0), (("int8",), 1.5), (("bf16",), 0.02)])
def test_int8_max_error_out_of_range_or_without_int8_is_refused(
    run: Path, tmp_path: Path, precisions: tuple[str, ...], max_error: float
) -> None:
    with pytest.raises(TilecoreError, match="--int8-max-error"):
        export_run(run, tmp_path / "b", precisions=precisions, int8_max_error=max_error)
    assert not (tmp_path / "b").exists()


def test_recheck_scores_images_near_the_threshold_again_in_fp32(run: Path, tmp_path: Path) -> None:
    export_run(run, tmp_path / "b", precisions=("int8",), precision_floor=0.0)
    split = json.loads((run / "gravel" / "split.json").read_text())
    images = [read_rgb(p) for p in split["validation"] + split["test"]]
    fp32 = np.array([r.score for r in Predictor(tmp_path / "b", device="cpu").predict_batch(images)])
    int8 = np.array([r.score for r in Predictor(tmp_path / "b", device="cpu", precision="int8").predict_batch(images)])
    threshold = read_manifest(tmp_path / "b").thresholds.image
    distance = np.abs(int8 - threshold)
    margin = float(np.median(distance))  # about half of the images fall inside
    cascade = Predictor(tmp_path / "b", device="cpu", precision="int8", recheck=margin)
    results = cascade.predict_batch(images)
    near = distance < margin
    assert 0 < near.sum() < len(images)
    assert [r.rechecked for r in results] == near.tolist()
    scores = np.array([r.score for r in results])
    np.testing.assert_allclose(scores[near], fp32[near], rtol=1e-6)  # decided by the fp32 engine
    np.testing.assert_allclose(scores[~near], int8[~near], rtol=1e-6)  # the int8 score stands
    assert all(r.label == (r.score >= threshold) for r in results)
    assert all("recheck" in r.timings_ms for r in results)
    with pytest.raises(TilecoreError, match="--recheck"):
        Predictor(tmp_path / "b", device="cpu", recheck=1.0)  # fp32 has nothing to recheck
    with pytest.raises(TilecoreError, match="--recheck"):
        Predictor(tmp_path / "b", device="cpu", precision="int8", recheck=0.0)
    with pytest.raises(TilecoreError, match="--recheck"):
        Predictor(tmp_path / "b", device="cpu", precision="int8", recheck="near")
    (graph,) = read_manifest(tmp_path / "b").reduced_precision.int8.values()
    auto = Predictor(tmp_path / "b", device="cpu", precision="int8", recheck="auto")
    assert auto.recheck == graph.validation.max_score_diff  # the export's own measurement
    with pytest.raises(TilecoreError, match="records no bf16 check"):
        Predictor(tmp_path / "b", device="cpu", precision="bf16", recheck="auto")


def test_recheck_margin_reads_each_precisions_validation_check() -> None:
    from tilecore.runtime.manifest import Int8Graph, PrecisionCheck, ReducedPrecision
    from tilecore.runtime.predictor import recheck_margin

    def check(diff: float) -> PrecisionCheck:
        return PrecisionCheck("cpu", 4, diff, diff, 1.0, 0, 0.1)

    graphs = {name: Int8Graph(name + ".int8", "m", 0.01, check(d)) for name, d in (("a.onnx", 0.4), ("b.onnx", 0.7))}
    manifest = SimpleNamespace(reduced_precision=ReducedPrecision(0.99, graphs, check(0.3)))
    assert recheck_margin(manifest, "bf16", "auto") == 0.3
    assert recheck_margin(manifest, "int8", "auto") == 0.7  # the largest over the bundle's int8 graphs
    assert recheck_margin(manifest, "int8", "0.25") == 0.25 and recheck_margin(manifest, "int8", None) is None
    for precision, recheck, message in (("fp32", "auto", "only with a reduced"), ("int8", "-1", "expected a score")):
        with pytest.raises(TilecoreError, match=message):
            recheck_margin(manifest, precision, recheck)
    with pytest.raises(TilecoreError, match="records no bf16 check"):
        recheck_margin(SimpleNamespace(reduced_precision=None), "bf16", "auto")
