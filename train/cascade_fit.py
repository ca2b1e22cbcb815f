"""A category's early-exit cascade (runtime.cascade) from its run: member costs and calibrated windows.

The windows come from the scores training's calibration recorded for each member (calibration.json:
`validation_member_scores` on the held-out normal images, `synthetic_member_scores` on the synthetic
defects painted into them), so export and `tilecore eval` set the same windows without scoring anything.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from tilecore.runtime.cascade import Cascade, calibrate_cascade, cheapest_first, search_order
from tilecore.runtime.errors import TilecoreError
from tilecore.train.config import Config, MemberConfig
from tilecore.train.model import build_net, grid_for

log = logging.getLogger("tilecore")


def tile_gflops(member: MemberConfig, model_input: tuple[int, int]) -> float:
    """GFLOPs (multiply-adds counted twice) of a member's backbone and PatchCore head on one tile."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(), FlopCounterMode(display=False) as counter:
        build_net(member, None)(torch.zeros(1, 3, *model_input))  # architecture only: random weights
    return counter.get_total_flops() / 1e9


def member_gflops(config: Config) -> list[float]:
    """Each member's backbone GFLOPs per image: one pass per tile location."""
    grid, model_input, _ = grid_for(config)
    return [tile_gflops(m, model_input) * grid.count for m in config.members]


def fit_cascade(
    config: Config,
    calibration: dict,
    mode: str | None = None,
    where: str = "cascade",
    gflops: list[float] | None = None,
) -> Cascade | None:
    """The cascade for a category's `calibration` (calibration.json), or None: `mode` (default the config's
    cascade.mode) is off, the ensemble has one member, or the run was calibrated before member scores were
    recorded (logged). Windows contain the calibrated image threshold. `gflops`: member_gflops(config),
    when the caller has it already (one per run, not per category)."""
    mode = mode or config.cascade.mode
    if mode not in ("auto", "off"):
        raise TilecoreError(f"--cascade {mode}: expected auto or off")
    if mode == "off" or len(config.members) < 2:
        return None
    normal_scores = calibration.get("validation_member_scores")
    synthetic = calibration.get("synthetic_member_scores")
    if not normal_scores or synthetic is None:
        log.info("%s: the run's calibration has no per-member scores (trained before cascades); none built", where)
        return None
    normal = np.asarray(normal_scores, dtype=np.float32)  # [M, N]
    anomalous = np.asarray(synthetic, dtype=np.float32).reshape(len(config.members), -1)  # [M, K]
    scores = np.concatenate([normal, anomalous], axis=1)  # [M, N + K]
    gflops = gflops if gflops is not None else member_gflops(config)
    c = config.cascade
    threshold = float(calibration["thresholds"]["image"])
    if c.search_order:
        cascade = search_order(scores, threshold, config.fusion.rule, gflops, c.agreement, c.margin)
    else:
        stages = cheapest_first(gflops, c.order)
        cascade = calibrate_cascade(scores, threshold, config.fusion.rule, stages, gflops, c.agreement, c.margin)
        cascade = replace(cascade, order_rule="given" if c.order else "cheapest")
    rows = tuple(tuple(float(v) for v in row) for row in scores)  # what tilecore calibrate refits on
    return replace(cascade, calibration_scores=rows)


def describe(cascade: Cascade) -> str:
    """One line for logs: each stage's members, window and exit share, and the agreement reached."""
    parts = []
    for i, stage in enumerate(cascade.stages):
        window = "" if stage.window is None else f" window [{stage.window[0]:.3g}, {stage.window[1]:.3g}]"
        parts.append(f"stage {i + 1} members {list(stage.members)}{window} exits {stage.exit_share:.1%}")
    return (
        "; ".join(parts) + f"; agreement {cascade.agreement:.4f} on {cascade.calibration_images} calibration images "
        f"(target {cascade.target_agreement}), {cascade.mean_gflops():.2f} of "
        f"{sum(s.gflops for s in cascade.stages):.2f} GFLOPs per image"
    )
