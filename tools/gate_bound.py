"""How many fine tiles can a coarse stage skip on a production-like stream at all? A bound from the stream itself.

For each category, the fine ENS9 run is exported with its coarse SM256 run (`tilecore export ENS9 --coarse
SM256`), and the runtime scores every tile of three sets once (Predictor.calibration_pass: coarse maxima c
[N, T], raw fine tile scores, full-ensemble scores): the production-like stream (--stream-defects test
defects, the test's good images, seed-1 normals: 95 % normal), and the line's good images (seed 2), which
set the operating point as `tilecore calibrate --target-fpr F` does. Then, at that threshold, on the stream:

- **export**: the gate as exported (set at the run's own threshold);
- **refit**: the gate set again at the line threshold on export's calibration images (gate_scores);
- **refit + line**: the same plus the line's good images (what `tilecore calibrate` ships);
- **oracle**: the largest tile threshold that keeps --agreement of the stream's own full-ensemble labels
  (runtime.spatial.calibrate_gate on the stream, no margin). No global tile threshold can do better;
- **image window** (not in tilecore): an image runs every fine tile when its coarse image score (the max of
  its z-map) reaches a cut, and none otherwise; the cut is the stream's own best (oracle), i.e. what the
  coarse model can tell about whole images.

Reported per variant: the share of (image, tile) pairs that ran, label agreement with the full ensemble and
image AUROC. Scores are cached in OUT/scores.json; delete it to score again.

    .venv/bin/python tools/gate_bound.py --runs runs/bench_spatial_line/runs --out runs/gate_bound
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import numpy as np
from bench_common import cpu_model, stream_normals_needed, tilecore_cli, write_json  # noqa: E402 (tools/ on path)

CATEGORIES = ["brick", "grass", "gravel"]


def export(runs: Path, category: str, out: Path) -> Path:
    bundle = out / "bundles" / category
    if (bundle / "manifest.json").is_file():
        return bundle
    command = [*tilecore_cli(), "export", str(runs / "ENS9"), "--category", category, "--out", str(bundle),
               "--coarse", str(runs / "SM256")]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"export {category} failed:\n{proc.stderr[-2000:]}")
    return bundle


def image_sets(runs: Path, category: str, normals: Path, line: Path, defects: int) -> dict:
    """name -> (paths, labels): the stream (first `defects` test defects, test good, seed-1 normals), the line."""
    test = json.loads((runs / "ENS9" / category / "split.json").read_text())["test"]
    bad = [p for p in test if "/good/" not in p][:defects]
    good = [p for p in test if "/good/" in p]
    held = sorted(str(p) for p in (normals / category / "test" / "good").glob("*.png"))
    held = held[: stream_normals_needed(len(bad), len(good))]
    line_paths = sorted(str(p) for p in (line / category / "test" / "good").glob("*.png"))
    return {
        "stream": (bad + good + held, [1] * len(bad) + [0] * (len(good) + len(held))),
        "line": (line_paths, [0] * len(line_paths)),
    }


def score(bundle: Path, paths: list[str]) -> dict:
    """The runtime's full pass over `paths`: coarse maxima [N, T], raw tile scores [M, N, T], fused scores [N]."""
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.predictor import Predictor

    predictor = Predictor(bundle, device="cpu", cascade=False, max_batch=8)
    passes = [predictor.calibration_pass([read_rgb(p) for p in paths[i : i + 8]]) for i in range(0, len(paths), 8)]
    return {
        "maxima": np.concatenate([p.coarse_maxima for p in passes]).tolist(),
        "tile_scores": np.concatenate([p.tile_scores for p in passes], axis=1).tolist(),
        "scores": [r.score for p in passes for r in p.results],
    }


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def judge(selection_maxima: np.ndarray, tile_threshold: float, data: dict, labels: np.ndarray, threshold: float,
          predictor) -> dict:  # fmt: skip
    """The stream at `tile_threshold` over `selection_maxima` [N, T]: tiles run, agreement, AUROC."""
    from tilecore.runtime.spatial import spatial_scores, tile_selection

    tiles = [np.asarray(t, dtype=np.float32) for t in data["tile_scores"]]
    full = np.asarray(data["scores"]) >= threshold
    gated = spatial_scores(tiles, selection_maxima, tile_threshold, predictor.grid, predictor.rule,
                           predictor.calibrations)  # fmt: skip
    return {
        "tile_threshold": float(tile_threshold) if math.isfinite(tile_threshold) else None,
        "tile_share": float(tile_selection(selection_maxima, tile_threshold).mean()),
        "agreement": float(np.mean((gated >= threshold) == full)),
        "auroc_full": auroc(labels, np.asarray(data["scores"])),
        "auroc_gated": auroc(labels, gated),
    }


def gate_window(c: np.ndarray, tiles: list[np.ndarray], full_scores: np.ndarray, threshold: float, predictor,
                target: float, margin: float) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """A design tilecore does not ship, fitted on calibration images: the tile gate at threshold t_c, then every
    tile for the images whose gated score lies inside a window around the image threshold (set as a member
    cascade's window is: runtime.cascade.narrowest_window, widened by `margin` std of full - gated). Returns
    the (t_c, window) pair that runs the fewest tiles on these images."""
    from tilecore.runtime.cascade import narrowest_window
    from tilecore.runtime.spatial import spatial_scores

    full = full_scores >= threshold
    budget = math.floor((1.0 - target) * len(full) + 1e-9)
    best = (math.inf, -math.inf, (threshold, threshold))
    for t_c in [*np.unique(c)[::-1][:: max(1, c.size // 400)], -math.inf]:  # about 400 candidates, largest first
        gated = spatial_scores(tiles, c, t_c, predictor.grid, predictor.rule, predictor.calibrations)  # [N]
        low, high = narrowest_window(gated, full, threshold, budget)
        spread = float(np.std(full_scores - gated)) * margin
        low, high = low - spread, high + spread
        inside = (gated >= low) & (gated <= high)
        cost = float(np.where(inside, c.shape[1], (c >= t_c).sum(axis=1)).mean())  # tiles run per image
        if cost < best[0]:
            best = (cost, t_c, (low, high))
    return best[1], best[2]


def judge_window(c: np.ndarray, t_c: float, window: tuple[float, float], data: dict, labels: np.ndarray,
                 threshold: float, predictor) -> dict:  # fmt: skip
    """The stream through gate_window's design: tiles run, agreement, AUROC."""
    from tilecore.runtime.spatial import spatial_scores

    tiles = [np.asarray(t, dtype=np.float32) for t in data["tile_scores"]]
    full_scores = np.asarray(data["scores"])
    gated = spatial_scores(tiles, c, t_c, predictor.grid, predictor.rule, predictor.calibrations)
    inside = (gated >= window[0]) & (gated <= window[1])
    scores = np.where(inside, full_scores, gated)
    return {
        "tile_threshold": float(t_c) if math.isfinite(t_c) else None,
        "window": [float(w) for w in window],
        "images_in_window": float(inside.mean()),
        "tile_share": float(np.where(inside, c.shape[1], (c >= t_c).sum(axis=1)).mean() / c.shape[1]),
        "agreement": float(np.mean((scores >= threshold) == (full_scores >= threshold))),
        "auroc_full": auroc(labels, full_scores),
        "auroc_gated": auroc(labels, scores),
    }


def describe(bundle: Path, data: dict, labels: np.ndarray, fpr: float, agreement: float) -> dict:
    from tilecore.runtime.predictor import Predictor
    from tilecore.runtime.recalibrate import fpr_threshold
    from tilecore.runtime.spatial import calibrate_gate, fit_gate, refit_gate, spatial_scores

    predictor = Predictor(bundle, device="cpu", cascade=False)
    gate = predictor.manifest.coarse.gate
    threshold = fpr_threshold(np.asarray(data["line"]["scores"]), fpr)
    stream = data["stream"]
    c = np.asarray(stream["maxima"], dtype=np.float32)  # [N, T]
    tiles = [np.asarray(t, dtype=np.float32) for t in stream["tile_scores"]]
    maxima, normal, exported_tiles = gate.scores.arrays()
    grid, rule, calibrations = predictor.grid, predictor.rule, predictor.calibrations
    refit = fit_gate(maxima, normal, exported_tiles, threshold, grid, rule, calibrations, gate.target_agreement,
                     gate.margin)  # fmt: skip
    line = data["line"]
    with_line = refit_gate(gate, np.asarray(line["maxima"]), np.asarray(line["tile_scores"]), threshold, grid, rule,
                           calibrations)  # fmt: skip
    full = np.asarray(stream["scores"]) >= threshold

    def labels_at(t: float, selection: np.ndarray = c) -> np.ndarray:
        return spatial_scores(tiles, selection, t, grid, rule, calibrations) >= threshold

    oracle = calibrate_gate(c, labels == 0, full, labels_at, agreement, 0.0)
    image_score = np.repeat(c.max(axis=1, keepdims=True), c.shape[1], axis=1)  # [N, T]: every tile or none
    image_cut = calibrate_gate(image_score, labels == 0, full, lambda t: labels_at(t, image_score), agreement, 0.0)
    # gate + window, fitted on export's calibration images and the line's good images only (never the stream)
    line_c = np.asarray(line["maxima"], dtype=np.float32)
    both_c = np.concatenate([maxima, line_c])
    pairs = zip(exported_tiles, line["tile_scores"], strict=True)
    both_tiles = [np.concatenate([a, np.asarray(b, dtype=np.float32)]) for a, b in pairs]  # [M] x [N + K, T]
    both_full = spatial_scores(both_tiles, both_c, -math.inf, grid, rule, calibrations)  # every tile: the full scores
    t_c, window = gate_window(both_c, both_tiles, both_full, threshold, predictor, gate.target_agreement, gate.margin)
    return {
        "gate_plus_window": judge_window(c, t_c, window, stream, labels, threshold, predictor),
        "threshold": float(threshold),
        "run_threshold": float(predictor.manifest.thresholds.image),
        "stream_normals_flagged": float(full[labels == 0].mean()),
        "export": judge(c, gate.tile_threshold, stream, labels, threshold, predictor),
        "refit": judge(c, refit.tile_threshold, stream, labels, threshold, predictor),
        "refit_with_line": judge(c, with_line.tile_threshold, stream, labels, threshold, predictor),
        "oracle": judge(c, oracle.tile_threshold, stream, labels, threshold, predictor),
        "image_window_oracle": judge(image_score, image_cut.tile_threshold, stream, labels, threshold, predictor),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_spatial_line/runs"), help="holds ENS9 and SM256")
    parser.add_argument("--out", type=Path, default=Path("runs/gate_bound"))
    parser.add_argument("--normals", type=Path, default=Path("data/synth512_normals"), help="held-out normals, seed 1")
    parser.add_argument("--line", type=Path, default=Path("data/synth512_line"), help="good images, seed 2")
    parser.add_argument("--line-fpr", type=float, default=0.01)
    parser.add_argument("--stream-defects", type=int, default=5)
    parser.add_argument("--agreement", type=float, default=0.99, help="the oracles' agreement target on the stream")
    parser.add_argument("--categories", nargs="+", default=CATEGORIES, choices=CATEGORIES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache_file = args.out / "scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    report = {"command": f"python tools/gate_bound.py {options}", "cpu": cpu_model(), "categories": {}}
    for category in args.categories:
        bundle = export(args.runs, category, args.out)
        sets = image_sets(args.runs, category, args.normals, args.line, args.stream_defects)
        data = {}
        for name, (paths, _) in sets.items():
            key = f"{category}/{name}"
            if cache.get(key, {}).get("paths") != paths:
                cache[key] = {"paths": paths, **score(bundle, paths)}
                write_json(cache_file, cache)
            data[name] = cache[key]
        labels = np.asarray(sets["stream"][1])
        report["categories"][category] = describe(bundle, data, labels, args.line_fpr, args.agreement)
        print(category, json.dumps(report["categories"][category]), flush=True)
        write_json(args.out / "bound.json", report)


if __name__ == "__main__":
    main()
