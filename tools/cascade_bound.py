"""How much can a member cascade save on a production-like stream at all? An upper bound from the stream itself.

Trains (or resumes) one ensemble on the synth set, scores every member on a production-like stream (the
category's test defects, `--stream-defects` of them, plus normal images up to 95%: the test's good images,
then held-out normals of a synth set built with another seed) with the PyTorch model, and compares:

- the cascade export builds (`runtime.cascade.calibrate_cascade` on the run's calibration images, with the
  config's agreement and margin): its label agreement with the full ensemble on the stream, exit shares and
  backbone GFLOPs per image spent;
- the oracle: windows chosen on the stream itself, the cheapest (fewest GFLOPs) that keep the full ensemble's
  label on at least `--agreement` of the stream. No calibration can beat it: it is the most a window cascade
  over these members, in this order, can save on this stream.

GFLOPs are backbone GFLOPs (train.cascade_fit.member_gflops); throughput gains are smaller than GFLOPs gains
(decoding, preprocessing, kNN and merging are paid per stage run). Per-member scores are cached in
OUT/scores.json; delete it to score again.

    .venv/bin/python tools/cascade_bound.py --out runs/cascade_bound
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from bench_common import cpu_model, stream_normals_needed, to_toml, write_json  # noqa: E402 (tools/ is on the path)

SHORT = {"mnv2": "mobilenetv2_100", "lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1",
         "lite2": "tf_efficientnet_lite2"}  # fmt: skip
LAYERS = ["blocks.2", "blocks.4"]  # as tools/bench_cascade.py
CATEGORIES = ["brick", "grass", "gravel"]


def ensure_data(data: Path, normals: Path, size: int) -> None:
    from tilecore.train.synth import build_synth_dataset

    if not (data / "dataset.json").is_file():
        build_synth_dataset(data, size, seed=0)
    if not (normals / "dataset.json").is_file():
        build_synth_dataset(normals, size, seed=1, n_train=1, n_test_good=100, n_test_defect=1)


def stream(run: Path, category: str, normals: Path, defects: int) -> tuple[list[str], np.ndarray]:
    """(paths, labels [N]) of the stream: the first `defects` test defects, the test good, held-out normals."""
    test = json.loads((run / category / "split.json").read_text())["test"]
    bad = [p for p in test if "/good/" not in p][:defects]
    good = [p for p in test if "/good/" in p]
    held = sorted(str(p) for p in (normals / category / "test" / "good").glob("*.png"))
    held = held[: stream_normals_needed(len(bad), len(good))]
    return bad + good + held, np.array([1] * len(bad) + [0] * (len(good) + len(held)))


def member_scores(config, run: Path, category: str, paths: list[str]) -> np.ndarray:
    """Each member's normalised image scores on `paths`, [M, N] (the scores a cascade stage fuses)."""
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.merge import member_result
    from tilecore.train.ensemble import load_category_model
    from tilecore.train.model import load_embedder

    embedders = [load_embedder(config, run, i) for i in range(len(config.members))]
    model = load_category_model(config, run, category, embedders)
    rule = config.merge_rule()
    batches = []
    for start in range(0, len(paths), 8):
        raw = model.raw_outputs([read_rgb(p) for p in paths[start : start + 8]])
        pairs = zip(raw, model.calibrations, strict=True)
        batches.append(np.stack([member_result(o, model.grid, rule, c)[0] for o, c in pairs]))  # [M, b]
    return np.concatenate(batches, axis=1)  # [M, N]


def staged(cascade, scores: np.ndarray, threshold: float, rule: str, gflops: list[float]) -> dict:
    """What `cascade` does on member scores [M, N]: labels [N], exit shares and mean GFLOPs per image."""
    from tilecore.runtime.cascade import partial_scores

    count = scores.shape[1]
    reached, labels, cost, exits, run = np.ones(count, bool), np.zeros(count, bool), np.zeros(count), [], []
    for stage in cascade.stages:
        run += list(stage.members)
        fused = partial_scores(scores, run, rule)
        cost[reached] += sum(gflops[m] for m in stage.members)
        leaving = reached.copy()
        if stage.window is not None:
            low, high = min(stage.window[0], threshold), max(stage.window[1], threshold)
            leaving &= (fused < low) | (fused > high)
        labels[leaving] = fused[leaving] >= threshold
        exits.append(float(leaving.mean()))
        reached &= ~leaving
    return {"labels": labels, "exit_shares": exits, "gflops_per_image": float(cost.mean())}


def oracle(scores: np.ndarray, threshold: float, rule: str, gflops: list[float], order: list[int], agreement: float):
    """The cheapest windows, set on these very images, that keep `agreement` of their full-ensemble labels:
    stage 1's (low, high) searched over 41 quantiles of its scores each side of the threshold, the rest of the
    error budget then spent by runtime.cascade.narrowest_window on each later stage in turn."""
    from tilecore.runtime.cascade import Cascade, CascadeStage, narrowest_window, partial_scores

    count = scores.shape[1]
    full = partial_scores(scores, order, rule) >= threshold
    budget = math.floor((1.0 - agreement) * count + 1e-9)
    first = partial_scores(scores, order[:1], rule)
    candidates = np.quantile(first, np.linspace(0.0, 1.0, 41))
    lows = [threshold, *candidates[candidates < threshold]]
    highs = [threshold, *candidates[candidates > threshold]]
    best = None
    for low in lows:
        for high in highs:
            windows, reached, errors, run = [(low, high)], np.ones(count, bool), 0, [order[0]]
            leaving = (first < low) | (first > high)
            errors += int(((first[leaving] >= threshold) != full[leaving]).sum())
            if errors > budget:
                continue
            reached &= ~leaving
            for m in order[1:-1]:
                run.append(m)
                fused = partial_scores(scores, run, rule)
                if reached.any():
                    window = narrowest_window(fused[reached], full[reached], threshold, budget - errors)
                else:
                    window = (threshold, threshold)
                leaving = reached & ((fused < window[0]) | (fused > window[1]))
                errors += int(((fused[leaving] >= threshold) != full[leaving]).sum())
                reached &= ~leaving
                windows.append(window)
            stages = tuple(CascadeStage((m,), w, gflops[m], 0.0) for m, w in zip(order, [*windows, None], strict=True))
            result = staged(Cascade(stages, agreement, 0.0, 0.0, count), scores, threshold, rule, gflops)
            if best is None or result["gflops_per_image"] < best["gflops_per_image"]:
                best = {**result, "windows": [list(w) for w in windows]}
    best["agreement"] = float(np.mean(best.pop("labels") == full))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cascade_bound"))
    parser.add_argument("--members", default="mnv2+lite0+lite1", help="members joined by + (" + ", ".join(SHORT) + ")")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data", default="data/synth{size}")
    parser.add_argument("--normals", default="data/synth{size}_normals", help="held-out normals, seed 1")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--stream-defects", type=int, default=5)
    parser.add_argument("--agreement", type=float, default=0.99, help="the oracle's agreement target on the stream")
    args = parser.parse_args()

    from tilecore.runtime.cascade import cheapest_first
    from tilecore.train.cascade_fit import member_gflops
    from tilecore.train.config import load_config
    from tilecore.train.fit import train_run

    data, normals = Path(args.data.format(size=args.size)), Path(args.normals.format(size=args.size))
    ensure_data(data, normals, args.size)
    members = [SHORT[m] for m in args.members.split("+")]
    raw = {"data": {"root": str(data.resolve()), "image_size": args.size, "categories": CATEGORIES},
           "members": [{"backbone": b, "layers": LAYERS, "coreset_ratio": args.coreset} for b in members]}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.toml").write_text(to_toml(raw))
    config = load_config(args.out / "config.toml")
    run = args.out / "run"
    train_run(config, run)
    gflops = member_gflops(config)
    order = [stage[0] for stage in cheapest_first(gflops)]
    cache = args.out / "scores.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    report = {"command": f"python tools/cascade_bound.py {options}", "cpu": cpu_model(), "members": members,
              "gflops": gflops, "order": order, "categories": {}}  # fmt: skip
    for category in CATEGORIES:
        paths, labels = stream(run, category, normals, args.stream_defects)
        if cached.get(category, {}).get("paths") != paths:
            cached[category] = {"paths": paths, "scores": member_scores(config, run, category, paths).tolist()}
            write_json(cache, cached)
        scores = np.array(cached[category]["scores"])  # [M, N]
        report["categories"][category] = describe(config, run, category, scores, labels, gflops, order, args.agreement)
        print(category, json.dumps({k: v for k, v in report["categories"][category].items() if k != "windows"}))
    write_json(args.out / "bound.json", report)


def describe(config, run: Path, category: str, scores: np.ndarray, labels: np.ndarray, gflops, order, agreement):
    from tilecore.runtime.cascade import calibrate_cascade, partial_scores

    calibration = json.loads((run / category / "calibration.json").read_text())
    threshold, rule = calibration["thresholds"]["image"], config.fusion.rule
    calibration_scores = np.concatenate(
        [np.array(calibration["validation_member_scores"]), np.array(calibration["synthetic_member_scores"])], axis=1
    )  # [M, normals + synthetic defects], what export calibrates on
    exported = calibrate_cascade(calibration_scores, threshold, rule, [[m] for m in order], gflops,
                                 config.cascade.agreement, config.cascade.margin)  # fmt: skip
    full = partial_scores(scores, order, rule) >= threshold
    as_exported = staged(exported, scores, threshold, rule, gflops)
    best = oracle(scores, threshold, rule, gflops, order, agreement)
    total = float(sum(gflops))
    return {
        "stream_images": int(scores.shape[1]),
        "normal_share": float(np.mean(labels == 0)),
        "normals_flagged_by_full": float(full[labels == 0].mean()),
        "calibration_images": int(calibration_scores.shape[1]),
        "exported": {"agreement": float(np.mean(as_exported.pop("labels") == full)), **as_exported,
                     "gflops_ratio": total / as_exported["gflops_per_image"],
                     "windows": [s.window and list(s.window) for s in exported.stages]},  # fmt: skip
        "oracle": {**best, "gflops_ratio": total / best["gflops_per_image"]},
    }


if __name__ == "__main__":
    main()
