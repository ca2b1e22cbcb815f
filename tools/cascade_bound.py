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
LINE_IMAGES = 100  # good images per category for a line-calibrated threshold (tilecore calibrate --target-fpr)


def ensure_data(data: Path, normals: Path, line: Path, size: int) -> None:
    from tilecore.train.synth import build_synth_dataset

    if not (data / "dataset.json").is_file():
        build_synth_dataset(data, size, seed=0)
    if not (normals / "dataset.json").is_file():
        build_synth_dataset(normals, size, seed=1, n_train=1, n_test_good=100, n_test_defect=1)
    if not (line / "dataset.json").is_file():  # good images "from the line" for tilecore calibrate, seed 2
        build_synth_dataset(line, size, seed=2, n_train=1, n_test_good=LINE_IMAGES, n_test_defect=1)


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
    exit_scores = np.zeros(count)
    for stage in cascade.stages:
        run += list(stage.members)
        fused = partial_scores(scores, run, rule)
        cost[reached] += sum(gflops[m] for m in stage.members)
        leaving = reached.copy()
        if stage.window is not None:
            low, high = min(stage.window[0], threshold), max(stage.window[1], threshold)
            leaving &= (fused < low) | (fused > high)
        labels[leaving] = fused[leaving] >= threshold
        exit_scores[leaving] = fused[leaving]
        exits.append(float(leaving.mean()))
        reached &= ~leaving
    return {"labels": labels, "scores": exit_scores, "exit_shares": exits, "gflops_per_image": float(cost.mean())}


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
    best.pop("scores")
    best["agreement"] = float(np.mean(best.pop("labels") == full))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cascade_bound"))
    parser.add_argument("--members", default="mnv2+lite0+lite1", help="members joined by + (" + ", ".join(SHORT) + ")")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--data", default="data/synth{size}")
    parser.add_argument("--normals", default="data/synth{size}_normals", help="held-out normals, seed 1")
    parser.add_argument("--line", default="data/synth{size}_line", help="good images for --line-fpr, seed 2")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--stream-defects", type=int, default=5)
    parser.add_argument("--agreement", type=float, default=0.99, help="the oracle's agreement target on the stream")
    parser.add_argument(
        "--line-fpr",
        type=float,
        nargs="*",
        default=[0.01, 0.02, 0.05],
        help="operating points besides the run's own threshold: the threshold `tilecore calibrate --target-fpr F` "
        "sets on the --line good images",
    )
    args = parser.parse_args()

    from tilecore.runtime.cascade import cheapest_first
    from tilecore.train.cascade_fit import member_gflops
    from tilecore.train.config import load_config
    from tilecore.train.fit import train_run

    data, normals = Path(args.data.format(size=args.size)), Path(args.normals.format(size=args.size))
    line = Path(args.line.format(size=args.size))
    ensure_data(data, normals, line, args.size)
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
        sets = image_sets(run, category, normals, line, args.stream_defects)
        for name, (paths, _) in sets.items():
            key = f"{category}/{name}"
            if cached.get(key, {}).get("paths") != paths:
                cached[key] = {"paths": paths, "scores": member_scores(config, run, category, paths).tolist()}
                write_json(cache, cached)
        scores = {name: np.array(cached[f"{category}/{name}"]["scores"]) for name in sets}  # name -> [M, N]
        labels = {name: labels for name, (_, labels) in sets.items()}
        entry = describe(config, run, category, scores, labels, gflops, order, args)
        report["categories"][category] = entry
        for point, result in entry["operating_points"].items():
            brief = {k: {kk: vv for kk, vv in v.items() if kk != "windows"} if isinstance(v, dict) else v
                     for k, v in result.items()}  # fmt: skip
            print(category, point, json.dumps(brief))
    write_json(args.out / "bound.json", report)


def image_sets(run: Path, category: str, normals: Path, line: Path, defects: int) -> dict:
    """name -> (paths, labels [N]): the stream, the whole test split, and the line's good images."""
    test = json.loads((run / category / "split.json").read_text())["test"]
    line_paths = sorted(str(p) for p in (line / category / "test" / "good").glob("*.png"))
    return {
        "stream": stream(run, category, normals, defects),
        "test": (test, np.array([0 if "/good/" in p else 1 for p in test])),
        "line": (line_paths, np.zeros(len(line_paths), dtype=int)),
    }


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def judge(cascade, scores: dict, labels: dict, threshold: float, rule: str, gflops: list[float], order) -> dict:
    """What `cascade` does at `threshold` on the stream and the test split, against the full ensemble."""
    from tilecore.runtime.cascade import partial_scores

    out = {"windows": [s.window and list(s.window) for s in cascade.stages]}
    for name in ("stream", "test"):
        full_scores = partial_scores(scores[name], order, rule)
        result = staged(cascade, scores[name], threshold, rule, gflops)
        out[name] = {
            "agreement": float(np.mean(result["labels"] == (full_scores >= threshold))),
            "auroc_full": auroc(labels[name], full_scores),
            "auroc_cascade": auroc(labels[name], result["scores"]),
            "exit_shares": result["exit_shares"],
            "gflops_ratio": float(sum(gflops)) / result["gflops_per_image"],
        }
    return out


def describe(config, run: Path, category: str, scores: dict, labels: dict, gflops, order, args) -> dict:
    """At the run's own threshold and at each line-calibrated one: export's windows moved with the threshold
    (what format-4 bundles got), windows refit at that threshold on export's calibration images, on those
    plus the line's good images (what `tilecore calibrate` now ships), the same with the order searched
    (cascade.search_order), and the stream oracle."""
    from tilecore.runtime.cascade import calibrate_cascade, partial_scores, search_order
    from tilecore.runtime.recalibrate import fpr_threshold

    calibration = json.loads((run / category / "calibration.json").read_text())
    threshold, rule = calibration["thresholds"]["image"], config.fusion.rule
    calibration_scores = np.concatenate(
        [np.array(calibration["validation_member_scores"]), np.array(calibration["synthetic_member_scores"])], axis=1
    )  # [M, normals + synthetic defects], what export calibrates on
    stages = [[m] for m in order]
    c = config.cascade
    exported = calibrate_cascade(calibration_scores, threshold, rule, stages, gflops, c.agreement, c.margin)
    line_full = partial_scores(scores["line"], order, rule)
    points = {"run threshold": threshold}
    points.update({f"line fpr {f:g}": fpr_threshold(line_full, f) for f in args.line_fpr})
    stream_full = partial_scores(scores["stream"], order, rule)
    entry = {"stream_images": int(scores["stream"].shape[1]), "calibration_images": int(calibration_scores.shape[1]),
             "operating_points": {}}  # fmt: skip
    with_line = np.concatenate([calibration_scores, scores["line"]], axis=1)  # what tilecore calibrate refits on
    for point, t in points.items():
        refit = calibrate_cascade(calibration_scores, t, rule, stages, gflops, c.agreement, c.margin)
        best = oracle(scores["stream"], t, rule, gflops, order, args.agreement)
        entry["operating_points"][point] = {
            "threshold": float(t),
            "stream_normals_flagged": float((stream_full >= t)[labels["stream"] == 0].mean()),
            "line_flagged": float((line_full >= t).mean()),
            "shifted": judge(exported.shifted(t - threshold), scores, labels, t, rule, gflops, order),
            "refit": judge(refit, scores, labels, t, rule, gflops, order),
            "oracle_gflops_ratio": float(sum(gflops)) / best["gflops_per_image"],
        }
        if point != "run threshold":  # tilecore calibrate: windows refit on export's images + the line's
            line_refit = calibrate_cascade(with_line, t, rule, stages, gflops, c.agreement, c.margin)
            searched = search_order(with_line, t, rule, gflops, c.agreement, c.margin)
            entry["operating_points"][point]["refit_with_line"] = judge(line_refit, scores, labels, t, rule, gflops,
                                                                        order)  # fmt: skip
            entry["operating_points"][point]["search_with_line"] = {
                "order": list(searched.order),
                **judge(searched, scores, labels, t, rule, gflops, order),
            }
    return entry


if __name__ == "__main__":
    main()
