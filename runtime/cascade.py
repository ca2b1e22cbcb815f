"""Window-based early-exit cascades over an ensemble's members.

Members run in stages, cheapest first. After each stage but the last, the fused score of the members run
so far is compared with that stage's window [low, high] around the image threshold: an image scoring
below `low` exits as normal, above `high` as anomalous, and only the images inside the window go on to
the next stage. An exiting image's score and map are those of the members it ran, so its label is always
`score >= threshold` (every window contains the threshold).

The windows are calibrated at export on the run's validation images and the synthetic defects painted
into them (`calibrate_cascade`, never test data): each is the narrowest window that keeps the full
ensemble's label on a target share of those images, widened by a margin. `run_cascade` is the one staged
scoring loop; the runtime (Predictor) and the PyTorch evaluation (train.ensemble) both call it, with their
own way of computing a member's tile outputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from tilecore.runtime.calibration import fuse
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.merge import MemberCalibration, MergeRule, TileOutputs, ensemble_result
from tilecore.runtime.stage_timer import StageTimer
from tilecore.runtime.tiling import TileGrid

DEFAULT_AGREEMENT = 0.995  # share of calibration images whose full-ensemble label the cascade keeps
DEFAULT_MARGIN = 1.0  # window widening, in standard deviations of (full score - stage score) on calibration images
ORDER_RULES = ("cheapest", "given", "search")  # how the member order was chosen (cheapest_first, config, search_order)
SEARCH_MEMBERS = 4  # search_order tries every order up to this many members (4! = 24 calibrations)


@dataclass(frozen=True)
class CascadeStage:
    """One stage: the members it adds, its exit window (None for the last stage) and what it cost and did
    on the calibration images."""

    members: tuple[int, ...]  # member indices this stage runs (cheapest first overall)
    window: tuple[float, float] | None  # (low, high) on the fused score of every member run so far
    gflops: float  # backbone GFLOPs per image of this stage's members
    exit_share: float  # share of the calibration images that exit at this stage


@dataclass(frozen=True)
class Cascade:
    stages: tuple[CascadeStage, ...]
    target_agreement: float
    margin: float
    agreement: float  # share of calibration images whose cascade label equals the full ensemble's
    calibration_images: int  # validation normals + synthetic defects (+ a line's good images) the windows were set on
    order_rule: str = "cheapest"  # ORDER_RULES; "search" is searched again when the windows are refit
    # export's calibration images' normalised member scores [M][N], kept so that `tilecore calibrate` can refit
    # the windows at a new threshold (refit); empty in cascades built without them
    calibration_scores: tuple[tuple[float, ...], ...] = ()

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(m for stage in self.stages for m in stage.members)

    def mean_gflops(self) -> float:
        """Backbone GFLOPs per image spent on the calibration images (an image pays every stage it reaches)."""
        reached, total = 1.0, 0.0
        for stage in self.stages:
            total += reached * stage.gflops
            reached -= stage.exit_share
        return total

    def shifted(self, delta: float) -> Cascade:
        """The cascade for an image threshold moved by `delta` (tilecore calibrate): every window moves with
        it, so each keeps its distance from the decision it guards."""
        stages = tuple(
            replace(s, window=None if s.window is None else (s.window[0] + delta, s.window[1] + delta))
            for s in self.stages
        )
        return replace(self, stages=stages)

    def to_dict(self) -> dict:
        return {
            "stages": [
                {
                    "members": list(s.members),
                    "window": None if s.window is None else list(s.window),
                    "gflops": s.gflops,
                    "exit_share": s.exit_share,
                }
                for s in self.stages
            ],
            "target_agreement": self.target_agreement,
            "margin": self.margin,
            "agreement": self.agreement,
            "calibration_images": self.calibration_images,
            "order_rule": self.order_rule,
            "calibration_scores": [list(row) for row in self.calibration_scores],
        }


def partial_scores(member_scores: np.ndarray, members: list[int], rule: str) -> np.ndarray:
    """Fused scores [N] of the given members' normalised scores member_scores [M, N], fused in member order
    (as the full ensemble fuses them, so the last stage equals the full ensemble exactly)."""
    return fuse([member_scores[m] for m in sorted(members)], rule)


def narrowest_window(scores: np.ndarray, full_labels: np.ndarray, threshold: float, errors: int) -> tuple[float, float]:
    """The narrowest (low, high) containing `threshold` that lets at most `errors` of these images exit with
    a label other than the full ensemble's: scores < low exit normal, scores > high exit anomalous."""
    anomalous = np.sort(scores[full_labels])  # ascending: the ones an exit below `low` would get wrong
    normal = np.sort(scores[~full_labels])[::-1]  # descending: the ones an exit above `high` would get wrong
    best = (threshold, threshold)
    best_width = math.inf
    for below in range(errors + 1):  # `below` anomalous images may exit normal, the rest of the budget above
        above = errors - below
        low = min(threshold, float(anomalous[below])) if below < len(anomalous) else threshold
        high = max(threshold, float(normal[above])) if above < len(normal) else threshold
        if high - low < best_width:
            best, best_width = (low, high), high - low
    return best


def calibrate_cascade(
    member_scores: np.ndarray,
    threshold: float,
    rule: str,
    stages: list[list[int]],
    gflops: list[float],
    target_agreement: float = DEFAULT_AGREEMENT,
    margin: float = DEFAULT_MARGIN,
) -> Cascade:
    """Windows for `stages` (lists of member indices, run in that order) from the calibration images'
    normalised member scores member_scores [M, N] (normal validation images, and synthetic defects or
    anomalous validation images). `gflops[m]`: member m's cost.

    The error budget floor((1 - target) * N) is shared equally by the stages that have a window; each
    window is the narrowest within its share (narrowest_window) over the images that reach it, then
    widened on both sides by `margin` standard deviations of (full ensemble score - stage score) over the
    images reaching the stage: how far the members still to run can move a score.
    """
    member_scores = np.asarray(member_scores, dtype=np.float32)
    count = member_scores.shape[1]
    if len(stages) < 2:
        raise TilecoreError(f"cascade: {len(stages)} stage(s), expected at least 2")
    if not 0.0 < target_agreement <= 1.0:
        raise TilecoreError(f"cascade agreement {target_agreement}: expected 0 < value <= 1")
    if margin < 0:
        raise TilecoreError(f"cascade margin {margin}: expected >= 0")
    full_scores = partial_scores(member_scores, list(range(member_scores.shape[0])), rule)  # [N]
    full = full_scores >= threshold
    budget = math.floor((1.0 - target_agreement) * count + 1e-9)
    windowed = len(stages) - 1
    shares = [budget // windowed + (1 if s < budget % windowed else 0) for s in range(windowed)]
    reached = np.ones(count, dtype=bool)
    cascade_labels = np.zeros(count, dtype=bool)
    run: list[int] = []
    built = []
    for s, members in enumerate(stages):
        run += members
        scores = partial_scores(member_scores, run, rule)  # [N]
        window = None
        exits = reached.copy()
        if s < windowed:
            low, high = narrowest_window(scores[reached], full[reached], threshold, shares[s])
            moved = full_scores[reached] - scores[reached]  # how far the members still to run moved a score
            spread = float(np.std(moved)) if len(moved) else 0.0
            window = (low - margin * spread, high + margin * spread)
            exits = reached & ((scores < window[0]) | (scores > window[1]))
        cascade_labels[exits] = scores[exits] >= threshold
        built.append(CascadeStage(tuple(members), window, float(sum(gflops[m] for m in members)),
                                  float(exits.sum() / count)))  # fmt: skip
        reached &= ~exits
    agreement = float(np.mean(cascade_labels == full))
    return Cascade(tuple(built), target_agreement, margin, agreement, count)


def search_order(
    member_scores: np.ndarray,
    threshold: float,
    rule: str,
    gflops: list[float],
    target_agreement: float = DEFAULT_AGREEMENT,
    margin: float = DEFAULT_MARGIN,
) -> Cascade:
    """The one-member-per-stage cascade, over every member order, that spends the fewest GFLOPs per image
    on the calibration images (Cascade.mean_gflops) once its windows are calibrated; ties go to the order
    met first, cheapest first. A costlier member can pay for itself by sending more images out at once.
    More than SEARCH_MEMBERS members: cheapest first only."""
    first = [stage[0] for stage in cheapest_first(gflops)]
    orders = itertools.permutations(first) if len(gflops) <= SEARCH_MEMBERS else [tuple(first)]
    best = None
    for order in orders:
        cascade = calibrate_cascade(member_scores, threshold, rule, [[m] for m in order], gflops,
                                    target_agreement, margin)  # fmt: skip
        if best is None or cascade.mean_gflops() < best.mean_gflops() - 1e-12:
            best = cascade
    return replace(best, order_rule="search")


def member_costs(cascade: Cascade) -> list[float]:
    """Each member's GFLOPs per image, from a cascade of one member per stage."""
    costs = [0.0] * len(cascade.order)
    for stage in cascade.stages:
        if len(stage.members) != 1:
            raise TilecoreError(f"cascade stage with members {list(stage.members)}: expected one member per stage")
        costs[stage.members[0]] = stage.gflops
    return costs


def refit(cascade: Cascade, extra_scores: np.ndarray, threshold: float, rule: str) -> Cascade:
    """The cascade with its windows calibrated again at `threshold` (tilecore calibrate), on export's
    calibration images (cascade.calibration_scores) plus more images' normalised member scores
    extra_scores [M, K] (a line's good images); the order is searched again when it was searched."""
    extra = np.asarray(extra_scores, dtype=np.float32).reshape(len(cascade.order), -1)  # [M, K]
    scores = np.concatenate([np.asarray(cascade.calibration_scores, dtype=np.float32), extra], axis=1)  # [M, N + K]
    gflops = member_costs(cascade)
    if cascade.order_rule == "search":
        fitted = search_order(scores, threshold, rule, gflops, cascade.target_agreement, cascade.margin)
    else:
        stages = [list(stage.members) for stage in cascade.stages]
        fitted = calibrate_cascade(scores, threshold, rule, stages, gflops, cascade.target_agreement, cascade.margin)
        fitted = replace(fitted, order_rule=cascade.order_rule)
    return replace(fitted, calibration_scores=cascade.calibration_scores)


def cheapest_first(gflops: list[float], order: list[int] | None = None) -> list[list[int]]:
    """One member per stage, in `order` when given, else by ascending cost (ties by member index)."""
    if order:
        if sorted(order) != list(range(len(gflops))):
            raise TilecoreError(f"cascade order {order}: expected each member index 0..{len(gflops) - 1} once")
        return [[m] for m in order]
    return [[m] for m in sorted(range(len(gflops)), key=lambda m: (gflops[m], m))]


@dataclass
class CascadeOutputs:
    """What a staged pass gives for a batch: fused scores [B], maps [B, H, W], the 1-based stage each image
    exited at [B], and each stage's image count (how many images ran it)."""

    scores: np.ndarray
    maps: np.ndarray
    exit_stage: np.ndarray
    images_per_stage: list[int]


def run_cascade(
    count: int,
    member_outputs: Callable[[int, list[int]], TileOutputs],
    cascade: Cascade,
    grid: TileGrid,
    rule: MergeRule,
    calibrations: list[MemberCalibration],
    threshold: float,
    timer: StageTimer | None = None,
) -> CascadeOutputs:
    """Score a batch of `count` images stage by stage: `member_outputs(m, images)` gives member m's raw tile
    outputs for those batch positions. Images leave at the first stage whose window they fall outside; a
    window is widened to contain `threshold` (a run may set its own), so a label is always score >= threshold."""
    timer = timer or StageTimer()
    active = list(range(count))  # batch positions still running
    raw: dict[int, TileOutputs] = {}  # member -> outputs of the images in `active`, in that order
    scores = np.zeros(count, dtype=np.float32)
    maps = np.zeros((count, grid.image_h, grid.image_w), dtype=np.float32)
    exit_stage = np.zeros(count, dtype=np.int32)
    images_per_stage = []
    for s, stage in enumerate(cascade.stages):
        images_per_stage.append(len(active))
        if not active:
            continue
        for m in stage.members:
            raw[m] = member_outputs(m, active)
        run = sorted(raw)  # fused in member order, as the full ensemble is
        with timer("merge"):
            stage_scores, stage_maps = ensemble_result(
                [raw[m] for m in run], grid, rule, [calibrations[m] for m in run]
            )  # [A], [A, H, W]
        leaving = np.ones(len(active), dtype=bool)
        if stage.window is not None:
            low, high = min(stage.window[0], threshold), max(stage.window[1], threshold)
            leaving = (stage_scores < low) | (stage_scores > high)
        for j in np.flatnonzero(leaving):
            i = active[j]
            scores[i], maps[i], exit_stage[i] = stage_scores[j], stage_maps[j], s + 1
        staying = ~leaving
        active = [i for i, stay in zip(active, staying, strict=True) if stay]
        raw = {m: TileOutputs(o.scores[staying], o.maps[staying]) for m, o in raw.items()}
    return CascadeOutputs(scores, maps, exit_stage, images_per_stage)
