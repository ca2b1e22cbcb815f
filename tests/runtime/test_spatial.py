"""The spatial cascade's shared logic (runtime.spatial) on hand-made arrays: which tiles run, what a skipped
tile is replaced with, the threshold search, and the last resort (every tile) equal to the full ensemble."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tilecore.runtime.calibration import NormalStats
from tilecore.runtime.cascade import Cascade, CascadeStage, run_cascade
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.merge import MemberCalibration, MergeRule, TileOutputs, ensemble_result
from tilecore.runtime.spatial import (
    GateScores,
    TileGate,
    calibrate_gate,
    coarse_tile_maxima,
    coarse_zmaps,
    fit_gate,
    refit_gate,
    run_spatial,
    spatial_member_outputs,
    spatial_scores,
    substitute_outputs,
    tile_selection,
)
from tilecore.runtime.tiling import tile_grid

GRID = tile_grid((16, 16), (8, 8), (8, 8))  # 2 x 2 tiles
RULES = [MergeRule(), MergeRule(normalisation="tile"), MergeRule(image_score="max", fusion="max")]


def stats(seed: int) -> MemberCalibration:
    """A member's statistics with a different normal mean and spread at each location."""
    rng = np.random.default_rng(seed)
    per_location = [
        NormalStats(float(rng.uniform(1, 2)), float(rng.uniform(0.1, 0.5)), float(rng.uniform(1, 2)),
                    float(rng.uniform(0.1, 0.5)))
        for _ in range(GRID.count)
    ]  # fmt: skip
    return MemberCalibration(per_location, NormalStats(1.5, 0.3, 1.5, 0.3))


CALIBRATIONS = [stats(1), stats(2)]


def raw_outputs(count: int, seed: int) -> list[TileOutputs]:
    """Two members' raw tile outputs [B, 4], [B, 4, 8, 8]."""
    rng = np.random.default_rng(seed)
    return [
        TileOutputs(rng.uniform(0, 3, (count, 4)).astype(np.float32), rng.uniform(0, 3, (count, 4, 8, 8)).astype(
            np.float32))
        for _ in range(2)
    ]  # fmt: skip


def reader(raw: list[TileOutputs], calls: list | None = None):
    """A fine_outputs callback that reads `raw` (and records each call's member, location and positions)."""

    def fine(member: int, location: int, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if calls is not None:
            calls.append((member, location, list(positions)))
        return raw[member].scores[positions, location], raw[member].maps[positions, location]

    return fine


def test_tile_maxima_are_the_z_maps_max_over_each_tile_clipped_to_the_image() -> None:
    grid = tile_grid((5, 5), (3, 3), (3, 3))  # the second row and column of tiles reach past the image
    z = np.full((1, 5, 5), -1.0, dtype=np.float32)
    z[0, 0, 0], z[0, 4, 4], z[0, 1, 3] = 5.0, 2.0, 3.0
    assert coarse_tile_maxima(z, grid).tolist() == [[5.0, 3.0, -1.0, 2.0]]
    with pytest.raises(TilecoreError, match="does not match the grid"):
        coarse_tile_maxima(np.zeros((1, 4, 4), dtype=np.float32), grid)


def test_z_maps_use_the_coarse_members_image_pixel_statistics() -> None:
    maps = np.array([[[1.0, 3.0]]], dtype=np.float32)
    z = coarse_zmaps(maps, NormalStats(image_mean=9.0, image_std=9.0, pixel_mean=1.0, pixel_std=2.0))
    assert z.tolist() == [[[0.0, 1.0]]]


def test_selection_runs_the_pairs_at_or_above_the_threshold() -> None:
    maxima = np.array([[0.5, 1.0], [1.5, -2.0]])
    assert tile_selection(maxima, 1.0).tolist() == [[False, True], [True, False]]
    assert tile_selection(maxima, -math.inf).all()


def test_a_substitute_is_the_locations_normal_mean_and_its_spread_times_the_coarse_crop() -> None:
    grid = tile_grid((5, 5), (3, 3), (3, 3))  # padded to 6 x 6
    s = [NormalStats(10.0 + j, 1.0, 100.0 + j, 2.0 + j) for j in range(4)]
    calibration = MemberCalibration(s, NormalStats(0.0, 1.0, 0.0, 1.0))
    z = np.arange(25, dtype=np.float32).reshape(1, 5, 5)
    out = substitute_outputs(z, grid, calibration)
    assert out.scores.tolist() == [[10.0, 11.0, 12.0, 13.0]]
    np.testing.assert_array_equal(out.maps[0, 0], 100.0 + 2.0 * z[0, :3, :3])
    np.testing.assert_array_equal(out.maps[0, 3, :2, :2], 103.0 + 5.0 * z[0, 3:, 3:])
    assert (out.maps[0, 3, 2, :] == 103.0).all() and (out.maps[0, 3, :, 2] == 103.0).all()  # padding: z = 0


def test_only_the_selected_pairs_run_batched_per_location_and_the_rest_are_substituted() -> None:
    raw, calls = raw_outputs(3, 0), []
    z = np.random.default_rng(5).normal(size=(3, 16, 16)).astype(np.float32)
    selection = np.array([[True, False, False, True], [False, False, False, False], [True, True, False, False]])
    out = spatial_member_outputs(1, [0, 1, 2], z, selection, GRID, CALIBRATIONS[1], reader(raw, calls))
    assert calls == [(1, 0, [0, 2]), (1, 1, [2]), (1, 3, [0])]  # one call per location, its images together
    substitutes = substitute_outputs(z, GRID, CALIBRATIONS[1])
    for i in range(3):
        for j in range(4):
            source = raw[1] if selection[i, j] else substitutes
            assert out.scores[i, j] == source.scores[i, j]
            np.testing.assert_array_equal(out.maps[i, j], source.maps[i, j])
    scores, maps, tiles_run = run_spatial(3, z, reader(raw), selection, GRID, MergeRule(), CALIBRATIONS)
    assert tiles_run.tolist() == [2, 0, 2] and scores.shape == (3,) and maps.shape == (3, 16, 16)


@pytest.mark.parametrize("rule", RULES)
def test_with_every_tile_selected_the_result_is_the_full_ensembles_exactly(rule: MergeRule) -> None:
    raw = raw_outputs(4, 1)
    z = np.random.default_rng(2).normal(size=(4, 16, 16)).astype(np.float32)
    selection = tile_selection(coarse_tile_maxima(z, GRID), -math.inf)
    scores, maps, tiles_run = run_spatial(4, z, reader(raw), selection, GRID, rule, CALIBRATIONS)
    full_scores, full_maps = ensemble_result(raw, GRID, rule, CALIBRATIONS)
    np.testing.assert_array_equal(scores, full_scores)
    np.testing.assert_array_equal(maps, full_maps)
    assert tiles_run.tolist() == [4] * 4


@pytest.mark.parametrize("rule", RULES)
def test_the_score_only_search_gives_the_real_grids_scores(rule: MergeRule) -> None:
    raw = raw_outputs(5, 3)
    z = np.random.default_rng(4).normal(size=(5, 16, 16)).astype(np.float32)
    maxima = coarse_tile_maxima(z, GRID)
    for threshold in (-math.inf, float(np.median(maxima)), float(maxima.max()) + 1):
        selection = tile_selection(maxima, threshold)
        real = run_spatial(5, z, reader(raw), selection, GRID, rule, CALIBRATIONS)[0]
        fast = spatial_scores([o.scores for o in raw], maxima, threshold, GRID, rule, CALIBRATIONS)
        np.testing.assert_allclose(fast, real, rtol=0, atol=1e-6)


def test_the_member_cascade_over_the_coarse_stages_tiles_runs_each_member_on_the_selected_tiles() -> None:
    raw = raw_outputs(3, 6)
    z = np.random.default_rng(7).normal(size=(3, 16, 16)).astype(np.float32)
    selection = tile_selection(coarse_tile_maxima(z, GRID), 0.5)
    cascade = Cascade((CascadeStage((0,), (-1e9, 1e9), 1.0, 0.0), CascadeStage((1,), None, 1.0, 1.0)), 0.9, 0, 1, 3)

    def outputs(member: int, positions: list[int]) -> TileOutputs:
        return spatial_member_outputs(member, positions, z, selection, GRID, CALIBRATIONS[member], reader(raw))

    staged = run_cascade(3, outputs, cascade, GRID, MergeRule(), CALIBRATIONS, threshold=0.0)
    scores, maps, _ = run_spatial(3, z, reader(raw), selection, GRID, MergeRule(), CALIBRATIONS)
    assert staged.exit_stage.tolist() == [2, 2, 2]  # nobody leaves the wide first window
    np.testing.assert_array_equal(staged.scores, scores)
    np.testing.assert_array_equal(staged.maps, maps)


def test_the_gate_takes_the_largest_threshold_that_keeps_the_labels_then_lowers_it_by_the_margin() -> None:
    maxima = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], dtype=np.float32)
    normal = np.array([True, True, False, False])
    full = np.array([False, False, True, True])

    def labels_at(t: float) -> np.ndarray:  # an image keeps its label while its largest c runs
        return full & (maxima.max(axis=1) >= t)

    gate = calibrate_gate(maxima, normal, full, labels_at, target_agreement=1.0, margin=0.0)
    assert gate.tile_threshold == 5.0 and gate.agreement == 1.0 and gate.tile_share == 3 / 8
    wider = calibrate_gate(maxima, normal, full, labels_at, target_agreement=1.0, margin=1.0)
    assert wider.tile_threshold == pytest.approx(5.0 - np.std([0.0, 1.0, 2.0, 3.0]))
    assert wider.tile_share == 4 / 8 and wider.calibration_images == 4
    half = calibrate_gate(maxima, normal, full, labels_at, target_agreement=0.75, margin=0.0)
    assert half.tile_threshold == 7.0 and half.agreement == 0.75


def test_when_no_threshold_keeps_the_labels_every_tile_runs() -> None:
    maxima = np.array([[0.0, 1.0], [2.0, 3.0]], dtype=np.float32)
    full = np.array([True, False])

    def labels_at(t: float) -> np.ndarray:
        return full if t == -math.inf else ~full

    gate = calibrate_gate(maxima, np.array([True, True]), full, labels_at, target_agreement=0.9, margin=1.0)
    assert gate.tile_threshold == -math.inf and gate.agreement == 1.0 and gate.tile_share == 1.0
    assert gate.to_dict()["tile_threshold"] is None  # JSON has no -inf: null means every tile runs
    with pytest.raises(TilecoreError, match="agreement 1.5"):
        calibrate_gate(maxima, np.array([True, True]), full, labels_at, target_agreement=1.5)
    with pytest.raises(TilecoreError, match="margin -1"):
        calibrate_gate(maxima, np.array([True, True]), full, labels_at, margin=-1)
    assert isinstance(gate, TileGate)


def test_a_margin_that_lands_on_a_threshold_missing_the_target_goes_lower_until_one_reaches_it() -> None:
    maxima = np.array([[0.0], [2.0], [4.0], [6.0]], dtype=np.float32)
    normal = np.array([True, True, False, False])
    full = np.array([False, False, True, True])

    def labels_at(t: float) -> np.ndarray:  # agreement is not monotone: only t in (2, 4] flips image 0
        flipped = full.copy()
        flipped[0] = 2.0 < t <= 4.0
        return flipped

    gate = calibrate_gate(maxima, normal, full, labels_at, target_agreement=1.0, margin=1.0)  # 6 - 1 lands at 5
    assert gate.tile_threshold == 5.0 and gate.agreement == 1.0  # std of the normals' maxima is 1
    narrow = calibrate_gate(maxima, normal, full, labels_at, target_agreement=1.0, margin=2.0)  # 6 - 2 lands at 4
    assert narrow.tile_threshold == 2.0 and narrow.agreement == 1.0  # 4 flips image 0: the next candidate down


def test_refit_gate_sets_the_gate_again_on_exports_images_and_the_good_ones_at_the_new_threshold() -> None:
    rng = np.random.default_rng(5)
    calibrations = [stats(1)]
    maxima = rng.normal(0, 1, (12, GRID.count)).astype(np.float32)  # export's images: [N, T]
    normal = np.array([True] * 4 + [False] * 8)
    tiles = [rng.normal(1.5, 0.4, (12, GRID.count)).astype(np.float32)]  # [M] x [N, T] raw tile scores
    tiles[0][~normal] += 1.0  # defects score higher
    gate = fit_gate(maxima, normal, tiles, 2.0, GRID, MergeRule(), calibrations, 0.9, 0.0)
    gate = dataclasses.replace(gate, scores=GateScores.of(maxima, normal, tiles))
    good_maxima = rng.normal(-0.5, 0.5, (20, GRID.count)).astype(np.float32)  # [K, T]
    good_tiles = rng.normal(1.5, 0.3, (1, 20, GRID.count)).astype(np.float32)  # [M, K, T]
    fitted = refit_gate(gate, good_maxima, good_tiles, 2.5, GRID, MergeRule(), calibrations)
    expected = fit_gate(np.concatenate([maxima, good_maxima]), np.concatenate([normal, np.ones(20, bool)]),
                        [np.concatenate([tiles[0], good_tiles[0]])], 2.5, GRID, MergeRule(), calibrations, 0.9,
                        0.0)  # fmt: skip
    assert fitted.tile_threshold == pytest.approx(expected.tile_threshold)
    assert fitted.agreement == expected.agreement and fitted.calibration_images == 32
    assert fitted.scores == gate.scores  # export's images only: the next calibrate starts from them again
    with pytest.raises(TilecoreError, match="records no calibration scores to refit its gate on"):
        refit_gate(dataclasses.replace(gate, scores=None), good_maxima, good_tiles, 2.5, GRID, MergeRule(),
                   calibrations)  # fmt: skip
