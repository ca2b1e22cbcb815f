"""The spatial cascade (a coarse single-tile model picks the fine tiles that run) vs its tiled ensemble.

On the 512 px synth set (seed 0), two runs are trained on the same data and split: the fine ENS9 run (3 x 3
overlapping tiles) and the coarse SM256 run (the whole image at half resolution), one member each
(tf_efficientnet_lite0, blocks.2 + blocks.4, coreset --coreset). Per category, the plain ENS9 bundle and the
ENS9 bundle with the SM256 coarse stage (`tilecore export ENS9 --coarse SM256`) are exported and scored with
the runtime (Predictor, CPU):

- on the test split: image AUROC and AUPRO (train.metrics; masks resized as train.evaluate.ground_truth
  does) of ENS9 (cascade off) and of the spatial cascade, label agreement, and the share of fine tiles run;
- on a production-like stream (--stream-defects test defects, the test's good images, and held-out normals
  of a synth set built with seed 1, so that 95% of the stream is normal): the share of fine tiles run, image
  AUROC of both, label agreement, and images/s measured ENS9/cascade/ENS9/cascade (--rounds rounds each,
  batch --batch, median), and the speed-up.

Training and evaluation run in a subprocess per run, scoring in a subprocess per category (no torch there).
Run folders live under --out, so a rerun resumes: a finished run (bench_train.json + metrics.json) and a
finished category (category.json) are read back. bench.json and tables.md are rewritten after every
category, so an interrupted run leaves usable partial results.

    .venv/bin/python tools/bench_spatial.py --out runs/bench_spatial
    .venv/bin/python tools/bench_spatial.py --out /tmp/spatial_smoke --size 256 --data /tmp/s256 \\
        --normals /tmp/s256_normals --train-images 20 --test-good 5 --test-defects 6 --coreset 0.1 \\
        --categories gravel --stream-defects 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import (  # noqa: E402 (tools/ is the script's path)
    NORMAL_SHARE,
    cpu_model,
    fmt,
    line_calibrated,
    log,
    mean_of,
    run_worker,
    stream_normals_needed,
    tilecore_cli,
    to_toml,
    write_json,
)

CATEGORIES = ("brick", "grass", "gravel")
BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]
FINE, COARSE = "ENS9", "SM256"  # tiling presets
LINE_IMAGES = 100  # good images per category for --line-fpr (tilecore calibrate needs 1 / target_fpr of them)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cpu_count() -> int:
    return len([ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("processor")])


# --- data ---------------------------------------------------------------------------------------------


def ensure_dataset(path: Path, size: int, seed: int, counts: dict[str, int]) -> None:
    """Build the synth set at `path` unless one with this size, seed and exactly these counts is there."""
    from tilecore.train.synth import build_synth_dataset

    described = path / "dataset.json"
    if described.is_file():
        have = json.loads(described.read_text())
        if have.get("size") == size and have.get("seed") == seed and have.get("counts") == counts:
            return
        raise SystemExit(f"{path}: holds another synth set ({described}); choose another path or delete it")
    log(f"building {path} ({size} px, seed {seed}, {counts})")
    build_synth_dataset(path, size, seed=seed, **counts)


# --- training -----------------------------------------------------------------------------------------


def run_config_raw(args: argparse.Namespace, data: Path, preset: str) -> dict:
    return {
        "data": {"root": str(data.resolve()), "image_size": args.size, "categories": args.categories, "split_seed": 0},
        "tiling": {"preset": preset},
        "members": [{"backbone": BACKBONE, "layers": LAYERS, "coreset_ratio": args.coreset}],
        "train": {"seed": 0},
    }


def train_worker(config_path: str, run_dir: str) -> dict:
    """Train (resuming whatever is there) and evaluate one run in this process."""
    from tilecore.train.config import load_config
    from tilecore.train.evaluate import evaluate_run
    from tilecore.train.fit import train_run
    from tilecore.train.run_dir import peak_rss_mb

    config = load_config(config_path)
    started = time.perf_counter()
    train_run(config, Path(run_dir))
    fit_seconds = time.perf_counter() - started
    rss = peak_rss_mb()
    started = time.perf_counter()
    evaluate_run(Path(run_dir))
    return {
        "fit_seconds": round(fit_seconds, 2),
        "eval_seconds": round(time.perf_counter() - started, 2),
        "train_peak_rss_mb": round(rss, 1),
    }


def train(args: argparse.Namespace, data: Path, preset: str) -> tuple[Path, dict]:
    """The run of `preset` under --out/runs, trained and evaluated (or read back when it finished before)."""
    run_dir = args.out / "runs" / preset
    done = run_dir / "bench_train.json"
    raw = run_config_raw(args, data, preset)
    if done.is_file() and (run_dir / "metrics.json").is_file():
        log(f"{preset}: trained and evaluated before, reading back")
        return run_dir, json.loads(done.read_text())
    config_path = args.out / "configs" / f"{preset}.toml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(to_toml(raw))
    log(f"{preset}: train + eval ({run_dir})")
    figures = run_worker([sys.executable, __file__, "--train-worker", str(config_path), str(run_dir)], preset)
    write_json(done, figures)
    log(f"{preset}: fit {figures['fit_seconds']:.0f} s, eval {figures['eval_seconds']:.0f} s")
    return run_dir, figures


def export(run_dir: Path, category: str, bundle: Path, coarse: Path | None) -> dict:
    """`tilecore export` of one category (with --coarse), in a subprocess; returns its seconds and INFO lines."""
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    command = [*tilecore_cli(), "export", str(run_dir), "--category", category, "--out", str(bundle)]
    if coarse is not None:
        command += ["--coarse", str(coarse)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export {bundle} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "coarse stage" in ln]
    return {"seconds": round(time.perf_counter() - started, 2), "command": " ".join(command), "log": lines}


# --- worker: scoring (runtime only, no torch) ---------------------------------------------------------


def test_truth(run_dir: Path, category: str) -> tuple[list, list[np.ndarray], list[int]]:
    """The run's test samples for `category`, their masks at the run's image size (as
    train.evaluate.ground_truth resizes them) and labels."""
    from tilecore.runtime.image_io import read_mask
    from tilecore.runtime.preprocess import resize_mask
    from tilecore.train.config import image_hw
    from tilecore.train.data import load_config_category
    from tilecore.train.run_dir import load_run_config

    config = load_run_config(run_dir)
    samples = load_config_category(config, category).test
    h, w = image_hw(config)
    masks = []
    for s in samples:
        if s.label == 0:
            masks.append(np.zeros((h, w), dtype=bool))
        else:  # synth masks have their image's size (ground_truth refuses one that does not)
            masks.append(resize_mask(read_mask(s.mask), h, w))
    return samples, masks, [s.label for s in samples]


def predict_all(predictor, images: list[np.ndarray], batch: int, keep_maps: bool) -> dict:
    """Score `images` in batches: scores, labels, tiles run and (keep_maps) anomaly maps [N, H, W]."""
    from tilecore.runtime.stage_timer import StageTimer

    timer = StageTimer()
    scores, labels, tiles, maps = [], [], [], []
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        for r in predictor.predict_batch(images[i : i + batch], timer):
            scores.append(r.score)
            labels.append(r.label)
            tiles.append(r.tiles_run)
            if keep_maps:
                maps.append(r.anomaly_map)
    seconds = time.perf_counter() - started
    return {
        "scores": np.array(scores),
        "labels": np.array(labels, dtype=bool),
        "tiles_run": tiles,
        "maps": np.stack(maps) if keep_maps else None,
        "seconds": seconds,
        "stage_ms": timer.per_image_ms(len(images)),
    }


def tile_figures(tiles_run: list[int | None], count: int, labels: list[int]) -> dict:
    """Share of the (image, fine tile location) pairs that ran, overall and for normal / anomalous images."""
    ran = np.array([count if t is None else t for t in tiles_run], dtype=float)
    truth = np.asarray(labels)
    share = lambda m: float(ran[m].sum() / (m.sum() * count)) if m.any() else None  # noqa: E731
    return {
        "tile_share": share(np.ones_like(truth, dtype=bool)),
        "tile_share_normal": share(truth == 0),
        "tile_share_anomalous": share(truth == 1),
        "tiles_run_histogram": {str(k): int(np.sum(ran == k)) for k in range(count + 1)},
    }


def stream_paths(samples: list, normals_root: Path, category: str, defects: int | None, seed: int):
    """(paths, labels, counts) of the stream, shuffled: test defects (all, or `defects` of them chosen with
    `seed`), the test's good images, then held-out normals up to NORMAL_SHARE normal."""
    rng = np.random.default_rng(seed)
    bad = [str(s.image) for s in samples if s.label == 1]
    good = [str(s.image) for s in samples if s.label == 0]
    if defects is not None and defects < len(bad):
        bad = [bad[i] for i in sorted(rng.choice(len(bad), defects, replace=False))]
    need = stream_normals_needed(len(bad), len(good))
    held_out = sorted(str(p) for p in (normals_root / category / "test" / "good").glob("*.png"))
    if len(held_out) < need:
        raise SystemExit(f"{normals_root}/{category}: {len(held_out)} held-out normals, the stream needs {need}")
    paths = bad + good + held_out[:need]
    labels = [1] * len(bad) + [0] * (len(good) + need)
    order = rng.permutation(len(paths))
    counts = {"images": len(paths), "defects": len(bad), "test_good": len(good), "held_out_normals": need}
    return [paths[i] for i in order], [labels[i] for i in order], counts


def score_worker(run_dir: str, category: str, plain: str, spatial: str, normals: str, options: str) -> dict:
    """One category: test-split accuracy of ENS9 and the spatial cascade, then the timed stream."""
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.predictor import Predictor
    from tilecore.train.metrics import aupro, image_auroc

    opts = json.loads(options)
    batch, threads = opts["batch"], opts["threads"]
    run = Path(run_dir)
    samples, masks, test_labels = test_truth(run, category)
    full = Predictor(plain, device="cpu", threads=threads, cascade=False, max_batch=batch)
    cascade = Predictor(spatial, device="cpu", threads=threads, cascade=True, max_batch=batch)
    if cascade.coarse is None:
        raise RuntimeError(f"bundle {spatial}: no coarse stage")
    count = full.grid.count
    gate = cascade.manifest.coarse.gate.to_dict()
    report: dict = {"tile_locations": count, "gate": gate, "threshold": full.thresholds.image}

    # test split: accuracy (maps kept for AUPRO)
    images = [read_rgb(s.image) for s in samples]
    truth = np.stack(masks)
    test = {}
    for mode, predictor in (("full", full), ("cascade", cascade)):
        out = predict_all(predictor, images, batch, keep_maps=True)
        test[mode] = out
        report.setdefault("test", {})[mode] = {
            "image_auroc": image_auroc(np.array(test_labels), out["scores"]),
            "aupro": aupro(truth, out["maps"]),
            "anomalous_share": float(out["labels"].mean()),
            "seconds": round(out["seconds"], 2),
            **(tile_figures(out["tiles_run"], count, test_labels) if mode == "cascade" else {}),
        }
    report["test"]["images"] = len(images)
    report["test"]["defects"] = int(sum(test_labels))
    report["test"]["label_agreement"] = float(np.mean(test["full"]["labels"] == test["cascade"]["labels"]))
    report["test"]["max_abs_score_diff"] = float(np.max(np.abs(test["full"]["scores"] - test["cascade"]["scores"])))
    eval_scores = {r["image"]: r["score"] for r in json.loads((run / category / "test_scores.json").read_text())}
    report["test"]["runtime_vs_eval_max_abs_diff"] = max(
        abs(float(s) - eval_scores[str(p.image)]) for p, s in zip(samples, test["full"]["scores"], strict=True)
    )
    del test, images

    # the production-like stream: A/B/A/B
    paths, labels, counts = stream_paths(samples, Path(normals), category, opts["defects"], opts["seed"])
    images = [read_rgb(p) for p in paths]
    predictors = {"full": full, "cascade": cascade}
    for predictor in predictors.values():  # warm-up: sessions, threads, first-call allocations
        predictor.predict_batch(images[:batch])
    rates: dict[str, list[float]] = {mode: [] for mode in predictors}
    results: dict[str, dict] = {}
    drift = 0.0  # largest score change between rounds (should be 0: same inputs, same engines)
    for _ in range(opts["rounds"]):
        for mode, predictor in predictors.items():
            out = predict_all(predictor, images, batch, keep_maps=False)
            rates[mode].append(len(images) / out["seconds"])
            if mode in results:
                drift = max(drift, float(np.max(np.abs(out["scores"] - results[mode]["scores"]))))
            else:
                results[mode] = out
    stream = {**counts, "round_score_drift": drift}
    for mode in predictors:
        out = results[mode]
        stream[mode] = {
            "image_auroc": image_auroc(np.array(labels), out["scores"]),
            "anomalous_share": float(out["labels"].mean()),
            "images_per_second": statistics.median(rates[mode]),
            "rates": rates[mode],
            "stage_ms_per_image": out["stage_ms"],
            **(tile_figures(out["tiles_run"], count, labels) if mode == "cascade" else {}),
        }
    stream["label_agreement"] = float(np.mean(results["full"]["labels"] == results["cascade"]["labels"]))
    stream["speedup"] = stream["cascade"]["images_per_second"] / stream["full"]["images_per_second"]
    report["stream"] = stream
    return report


# --- tables -------------------------------------------------------------------------------------------


def table_rows(report: dict) -> list[tuple[str, dict]]:
    """(name, figures) per category, then their mean."""
    rows = []
    for category, c in report["categories"].items():
        t, s, g = c["test"], c["stream"], c["gate"]
        rows.append(
            (
                category,
                {
                    "test_auroc_full": t["full"]["image_auroc"],
                    "test_auroc_cascade": t["cascade"]["image_auroc"],
                    "test_aupro_full": t["full"]["aupro"],
                    "test_aupro_cascade": t["cascade"]["aupro"],
                    "test_agreement": t["label_agreement"],
                    "test_tile_share": t["cascade"]["tile_share"],
                    "stream_tile_share": s["cascade"]["tile_share"],
                    "stream_auroc_full": s["full"]["image_auroc"],
                    "stream_auroc_cascade": s["cascade"]["image_auroc"],
                    "stream_agreement": s["label_agreement"],
                    "ips_full": s["full"]["images_per_second"],
                    "ips_cascade": s["cascade"]["images_per_second"],
                    "speedup": s["speedup"],
                    "gate_threshold": g["tile_threshold"],
                    "gate_agreement": g["agreement"],
                    "gate_tile_share": g["tile_share"],
                },
            )
        )
    if len(rows) > 1:
        keys = rows[0][1].keys()
        mean = {k: mean_of([r[k] for _, r in rows]) for k in keys}
        mean["gate_threshold"] = None  # z-score thresholds of different coarse models: no mean
        rows.append(("mean", mean))
    return rows


def tables(report: dict) -> str:
    s = report["stream"]
    head = [
        f"# Spatial cascade ({FINE} gated by {COARSE}) vs {FINE}, synth {report['size']} px\n",
        f"Command: `{report['command']}`  \nCPU: {report['cpu']} ({report['cpu_count']} cores)  \n"
        f"Runs: {BACKBONE} {LAYERS}, coreset {report['coreset_ratio']}, seed 0, same data and split; "
        f"{FINE} {report['runs'][FINE]['fit_seconds']:.0f} s fit, {COARSE} "
        f"{report['runs'][COARSE]['fit_seconds']:.0f} s fit.  \n"
        f"Test split: {report['test_counts']}. Stream per category: {s['description']}; runtime Predictor, CPU, "
        f"batch {s['batch']}, {FINE} (cascade off) / cascade alternated, {s['rounds']} rounds each, median "
        "images/s. Tiles run: share of the (image, fine tile location) pairs the fine member ran (9 per image "
        f"for {FINE}). Gate: what the scored bundle records (manifest `coarse.gate`, calibrated on validation images "
        "and synthetic defects).\n",
    ]
    if report.get("line_fpr") is not None:
        head.append(
            f"Operating point: both bundles went through `tilecore calibrate --target-fpr {report['line_fpr']:g}` on "
            f"{report['line_images']} good images per category (synth seed 2, apart from the stream's seed-1 normals): "
            "the threshold flags at most that share of them, and the gate was refit at that threshold on export's "
            "calibration images plus those good images.\n"
        )
    rows = table_rows(report)
    acc = [
        "## Accuracy (test split)\n",
        f"| category | image AUROC {FINE} | image AUROC cascade | AUPRO {FINE} | AUPRO cascade | label agreement "
        "| tiles run (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        acc.append(
            f"| {name} | {fmt(r['test_auroc_full'], 4)} | {fmt(r['test_auroc_cascade'], 4)} | "
            f"{fmt(r['test_aupro_full'], 4)} | {fmt(r['test_aupro_cascade'], 4)} | {fmt(r['test_agreement'], 4)} | "
            f"{fmt(r['test_tile_share'], 3)} |"
        )
    speed = [
        "\n## Production-like stream\n",
        f"| category | tiles run (stream) | image AUROC {FINE} | image AUROC cascade | label agreement | "
        f"img/s {FINE} | img/s cascade | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        speed.append(
            f"| {name} | {fmt(r['stream_tile_share'], 3)} | {fmt(r['stream_auroc_full'], 4)} | "
            f"{fmt(r['stream_auroc_cascade'], 4)} | {fmt(r['stream_agreement'], 4)} | {fmt(r['ips_full'], 2)} | "
            f"{fmt(r['ips_cascade'], 2)} | {fmt(r['speedup'], 2)} |"
        )
    gate = [
        "\n## Gate of the scored bundle (after calibrate, with --line-fpr)\n",
        "| category | tile_threshold | agreement (calibration) | tile_share (calibration) |",
        "|---|---|---|---|",
    ]
    for name, r in rows:
        threshold = fmt(r["gate_threshold"], 4)
        if r["gate_threshold"] is None and name != "mean":
            threshold = "none (every tile runs)"
        gate.append(f"| {name} | {threshold} | {fmt(r['gate_agreement'], 4)} | {fmt(r['gate_tile_share'], 3)} |")
    if report["failures"]:
        gate.append(
            "\nFailures: " + "; ".join(f"{f['category']}: {f['error'].splitlines()[0]}" for f in report["failures"])
        )
    return "\n".join(head + acc + speed + gate) + "\n"


def write_outputs(report: dict, out: Path) -> None:
    write_json(out / "bench.json", report)
    if report["categories"] or report["failures"]:
        write_text(out / "tables.md", tables(report))


# --- driver -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_spatial"))
    parser.add_argument("--size", type=int, default=512, choices=[256, 512, 1024])
    parser.add_argument("--data", type=Path, help="synth set, seed 0 (built if missing; default data/synth{size})")
    parser.add_argument("--normals", type=Path, help="held-out normals, seed 1 (default data/synth{size}_normals)")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--coreset", type=float, default=0.01, help="coreset ratio of both runs")
    parser.add_argument("--train-images", type=int, default=60, help="synth train images per category")
    parser.add_argument("--test-good", type=int, default=15, help="synth good test images per category")
    parser.add_argument("--test-defects", type=int, default=30, help="synth defective test images per category")
    parser.add_argument("--stream-defects", type=int, default=5, help="test defects per stream (0: all)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the stream per mode")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="runtime threads (0: library default)")
    parser.add_argument("--seed", type=int, default=0, help="stream subsampling and order")
    parser.add_argument("--keep-bundles", action="store_true")
    parser.add_argument(
        "--line-fpr",
        type=float,
        help="operating point: both bundles go through `tilecore calibrate --target-fpr F` on --line's good images "
        "before scoring (threshold set there, the coarse gate refit there)",
    )
    parser.add_argument("--line", type=Path, help="good images for --line-fpr, seed 2 (default data/synth{size}_line)")
    parser.add_argument("--train-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--score-worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        print(json.dumps(train_worker(*args.train_worker)))
        return
    if args.score_worker:
        print(json.dumps(score_worker(*args.score_worker)))
        return
    if args.rounds < 2:
        raise SystemExit("--rounds: expected at least 2 (ENS9/cascade alternated)")
    if args.stream_defects < 0:
        raise SystemExit("--stream-defects: expected 0 (all) or more")
    data = args.data or Path(f"data/synth{args.size}")
    normals = args.normals or Path(f"data/synth{args.size}_normals")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    test_counts = {"n_train": args.train_images, "n_test_good": args.test_good, "n_test_defect": args.test_defects}
    defects = args.test_defects if args.stream_defects == 0 else min(args.stream_defects, args.test_defects)
    held_out = stream_normals_needed(defects, args.test_good)
    ensure_dataset(data, args.size, 0, test_counts)
    ensure_dataset(normals, args.size, 1, {"n_train": 0, "n_test_good": held_out, "n_test_defect": 0})
    line = args.line or Path(f"data/synth{args.size}_line")
    if args.line_fpr is not None:
        ensure_dataset(line, args.size, 2, {"n_train": 0, "n_test_good": LINE_IMAGES, "n_test_defect": 0})
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "size": args.size,
        "data": str(data),
        "normals": str(normals),
        "test_counts": test_counts,
        "coreset_ratio": args.coreset,
        "line_fpr": args.line_fpr,  # None: the run's own threshold; else tilecore calibrate on LINE_IMAGES images
        "line_images": LINE_IMAGES if args.line_fpr is not None else 0,
        "backbone": BACKBONE,
        "layers": LAYERS,
        "stream": {
            "description": f"{defects} test defects + {args.test_good} test good + {held_out} held-out normals "
            f"(seed 1), {NORMAL_SHARE:.0%} normal",
            "defects": defects,
            "batch": args.batch,
            "rounds": args.rounds,
            "threads": args.threads,
            "seed": args.seed,
        },
        "runs": {},
        "categories": {},
        "failures": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    runs = {}
    for preset in (FINE, COARSE):
        runs[preset], figures = train(args, data, preset)
        metrics = json.loads((runs[preset] / "metrics.json").read_text())
        report["runs"][preset] = {
            "run_dir": str(runs[preset]),
            **figures,
            "eval": {c: {k: m.get(k) for k in ("image_auroc", "aupro")} for c, m in metrics["categories"].items()},
        }
        write_outputs(report, out)
    options = {
        "defects": defects,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": args.threads,
        "seed": args.seed,
    }
    for category in args.categories:
        done = out / "categories" / f"{category}.json"
        if done.is_file():
            log(f"{category}: scored before, reading back")
            report["categories"][category] = json.loads(done.read_text())
            write_outputs(report, out)
            continue
        try:
            bundles = out / "bundles" / category
            plain, spatial = bundles / FINE, bundles / f"{FINE}+{COARSE}"
            log(f"{category}: export {plain} and {spatial}")
            exports = {"plain": export(runs[FINE], category, plain, None)}
            exports["spatial"] = export(runs[FINE], category, spatial, runs[COARSE])
            log(f"{category}: {' '.join(exports['spatial']['log'][-1:])}")
            if args.line_fpr is not None:  # both at the line's operating point; the gate is refit there
                plain, spatial = (line_calibrated(b, line, category, args.line_fpr) for b in (plain, spatial))
            started = time.perf_counter()
            command = [sys.executable, __file__, "--score-worker", str(runs[FINE]), category, str(plain), str(spatial)]
            entry = run_worker([*command, str(normals), json.dumps(options)], f"{category} scoring")
            entry["score_seconds"] = round(time.perf_counter() - started, 2)
            entry["exports"] = exports
        except RuntimeError as exc:
            log(f"{category}: FAILED {str(exc).splitlines()[0]}")
            report["failures"].append({"category": category, "error": str(exc)[-3000:]})
            write_outputs(report, out)
            continue
        done.parent.mkdir(parents=True, exist_ok=True)
        write_json(done, entry)
        report["categories"][category] = entry
        write_outputs(report, out)
        t, s = entry["test"], entry["stream"]
        log(
            f"{category}: test AUROC {t['full']['image_auroc']:.4f} -> {t['cascade']['image_auroc']:.4f}, AUPRO "
            f"{t['full']['aupro']:.4f} -> {t['cascade']['aupro']:.4f}, tiles {t['cascade']['tile_share']:.3f}; "
            f"stream tiles {s['cascade']['tile_share']:.3f}, agreement {s['label_agreement']:.4f}, "
            f"{s['full']['images_per_second']:.2f} -> {s['cascade']['images_per_second']:.2f} img/s "
            f"x{s['speedup']:.2f}"
        )
        if not args.keep_bundles:
            shutil.rmtree(bundles, ignore_errors=True)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_outputs(report, out)
    log(f"done: {out / 'bench.json'}, {out / 'tables.md'}")


if __name__ == "__main__":
    main()
