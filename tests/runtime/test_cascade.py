"""Early-exit cascades (runtime.cascade): window calibration, the staged loop, and the manifest record."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tilecore.runtime.calibration import NormalStats
from tilecore.runtime.cascade import (
    Cascade,
    CascadeStage,
    calibrate_cascade,
    cheapest_first,
    narrowest_window,
    partial_scores,
    refit,
    run_cascade,
    search_order,
)
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.merge import MemberCalibration, MergeRule, TileOutputs, ensemble_result
from tilecore.runtime.tiling import tile_grid

GRID = tile_grid((8, 8), (8, 8), (8, 8))  # one tile: a member's map is its tile map
RULE = MergeRule(blur_sigma=0.0)
UNIT = NormalStats(0.0, 1.0, 0.0, 1.0)  # normalisation leaves raw outputs as they are
CALIBRATIONS = [MemberCalibration([UNIT], UNIT) for _ in range(3)]


def outputs_for(scores: np.ndarray) -> TileOutputs:
    """TileOutputs whose tile score is `scores[i]` and whose map is that score everywhere: [B, 1], [B, 1, 8, 8]."""
    scores = np.asarray(scores, dtype=np.float32)
    return TileOutputs(scores[:, None], np.broadcast_to(scores[:, None, None, None], (len(scores), 1, 8, 8)).copy())


def test_narrowest_window_with_no_errors_contains_every_image_whose_label_it_would_flip() -> None:
    scores = np.array([-3.0, -1.0, 0.5, 2.0, 4.0])
    full = np.array([False, True, False, True, True])  # -1.0 is anomalous to the full ensemble, 0.5 normal
    low, high = narrowest_window(scores, full, threshold=0.0, errors=0)
    assert (low, high) == (-1.0, 0.5)
    exits_normal, exits_anomalous = scores < low, scores > high
    assert not (exits_normal & full).any() and not (exits_anomalous & ~full).any()


def test_an_error_budget_narrows_the_window_and_never_excludes_the_threshold() -> None:
    scores = np.array([-5.0, -4.0, -3.0, 3.0, 4.0, 5.0])
    full = np.array([True, False, False, False, True, True])  # -5 and 3 would be exited wrongly
    assert narrowest_window(scores, full, 0.0, errors=0) == (-5.0, 3.0)
    low, high = narrowest_window(scores, full, 0.0, errors=1)
    assert high - low < 8.0 and low <= 0.0 <= high
    assert narrowest_window(scores, full, 0.0, errors=2) == (0.0, 0.0)


def calibration_scores(count: int = 400, seed: int = 0) -> np.ndarray:
    """Three correlated members' scores [3, N]: a shared signal plus each member's own noise."""
    rng = np.random.default_rng(seed)
    signal = np.concatenate([rng.normal(0, 1, count // 2), rng.normal(4, 1.5, count // 2)])
    return np.stack([signal + rng.normal(0, 0.6, count) for _ in range(3)]).astype(np.float32)


def test_calibrated_windows_keep_the_full_label_on_the_target_share_and_contain_the_threshold() -> None:
    scores = calibration_scores()
    cascade = calibrate_cascade(scores, 2.0, "mean", [[0], [1], [2]], [1.0, 2.0, 3.0], 0.99, margin=0.0)
    assert cascade.agreement >= 0.99
    assert [s.window is None for s in cascade.stages] == [False, False, True]
    assert all(s.window[0] <= 2.0 <= s.window[1] for s in cascade.stages[:2])
    assert sum(s.exit_share for s in cascade.stages) == pytest.approx(1.0)
    assert cascade.stages[0].exit_share > 0.5  # most images are far from the threshold and leave early
    assert cascade.mean_gflops() < 6.0


def test_a_margin_widens_every_window_and_keeps_more_images_running() -> None:
    scores = calibration_scores()
    tight = calibrate_cascade(scores, 2.0, "mean", [[0], [1], [2]], [1.0] * 3, 0.99, margin=0.0)
    wide = calibrate_cascade(scores, 2.0, "mean", [[0], [1], [2]], [1.0] * 3, 0.99, margin=1.0)
    for a, b in zip(tight.stages[:2], wide.stages[:2], strict=True):
        assert b.window[0] < a.window[0] and b.window[1] > a.window[1]
    assert wide.stages[0].exit_share < tight.stages[0].exit_share
    assert wide.agreement >= tight.agreement


def test_calibration_refuses_a_single_stage_and_bad_targets() -> None:
    scores = calibration_scores(20)
    with pytest.raises(TilecoreError, match="at least 2"):
        calibrate_cascade(scores, 0.0, "mean", [[0, 1, 2]], [1.0] * 3)
    with pytest.raises(TilecoreError, match="agreement 1.5"):
        calibrate_cascade(scores, 0.0, "mean", [[0], [1, 2]], [1.0] * 3, target_agreement=1.5)


def test_cheapest_first_orders_by_cost_and_checks_an_explicit_order() -> None:
    assert cheapest_first([3.0, 1.0, 2.0]) == [[1], [2], [0]]
    assert cheapest_first([1.0, 1.0]) == [[0], [1]]  # ties by member index
    assert cheapest_first([3.0, 1.0, 2.0], [2, 0, 1]) == [[2], [0], [1]]
    with pytest.raises(TilecoreError, match=r"cascade order \[0, 0, 1\]"):
        cheapest_first([3.0, 1.0, 2.0], [0, 0, 1])


CASCADE = Cascade(
    stages=(
        CascadeStage((1,), (-1.0, 1.0), 1.0, 0.5),
        CascadeStage((0,), (-0.5, 0.5), 2.0, 0.25),
        CascadeStage((2,), None, 3.0, 0.25),
    ),
    target_agreement=0.99,
    margin=0.0,
    agreement=1.0,
    calibration_images=4,
)
# member scores for 4 images: image 0 leaves at stage 1 (low), 1 at stage 1 (high), 2 at stage 2, 3 runs all
MEMBER_SCORES = np.array(
    [
        [-3.0, 3.0, 0.4, 0.0],  # member 0 (stage 2)
        [-2.0, 2.0, 0.8, 0.1],  # member 1 (stage 1)
        [-9.0, 9.0, 9.0, 0.2],  # member 2 (stage 3)
    ],
    dtype=np.float32,
)


def staged(threshold: float = 0.0, cascade: Cascade = CASCADE) -> tuple[object, list[tuple[int, list[int]]]]:
    calls: list[tuple[int, list[int]]] = []

    def member_outputs(m: int, images: list[int]) -> TileOutputs:
        calls.append((m, list(images)))
        return outputs_for(MEMBER_SCORES[m][images])

    return run_cascade(4, member_outputs, cascade, GRID, RULE, CALIBRATIONS, threshold), calls


def test_images_leave_at_the_first_stage_outside_its_window_and_later_members_never_see_them() -> None:
    result, calls = staged()
    assert result.exit_stage.tolist() == [1, 1, 2, 3]
    assert calls == [(1, [0, 1, 2, 3]), (0, [2, 3]), (2, [3])]
    assert result.images_per_stage == [4, 2, 1]
    assert result.scores[:2].tolist() == [-2.0, 2.0]  # stage 1: member 1 alone
    assert result.scores[2] == pytest.approx((0.4 + 0.8) / 2)  # stage 2: members 0 and 1
    assert np.all(result.maps[2] == result.scores[2])  # the map is the map of the stages it ran


def test_the_last_stage_gives_exactly_the_full_ensemble() -> None:
    result, _ = staged()
    full_scores, full_maps = ensemble_result([outputs_for(s) for s in MEMBER_SCORES], GRID, RULE, CALIBRATIONS)
    assert result.scores[3] == full_scores[3]  # bit for bit: fused in member order whatever the run order
    assert np.array_equal(result.maps[3], full_maps[3])
    assert np.array_equal(partial_scores(MEMBER_SCORES, [2, 0, 1], "mean"), full_scores)


def test_a_run_threshold_outside_a_window_keeps_its_images_running() -> None:
    result, _ = staged(threshold=2.5)  # above stage 1's high: image 1 (2.0) may not exit as anomalous there
    assert result.exit_stage.tolist() == [1, 3, 3, 3]
    assert (result.scores >= 2.5).tolist() == [False, True, True, False]  # image 2: member 2 says 9


# --- the manifest record ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_manifest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real bundle's manifest.json (the tiny run of tests/tiny.py, two members) as parsed JSON."""
    from tests.tiny import tiny_run
    from tilecore.export.bundle import export_run

    root = tmp_path_factory.mktemp("cascade_manifest")
    run = tiny_run(root)
    out = root / "bundle"
    export_run(run, out)
    return json.loads((out / "manifest.json").read_text())


def with_cascade(raw: dict, members: int, windows: list) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["members"] = raw["members"] * members
    raw["calibration"]["members"] = raw["calibration"]["members"] * members
    stages = [{"members": [i], "window": w, "gflops": 1.0, "exit_share": 0.5} for i, w in enumerate(windows)]
    stages[-1].pop("window")
    raw["cascade"] = {"stages": stages, "target_agreement": 0.995, "margin": 1.0, "agreement": 1.0,
                      "calibration_images": 30, "order_rule": "cheapest",
                      "calibration_scores": [[0.5, -0.25, 1.5]] * members}  # fmt: skip
    return raw


def test_a_cascade_round_trips_through_the_manifest(bundle_manifest: dict) -> None:
    from tilecore.runtime.manifest import Manifest

    t = bundle_manifest["thresholds"]["image"]
    raw = with_cascade(bundle_manifest, 2, [[t - 1, t + 1], None])
    manifest = Manifest.from_dict(raw)
    assert manifest.cascade.order == (0, 1)
    assert manifest.cascade.stages[0].window == (t - 1, t + 1)
    assert manifest.cascade.calibration_scores == ((0.5, -0.25, 1.5), (0.5, -0.25, 1.5))
    assert Manifest.from_dict(manifest.to_dict()) == manifest


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda raw, t: raw["cascade"]["stages"][1].update(members=[0]), r"cascade\.stages: expected each member"),
        (
            lambda raw, t: raw["cascade"]["stages"][0].update(window=[t + 1, t + 2]),
            r"stages\[0\]\.window: expected a "
            "window containing the image threshold",
        ),  # fmt: skip
        (lambda raw, t: raw["cascade"]["stages"][1].update(window=[t - 1, t + 1]), r"the last stage has no window"),
        (lambda raw, t: raw["cascade"].update(order_rule="fastest"), r"order_rule: expected one of 'cheapest'"),
        (
            lambda raw, t: raw["cascade"].update(calibration_scores=[[0.5]]),
            r"calibration_scores: expected one score list per member \(2\)",
        ),
        (
            lambda raw, t: raw["cascade"].update(calibration_scores=[[0.5], [float("nan")]]),
            r"calibration_scores: expected a list of per-member lists of finite numbers",
        ),
        (
            lambda raw, t: raw["cascade"].update(calibration_scores=[[0.5], [1.0, 2.0]]),
            r"calibration_scores: expected per-member lists of one non-zero length",
        ),
        (lambda raw, t: raw["cascade"]["stages"][0].update(window=[t + 1, t - 1]), r"low <= high"),
        (lambda raw, t: raw["cascade"].update(stages=raw["cascade"]["stages"][:1]), r"at least 2"),
    ],
)
def test_a_bad_cascade_record_is_refused_in_one_line(bundle_manifest: dict, change, pattern: str) -> None:
    from tilecore.runtime.manifest import Manifest

    t = bundle_manifest["thresholds"]["image"]
    raw = with_cascade(bundle_manifest, 2, [[t - 1, t + 1], None])
    change(raw, t)
    with pytest.raises(TilecoreError, match=pattern) as refused:
        Manifest.from_dict(raw, "bundle b")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("old", [3, 4])  # 4: cascades without calibration scores
def test_an_older_format_bundle_is_refused_with_a_re_export_hint(bundle_manifest: dict, old: int) -> None:
    from tilecore.runtime.manifest import Manifest

    raw = dict(bundle_manifest, format_version=old)
    with pytest.raises(TilecoreError, match=f"format version {old}, this tilecore reads version 5; re-export"):
        Manifest.from_dict(raw, "bundle b")


def test_search_order_puts_a_costlier_member_first_when_it_lets_more_images_leave() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([False] * 20 + [True] * 20)
    informative = np.where(truth, 3.0, -3.0) + rng.normal(0, 0.1, 40)  # member 1: separates cleanly
    vague = rng.normal(0, 0.05, 40)  # member 0: every score next to the threshold
    scores = np.stack([vague, informative]).astype(np.float32)  # [M=2, N=40]
    gflops = [1.0, 2.0]
    cheapest = calibrate_cascade(scores, 0.0, "mean", cheapest_first(gflops), gflops, 1.0, 0.0)
    searched = search_order(scores, 0.0, "mean", gflops, 1.0, 0.0)
    assert cheapest.order == (0, 1) and cheapest.mean_gflops() > 2.8  # few leave after member 0
    assert searched.order == (1, 0) and searched.order_rule == "search"
    assert searched.mean_gflops() == pytest.approx(2.0)  # everybody leaves after member 1
    assert searched.agreement == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_order_spends_the_least_of_every_order(seed: int) -> None:
    import itertools

    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 1, (3, 60)).astype(np.float32) + np.linspace(-2, 2, 60, dtype=np.float32)  # [M, N]
    gflops = [1.0, 1.5, 2.0]
    costs = [calibrate_cascade(scores, 0.3, "mean", [[m] for m in order], gflops, 0.95, 0.5).mean_gflops()
             for order in itertools.permutations(range(3))]  # fmt: skip
    assert search_order(scores, 0.3, "mean", gflops, 0.95, 0.5).mean_gflops() == pytest.approx(min(costs))


@pytest.mark.parametrize("rule", ["cheapest", "search"])
def test_refit_sets_the_windows_on_export_and_new_images_at_the_new_threshold(rule: str) -> None:
    rng = np.random.default_rng(3)
    exported = rng.normal(0, 1, (3, 30)).astype(np.float32)  # [M, N] export's calibration images
    line = rng.normal(-1, 0.5, (3, 50)).astype(np.float32)  # [M, K] good images from the line
    gflops = [1.0, 1.5, 2.0]
    if rule == "search":
        cascade = search_order(exported, 0.0, "mean", gflops, 0.99, 1.0)
    else:
        cascade = calibrate_cascade(exported, 0.0, "mean", cheapest_first(gflops), gflops, 0.99, 1.0)
    cascade = dataclasses.replace(cascade, calibration_scores=tuple(map(tuple, exported.tolist())))
    fitted = refit(cascade, line, 0.8, "mean")
    both = np.concatenate([exported, line], axis=1)
    if rule == "search":
        expected = search_order(both, 0.8, "mean", gflops, 0.99, 1.0)
    else:
        expected = calibrate_cascade(both, 0.8, "mean", cheapest_first(gflops), gflops, 0.99, 1.0)
    assert [s.window for s in fitted.stages] == [s.window for s in expected.stages]
    assert fitted.order == expected.order and fitted.order_rule == rule
    assert fitted.calibration_images == 80 and fitted.calibration_scores == cascade.calibration_scores
    assert all(s.window[0] <= 0.8 <= s.window[1] for s in fitted.stages[:-1])


def test_calibrate_moves_windows_recorded_without_calibration_scores(bundle_manifest: dict) -> None:
    from tilecore.runtime.manifest import Manifest
    from tilecore.runtime.recalibrate import GoodScores, recalibrated_manifest

    t = bundle_manifest["thresholds"]["image"]
    raw = with_cascade(bundle_manifest, 2, [[t - 1, t + 1], None])
    raw["cascade"]["calibration_scores"] = []
    manifest = Manifest.from_dict(raw)
    good = GoodScores(np.linspace(t, t + 1, 100), 1.0, "f" * 64)
    moved = recalibrated_manifest(manifest, good, 0.01, 0.999)
    delta = moved.thresholds.image - t
    assert delta != 0
    assert moved.cascade.stages[0].window == pytest.approx((t - 1 + delta, t + 1 + delta))
