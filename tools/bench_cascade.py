"""Early-exit cascades vs full ensembles vs single models: accuracy, GFLOPs spent and CPU throughput.

For each image size: small backbones alone and in ensembles of two and three are trained and evaluated on
the synth dataset (`tilecore eval`: test image AUROC and AUPRO, of the full ensemble and of its cascade),
then each (configuration, category) is exported and a production-like stream is scored with the runtime
(Predictor, CPU) with the cascade off and on: the category's test defects (all, or --stream-defects of
them) plus enough normal images that 95% of the stream is normal (the test's good images, then held-out
normals of a synth set built with another seed, never seen in training). Reported on the stream: label
agreement cascade vs full, image AUROC of both, exit shares, backbone GFLOPs per image actually spent,
and images/s measured full/cascade/full/cascade (--rounds rounds each, batch --batch, median).

Every configuration trains and evaluates in its own process, and each stream is scored in its own
process. Run folders live under --out, so a rerun resumes: finished configurations (metrics.json) and
finished streams (stream.json) are read back. bench.json, tables.md and cost_accuracy.png are rewritten
after every configuration, so an interrupted run leaves usable partial results.

Ensembles reuse their members' banks and backbone weights from the single-model runs (--reuse-banks, on
by default): training then only calibrates the ensemble. A bank trained from scratch as member i would
start its coreset at seed + 1000 * i instead of seed, so the banks differ from a fresh ensemble run in
that start only.

    .venv/bin/python tools/bench_cascade.py --out runs/bench_cascade --sizes 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
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

BACKBONES = ("mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
LAYERS = ["blocks.2", "blocks.4"]  # strides 8 and 16 on all four (tools/bench_setups.SMALL_BACKBONES)
SHORT = {
    "mobilenetv2_100": "mnv2",
    "tf_efficientnet_lite0": "lite0",
    "tf_efficientnet_lite1": "lite1",
    "tf_efficientnet_lite2": "lite2",
}
# run right after the singles (the 512 px subset), so that an interrupted grid still has them
PRIORITY = (
    ("mobilenetv2_100", "tf_efficientnet_lite0"),
    ("mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1"),
)
CATEGORIES = ("brick", "grass", "gravel")
LINE_IMAGES = 100  # good images per category for --line-fpr (tilecore calibrate needs 1 / target_fpr of them)


# --- configurations -----------------------------------------------------------------------------------


def config_name(members: tuple[str, ...]) -> str:
    return "+".join(SHORT.get(m, m) for m in members)


def combos_from(args: argparse.Namespace) -> list[tuple[str, ...]]:
    """The configurations to run: singles, PRIORITY, other pairs, other triples (partial results stay useful)."""
    if args.combos:
        full_name = {short: name for name, short in SHORT.items()}  # short names (mnv2+lite0) or backbones
        chosen = [tuple(full_name.get(m, m) for m in c.split("+")) for c in args.combos]
        for combo in chosen:
            unknown = [m for m in combo if m not in SHORT]
            if unknown or len(set(combo)) != len(combo):
                raise SystemExit(f"--combos {'+'.join(combo)}: expected distinct members of {', '.join(BACKBONES)}")
    else:
        chosen = [c for n in range(1, args.max_members + 1) for c in itertools.combinations(BACKBONES, n)]
    chosen = [c for c in chosen if len(c) <= args.max_members]
    return sorted(dict.fromkeys(chosen), key=lambda c: (len(c) > 1, c not in PRIORITY, len(c)))


def run_config_raw(data: Path, size: int, members: tuple[str, ...], categories: list[str], coreset: float) -> dict:
    return {
        "data": {"root": str(data.resolve()), "image_size": size, "categories": categories},
        "members": [{"backbone": b, "layers": LAYERS, "coreset_ratio": coreset} for b in members],
    }


def parse_override(text: str) -> tuple[str, str, object]:
    """`SECTION.KEY=VALUE` -> (section, key, value); VALUE is read as a TOML value, else kept as a string."""
    target, sep, value_text = text.partition("=")
    section, dot, key = target.strip().partition(".")
    if not sep or not dot or not section or not key or "." in key:
        raise SystemExit(f"--set {text}: expected SECTION.KEY=VALUE, e.g. fusion.threshold=quantile")
    try:
        value = tomllib.loads(f"v = {value_text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return section, key, value


def apply_overrides(raw: dict, overrides: list[tuple[str, str, object]]) -> dict:
    """`raw` with each override set; a `members.KEY` override sets KEY on every member."""
    raw = json.loads(json.dumps(raw))
    for section, key, value in overrides:
        if section == "members":
            for member in raw["members"]:
                member[key] = value
        else:
            raw.setdefault(section, {})[key] = value
    return raw


def check_overrides(overrides: list[tuple[str, str, object]]) -> None:
    """Refuse, in one line, overrides the run config would refuse (unknown key, wrong type, out of range)."""
    from tilecore.runtime.errors import TilecoreError
    from tilecore.train.config import config_from_dict

    raw = run_config_raw(Path("data"), 256, (BACKBONES[0],), list(CATEGORIES), 0.1)
    try:
        config_from_dict(apply_overrides(raw, overrides), "--set")
    except TilecoreError as exc:
        raise SystemExit(str(exc)) from None


# --- data ---------------------------------------------------------------------------------------------


def ensure_dataset(path: Path, size: int, seed: int, counts: dict[str, int]) -> None:
    """Build the synth set at `path` unless one with these size, seed and at least these counts is there."""
    from tilecore.train.synth import build_synth_dataset

    described = path / "dataset.json"
    if described.is_file():
        have = json.loads(described.read_text())
        if have.get("size") == size and have.get("seed") == seed:
            if all(have.get("counts", {}).get(k, -1) >= v for k, v in counts.items()):
                return
    log(f"building {path} ({size} px, seed {seed}, {counts})")
    build_synth_dataset(path, size, seed=seed, **counts)


# --- worker: train + eval -----------------------------------------------------------------------------


def seed_from_singles(config, run_dir: Path, singles: list[Path]) -> list[str]:
    """Put each member's backbone weights and banks from its single-model run into the ensemble run folder
    (train then resumes: only calibration is left). Returns what was copied, for the log."""
    from tilecore.train.ensemble import BANKS_DIR
    from tilecore.train.model import embedder_path
    from tilecore.train.run_dir import prepare_run_dir, read_metadata, update_metadata

    copied = []
    if (run_dir / "config.json").is_file():  # resumed: whatever is there stays
        return copied
    if not all((s / "members" / "m0.safetensors").is_file() for s in singles):
        return copied
    prepare_run_dir(run_dir, config)
    sources = {}
    for i, single in enumerate(singles):
        target = embedder_path(run_dir, i)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(embedder_path(single, 0), target)
        sources[str(i)] = read_metadata(single).get("weights_sources", {}).get("0", "copied")
        for bank in sorted(single.glob(f"*/{BANKS_DIR}/m0_*.safetensors")):
            category = bank.parent.parent.name
            if category not in config.data.categories:
                continue
            out = run_dir / category / BANKS_DIR / bank.name.replace("m0_", f"m{i}_", 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bank, out.with_name(f".{out.name}.tmp"))
            out.with_name(f".{out.name}.tmp").replace(out)
            copied.append(f"{category}/m{i}")
    update_metadata(run_dir, weights_sources=sources, random_init=False, banks_from_singles=[str(s) for s in singles])
    return copied


def copy_run(source: Path, run_dir: Path) -> None:
    """Start `run_dir` as a copy of another bench's run of the same configuration (weights, banks, config), so
    that training only recalibrates when the configs differ in post-processing keys alone; train refuses a
    change to a bank-defining key (train.run_dir.prepare_run_dir). A run folder already there stays."""
    if (run_dir / "config.json").is_file():
        return
    if not (source / "config.json").is_file():
        raise RuntimeError(f"--banks-from: {source} holds no run to copy")
    shutil.rmtree(run_dir, ignore_errors=True)
    skip = shutil.ignore_patterns("stream.json", "bench_train.json", ".*.tmp")
    shutil.copytree(source, run_dir.with_name(f".{run_dir.name}.tmp"), ignore=skip)
    run_dir.with_name(f".{run_dir.name}.tmp").replace(run_dir)
    log(f"{run_dir}: weights and banks copied from {source}")


def train_worker(config_path: str, run_dir: str, singles: list[str]) -> dict:
    """Train + evaluate one configuration in this process; returns timing and cost figures."""
    from tilecore.train.cascade_fit import member_gflops
    from tilecore.train.config import load_config
    from tilecore.train.evaluate import evaluate_run
    from tilecore.train.fit import train_run

    config = load_config(config_path)
    run = Path(run_dir)
    copied = seed_from_singles(config, run, [Path(s) for s in singles]) if singles else []
    started = time.perf_counter()
    train_run(config, run)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    evaluate_run(run)
    return {
        "fit_seconds": round(fit_seconds, 2),
        "eval_seconds": round(time.perf_counter() - started, 2),
        "member_gflops": member_gflops(config),
        "banks_copied": copied,
    }


# --- worker: stream -----------------------------------------------------------------------------------


def stream_paths(run_dir: Path, category: str, normals_root: Path, defects: int | None, seed: int):
    """(paths, labels) of the production-like stream, shuffled: test defects (all, or `defects` of them),
    test good images, then held-out normals up to NORMAL_SHARE normal."""
    rows = json.loads((run_dir / category / "test_scores.json").read_text())
    rng = np.random.default_rng(seed)
    bad = [r["image"] for r in rows if r["label"] == 1]
    good = [r["image"] for r in rows if r["label"] == 0]
    if defects is not None and defects < len(bad):
        bad = [bad[i] for i in sorted(rng.choice(len(bad), defects, replace=False))]
    need = stream_normals_needed(len(bad), len(good))
    held_out = sorted(str(p) for p in (normals_root / category / "test" / "good").glob("*.png"))
    if len(held_out) < need:
        raise SystemExit(f"{normals_root}/{category}: {len(held_out)} held-out normals, the stream needs {need}")
    paths = bad + good + held_out[:need]
    labels = [1] * len(bad) + [0] * (len(good) + need)
    order = rng.permutation(len(paths))
    return [paths[i] for i in order], [labels[i] for i in order], len(bad), len(good), need


def image_auroc(labels: list[int], scores: list[float]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def stream_worker(run_dir: str, category: str, bundle: str, normals: str, options: str) -> dict:
    """Score one category's stream with its bundle, cascade off and (ensembles) on."""
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.predictor import Predictor

    opts = json.loads(options)
    run = Path(run_dir)
    paths, labels, n_bad, n_good, n_held = stream_paths(run, category, Path(normals), opts["defects"], opts["seed"])
    images = [read_rgb(p) for p in paths]
    batch = opts["batch"]
    batches = [images[i : i + batch] for i in range(0, len(images), batch)]
    predictors = {"full": Predictor(bundle, device="cpu", threads=opts["threads"], cascade=False, max_batch=batch)}
    cascade = predictors["full"].manifest.cascade
    if cascade is not None:
        predictors["cascade"] = Predictor(bundle, device="cpu", threads=opts["threads"], cascade=True, max_batch=batch)
    for predictor in predictors.values():  # warm-up: sessions, threads, first-call allocations
        predictor.predict_batch(batches[0])
    rates: dict[str, list[float]] = {mode: [] for mode in predictors}
    results: dict[str, list] = {}
    drift = 0.0  # largest score change between rounds (should be 0: same inputs, same engines)
    for _ in range(opts["rounds"]):
        for mode, predictor in predictors.items():  # A/B/A/B
            started = time.perf_counter()
            out = [r for b in batches for r in predictor.predict_batch(b)]
            rates[mode].append(len(images) / (time.perf_counter() - started))
            if mode in results:
                drift = max(drift, max(abs(a.score - b.score) for a, b in zip(out, results[mode], strict=True)))
            else:
                results[mode] = out
    test_rows = json.loads((run / category / "test_scores.json").read_text())
    test_images = [read_rgb(r["image"]) for r in test_rows]
    test_labels = np.array([r["label"] for r in test_rows], dtype=bool)
    on_test = {mode: [r for i in range(0, len(test_images), batch) for r in p.predict_batch(test_images[i : i + batch])]
               for mode, p in predictors.items()}  # fmt: skip
    threshold = predictors["full"].thresholds.image
    full_scores = [r.score for r in results["full"]]
    full_labels = np.array([r.label for r in results["full"]])
    truth = np.array(labels, dtype=bool)
    # the runtime's full scores vs the PyTorch evaluation's on the test images of the stream (parity)
    eval_scores = {r["image"]: r["score"] for r in json.loads((run / category / "test_scores.json").read_text())}
    parity = max(abs(s - eval_scores[p]) for p, s in zip(paths, full_scores, strict=True) if p in eval_scores)
    report = {
        "images": len(images),
        "defects": n_bad,
        "test_good": n_good,
        "held_out_normals": n_held,
        "threshold": threshold,
        "full": {
            "image_auroc": image_auroc(labels, full_scores),
            "images_per_second": statistics.median(rates["full"]),
            "rates": rates["full"],
            "gflops_per_image": None,  # filled by the driver from member_gflops for singles
            "anomalous_share": float(full_labels.mean()),
            "normal_flag_rate": float(full_labels[~truth].mean()),  # the threshold's FPR on the stream's normals
            "defect_flag_rate": float(full_labels[truth].mean()),
        },
        "round_score_drift": drift,
        "runtime_vs_eval_max_abs_diff": parity,
        "test_at_threshold": {  # the whole test split, scored by the runtime at this bundle's threshold
            "images": len(test_rows),
            "full_image_auroc": image_auroc(test_labels.astype(int).tolist(), [r.score for r in on_test["full"]]),
            "full_normal_flag_rate": float(np.mean([r.label for r, t in zip(on_test["full"], test_labels,
                                                                               strict=True) if not t])),  # fmt: skip
        },
    }
    if cascade is not None:
        staged = results["cascade"]
        staged_labels = np.array([r.label for r in staged])
        exits = np.array([r.exit_stage for r in staged])  # 1-based
        ran = [int(np.sum(exits >= s + 1)) for s in range(len(cascade.stages))]  # images that ran each stage
        spent = sum(stage.gflops * n for stage, n in zip(cascade.stages, ran, strict=True)) / len(images)
        report["full"]["gflops_per_image"] = sum(stage.gflops for stage in cascade.stages)
        report["cascade"] = {
            "image_auroc": image_auroc(labels, [r.score for r in staged]),
            "label_agreement": float(np.mean(staged_labels == full_labels)),
            "normal_flag_rate": float(staged_labels[~truth].mean()),
            "defect_flag_rate": float(staged_labels[truth].mean()),
            "exit_shares": [float(np.mean(exits == s + 1)) for s in range(len(cascade.stages))],
            "images_per_stage": ran,
            "gflops_per_image": spent,
            "images_per_second": statistics.median(rates["cascade"]),
            "rates": rates["cascade"],
            "speedup": statistics.median(rates["cascade"]) / statistics.median(rates["full"]),
            "order": list(cascade.order),
            "windows": [None if s.window is None else list(s.window) for s in cascade.stages],
            "calibration_exit_shares": [s.exit_share for s in cascade.stages],
            "calibration_images": cascade.calibration_images,
        }
        test_exits = np.array([r.exit_stage for r in on_test["cascade"]])
        test_ran = [int(np.sum(test_exits >= s + 1)) for s in range(len(cascade.stages))]
        report["test_at_threshold"]["cascade"] = {
            "image_auroc": image_auroc(test_labels.astype(int).tolist(), [r.score for r in on_test["cascade"]]),
            "label_agreement": float(np.mean([a.label == b.label for a, b in zip(on_test["cascade"], on_test["full"],
                                                                                  strict=True)])),  # fmt: skip
            "exit_shares": [float(np.mean(test_exits == s + 1)) for s in range(len(cascade.stages))],
            "gflops_per_image": sum(st.gflops * n for st, n in zip(cascade.stages, test_ran, strict=True))
            / len(test_rows),
        }
    return report


# --- driver -------------------------------------------------------------------------------------------


def bench_config(
    args: argparse.Namespace,
    size: int,
    members: tuple[str, ...],
    data: Path,
    normals: Path,
    out: Path,
    line: Path | None = None,
) -> dict:
    """Train, evaluate and stream-score one configuration (each step resumed from its files)."""
    name = config_name(members)
    run_dir = out / "runs" / str(size) / name
    raw = apply_overrides(run_config_raw(data, size, members, args.categories, args.coreset), args.overrides)
    started = time.perf_counter()
    train_file = run_dir / "bench_train.json"
    if (run_dir / "metrics.json").is_file() and train_file.is_file():
        train = json.loads(train_file.read_text())
        log(f"{size} {name}: trained and evaluated before, reading back")
    else:
        config_dir = out / "configs" / str(size)
        config_dir.mkdir(parents=True, exist_ok=True)
        config_path = config_dir / f"{name}.toml"
        config_path.write_text(to_toml(raw))
        singles = []
        if args.banks_from is not None:
            copy_run(args.banks_from / "runs" / str(size) / name, run_dir)
        elif len(members) > 1 and args.reuse_banks:
            singles = [str(out / "runs" / str(size) / config_name((m,))) for m in members]
        log(f"{size} {name}: train + eval" + (" (banks from the single-model runs)" if singles else ""))
        command = [sys.executable, __file__, "--train-worker", str(config_path), str(run_dir), *singles]
        train = run_worker(command, f"{size} {name} train + eval")
        write_json(train_file, train)
        log(f"{size} {name}: fit {train['fit_seconds']:.0f} s, eval {train['eval_seconds']:.0f} s")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {
        "config": name,
        "members": list(members),
        "size": size,
        "run_dir": str(run_dir),
        "member_gflops": train["member_gflops"],
        "full_gflops_per_image": sum(train["member_gflops"]),
        "fit_seconds": train["fit_seconds"],
        "eval_seconds": train["eval_seconds"],
        "categories": {},
    }
    for category in args.categories:
        m = metrics["categories"][category]
        entry = {"test": {k: m.get(k) for k in ("image_auroc", "aupro", "pixel_auroc", "test_images")}}
        if "cascade" in m:
            entry["test_cascade"] = m["cascade"]
        stream_file = run_dir / category / "stream.json"
        if stream_file.is_file():
            entry["stream"] = json.loads(stream_file.read_text())
        else:
            bundle = out / "bundles" / str(size) / name / category
            shutil.rmtree(bundle, ignore_errors=True)
            bundle.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [*tilecore_cli(), "export", str(run_dir), "--category", category, "--out", str(bundle)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{size} {name} {category}: export failed:\n{proc.stderr[-3000:]}")
            export_seconds = time.perf_counter() - t0
            if args.line_fpr is not None:
                calibrated = line_calibrated(bundle, line, category, args.line_fpr)
                shutil.rmtree(bundle, ignore_errors=True)
                bundle = calibrated
            options = {
                "defects": args.stream_defects,
                "seed": args.seed,
                "batch": args.batch,
                "rounds": args.rounds,
                "threads": args.threads,
            }
            t0 = time.perf_counter()
            command = [sys.executable, __file__, "--stream-worker", str(run_dir), category, str(bundle)]
            stream = run_worker([*command, str(normals), json.dumps(options)], f"{size} {name} {category} stream")
            stream["export_seconds"] = round(export_seconds, 2)
            stream["stream_seconds"] = round(time.perf_counter() - t0, 2)
            if stream["full"]["gflops_per_image"] is None:
                stream["full"]["gflops_per_image"] = row["full_gflops_per_image"]
            write_json(stream_file, stream)
            entry["stream"] = stream
            if not args.keep_bundles:
                shutil.rmtree(bundle, ignore_errors=True)
        row["categories"][category] = entry
        log(f"{size} {name} {category}: {stream_line(entry)}")
    log(f"{size} {name}: done in {time.perf_counter() - started:.0f} s")
    return row


def stream_line(entry: dict) -> str:
    s = entry["stream"]
    text = (
        f"test AUROC {entry['test']['image_auroc']:.4f}; stream {s['images']} images ({s['defects']} defects) "
        f"full AUROC {s['full']['image_auroc']:.4f} {s['full']['images_per_second']:.1f} img/s"
    )
    if "cascade" in s:
        c = s["cascade"]
        text += (
            f"; cascade AUROC {c['image_auroc']:.4f} agreement {c['label_agreement']:.4f} "
            f"exits {[round(x, 3) for x in c['exit_shares']]} {c['gflops_per_image']:.2f}/"
            f"{s['full']['gflops_per_image']:.2f} GFLOPs {c['images_per_second']:.1f} img/s x{c['speedup']:.2f}"
        )
    return text


# --- summaries, tables, plot --------------------------------------------------------------------------


def summary_rows(row: dict) -> list[dict]:
    """The configuration's rows, mean over categories: full, and cascade where it has one."""
    cats = list(row["categories"].values())
    streams = [c["stream"] for c in cats if "stream" in c]
    out = [
        {
            "config": row["config"],
            "kind": "single" if len(row["members"]) == 1 else "ensemble",
            "members": row["members"],
            "test_image_auroc": mean_of([c["test"]["image_auroc"] for c in cats]),
            "test_aupro": mean_of([c["test"]["aupro"] for c in cats]),
            "test_gflops_per_image": row["full_gflops_per_image"],
            "stream_gflops_per_image": row["full_gflops_per_image"],
            "test_agreement": None,
            "stream_agreement": None,
            "stream_image_auroc": mean_of([s["full"]["image_auroc"] for s in streams]),
            "stream_images_per_second": mean_of([s["full"]["images_per_second"] for s in streams]),
            "speedup": None,
            "exit_shares": None,
            "threshold_test_auroc": mean_of([s["test_at_threshold"]["full_image_auroc"] for s in streams
                                             if "test_at_threshold" in s]),  # fmt: skip
            "threshold_test_agreement": None,
        }
    ]
    if any("test_cascade" in c for c in cats):
        tc = [c["test_cascade"] for c in cats if "test_cascade" in c]
        sc = [s["cascade"] for s in streams if "cascade" in s]
        stages = len(tc[0]["exit_shares"])
        out.append(
            {
                "config": row["config"] + " cascade",
                "kind": "cascade",
                "members": row["members"],
                "test_image_auroc": mean_of([c["image_auroc"] for c in tc]),
                "test_aupro": mean_of([c["aupro"] for c in tc]),
                "test_gflops_per_image": mean_of([c["gflops_per_image"] for c in tc]),
                "stream_gflops_per_image": mean_of([c["gflops_per_image"] for c in sc]),
                "test_agreement": mean_of([c["label_agreement"] for c in tc]),
                "stream_agreement": mean_of([c["label_agreement"] for c in sc]),
                "stream_image_auroc": mean_of([c["image_auroc"] for c in sc]),
                "stream_images_per_second": mean_of([c["images_per_second"] for c in sc]),
                "speedup": mean_of([c["speedup"] for c in sc]),
                "exit_shares": [mean_of([c["exit_shares"][s] for c in sc]) for s in range(stages)] if sc else None,
                "threshold_test_auroc": mean_of([s["test_at_threshold"]["cascade"]["image_auroc"] for s in streams
                                                 if "cascade" in s.get("test_at_threshold", {})]),  # fmt: skip
                "threshold_test_agreement": mean_of([s["test_at_threshold"]["cascade"]["label_agreement"]
                                                     for s in streams if "cascade" in s.get("test_at_threshold", {})]),
            }
        )
    return out


def pareto(points: list[dict], x: str, y: str) -> list[dict]:
    """Points no other point beats: at most the cost and at least the accuracy, one of them strictly."""
    usable = [p for p in points if p[x] is not None and p[y] is not None]
    front = [
        p for p in usable if not any(q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y]) for q in usable)
    ]
    return sorted(front, key=lambda p: p[x])


def size_table(rows: list[dict]) -> str:
    head = (
        "| config | members | test image AUROC | test AUPRO | GFLOPs/image spent (test) | GFLOPs/image spent "
        "(stream) | exit shares (stream) | test agreement | stream agreement | stream image AUROC | "
        "stream img/s | speed-up | test AUROC at the stream's threshold | test agreement there |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        exits = "–" if r["exit_shares"] is None else " / ".join(f"{e:.2f}" for e in r["exit_shares"])
        lines.append(
            f"| {r['config']} | {' + '.join(r['members'])} | {fmt(r['test_image_auroc'], 4)} | "
            f"{fmt(r['test_aupro'], 4)} | {fmt(r['test_gflops_per_image'], 2)} | "
            f"{fmt(r['stream_gflops_per_image'], 2)} | {exits} | {fmt(r['test_agreement'], 4)} | "
            f"{fmt(r['stream_agreement'], 4)} | {fmt(r['stream_image_auroc'], 4)} | "
            f"{fmt(r['stream_images_per_second'], 1)} | {fmt(r['speedup'], 2)} | "
            f"{fmt(r.get('threshold_test_auroc'), 4)} | {fmt(r.get('threshold_test_agreement'), 4)} |"
        )
    return "\n".join(lines)


def write_outputs(report: dict, out: Path) -> None:
    write_json(out / "bench.json", report)
    parts = [
        "# Early-exit cascades: cost vs accuracy\n",
        f"Command: `{report['command']}`  \nCPU: {report['cpu']} ({report['cpu_count']} cores)  \n"
        f"Stream: per category, {report['stream']['description']}; scored with the runtime (Predictor, CPU, "
        f"batch {report['stream']['batch']}), full/cascade alternated, {report['stream']['rounds']} rounds each, "
        "median images/s. Figures are means over the categories "
        f"({', '.join(report['categories'])}). GFLOPs are backbone GFLOPs per image (train.cascade_fit."
        "member_gflops); a cascade's are those spent (each image pays every stage it reaches).\n",
    ]
    if report.get("overrides"):
        parts.append(
            "Config overrides (--set) on every run: "
            + ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in report["overrides"].items())
            + ".\n"
        )
    if report.get("line_fpr") is not None:
        parts.append(
            f"Operating point: every bundle went through `tilecore calibrate --target-fpr {report['line_fpr']:g}` on "
            f"{report['line_images']} good images per category (synth seed 2, apart from the stream's seed-1 normals) "
            "before its stream: the threshold flags at most that share of them, and the cascade's windows are refit "
            "there on export's calibration images plus those good images. The test columns from `tilecore eval` are "
            "at the run's own threshold; the last two are the runtime's on the test split at the stream's.\n"
        )
    if report.get("banks_from"):
        parts.append(f"Weights and banks copied from `{report['banks_from']}` (same data split): recalibrated only.\n")
    if report.get("reuse_banks"):
        parts.append(
            "Ensembles reuse their members' single-model banks and weights (coreset start seed 0 for every member; "
            "a fresh ensemble run would start member i at 1000 i).\n"
        )
    for size, rows in report["summary"].items():
        front = pareto(rows, "stream_gflops_per_image", "test_image_auroc")
        parts.append(f"\n## {size} px\n\n{size_table(rows)}\n")
        parts.append(
            "\nPareto front (test image AUROC vs GFLOPs/image spent on the stream, mean over categories): "
            + (
                ", ".join(
                    f"{p['config']} ({p['stream_gflops_per_image']:.2f} GFLOPs, {p['test_image_auroc']:.4f})"
                    for p in front
                )
                or "–"
            )
            + ".\n"
        )
    (out / ".tables.md.tmp").write_text("\n".join(parts))
    (out / ".tables.md.tmp").replace(out / "tables.md")
    try:
        plot(report, out / "cost_accuracy.png")
    except Exception as exc:  # noqa: BLE001 - a plot problem must not lose the figures
        log(f"plot failed: {exc}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(report["summary"])
    if not sizes:
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 5.5), squeeze=False)
    style = {"single": ("o", "tab:blue"), "ensemble": ("s", "tab:orange"), "cascade": ("^", "tab:green")}
    for ax, size in zip(axes[0], sizes, strict=True):
        rows = report["summary"][size]
        for kind, (marker, colour) in style.items():
            pts = [r for r in rows if r["kind"] == kind and r["stream_gflops_per_image"] is not None]
            ax.scatter(
                [r["stream_gflops_per_image"] for r in pts],
                [r["test_image_auroc"] for r in pts],
                marker=marker,
                color=colour,
                label={"single": "single model", "ensemble": "ensemble (all members)", "cascade": "cascade"}[kind],
                s=45,
                zorder=3,
            )
        front = pareto(rows, "stream_gflops_per_image", "test_image_auroc")
        if front:
            ax.step(
                [p["stream_gflops_per_image"] for p in front],
                [p["test_image_auroc"] for p in front],
                where="post",
                color="grey",
                linestyle="--",
                zorder=2,
                label="Pareto front",
            )
            for p in front:
                ax.annotate(
                    p["config"],
                    (p["stream_gflops_per_image"], p["test_image_auroc"]),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=8,
                )
        ax.set_xlabel("backbone GFLOPs / image spent (production-like stream, 95% normal)")
        ax.set_ylabel("test image AUROC (mean over categories)")
        ax.set_title(f"synth {size} px")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path.with_name(f".{path.name}.tmp.png"), dpi=120)
    plt.close(fig)
    path.with_name(f".{path.name}.tmp.png").replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cascade"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], choices=[256, 512, 1024])
    parser.add_argument("--data", default="data/synth{size}", help="synth set per size, seed 0 (built if missing)")
    parser.add_argument("--normals", default="data/synth{size}_normals", help="held-out normals, seed 1")
    parser.add_argument("--combos", nargs="+", help="configurations, members joined by + (default: all)")
    parser.add_argument("--max-members", type=int, default=3)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--stream-defects", type=int, help="defects per category in the stream (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the stream per mode")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="runtime threads (0: library default)")
    parser.add_argument("--seed", type=int, default=0, help="stream subsampling and order")
    parser.add_argument("--no-reuse-banks", dest="reuse_banks", action="store_false")
    parser.add_argument("--keep-bundles", action="store_true")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="run config override, repeatable (VALUE as TOML, e.g. fusion.threshold=quantile, fusion.quantile=0.99; "
        "members.KEY sets every member); recorded in bench.json",
    )
    parser.add_argument(
        "--banks-from",
        type=Path,
        help="another bench --out whose runs (same size and members) supply weights and banks: only calibration, "
        "eval and streams run; refused by train when a --set changes a bank-defining key such as data.val_fraction",
    )
    parser.add_argument(
        "--line-fpr",
        type=float,
        help="operating point: each bundle goes through `tilecore calibrate --target-fpr F` on --line's good images "
        "before its stream (threshold and cascade windows set there)",
    )
    parser.add_argument("--line", default="data/synth{size}_line", help="good images for --line-fpr, seed 2")
    parser.add_argument("--train-worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--stream-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_worker:
        print(json.dumps(train_worker(args.train_worker[0], args.train_worker[1], args.train_worker[2:])))
        return
    if args.stream_worker:
        print(json.dumps(stream_worker(*args.stream_worker)))
        return
    if args.rounds < 2:
        raise SystemExit("--rounds: expected at least 2 (full/cascade alternated)")
    if args.stream_defects is not None and args.stream_defects < 1:
        raise SystemExit("--stream-defects: expected at least 1")
    combos = combos_from(args)
    overrides_text = args.overrides
    args.overrides = [parse_override(t) for t in overrides_text]
    check_overrides(args.overrides)
    overrides = {f"{section}.{key}": value for section, key, value in args.overrides}
    out = args.out
    previous = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    if previous and previous.get("line_fpr") != args.line_fpr:
        raise SystemExit(f"--out {out}: holds results for --line-fpr {previous.get('line_fpr')}; choose another --out")
    if previous and previous.get("overrides", {}) != overrides:
        raise SystemExit(
            f"--out {out}: holds results with overrides {previous.get('overrides', {})}, not {overrides}; "
            "choose another --out"
        )
    if args.banks_from is not None and args.banks_from.resolve() == out.resolve():
        raise SystemExit("--banks-from: expected another bench --out than --out")
    out.mkdir(parents=True, exist_ok=True)
    test_counts = {"n_train": 60, "n_test_good": 15, "n_test_defect": 30}
    defects = test_counts["n_test_defect"] if args.stream_defects is None else args.stream_defects
    defects = min(defects, test_counts["n_test_defect"])
    held_out = stream_normals_needed(defects, test_counts["n_test_good"])
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_model(),
        "cpu_count": len([ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("processor")]),
        "categories": args.categories,
        "coreset_ratio": args.coreset,
        "layers": LAYERS,
        "reuse_banks": args.reuse_banks and args.banks_from is None,
        "overrides": overrides,  # --set: on every run config, after the tool's own keys
        "banks_from": None if args.banks_from is None else str(args.banks_from),
        "line_fpr": args.line_fpr,  # None: the run's own threshold; else tilecore calibrate on LINE_IMAGES good images
        "line_images": LINE_IMAGES if args.line_fpr is not None else 0,
        "stream": {
            "description": f"{defects} test defects + {test_counts['n_test_good']} test good + {held_out} held-out "
            f"normals (seed 1), {NORMAL_SHARE:.0%} normal",
            "defects": defects,
            "batch": args.batch,
            "rounds": args.rounds,
            "threads": args.threads,
            "seed": args.seed,
        },
        "configs": previous.get("configs", {}),  # size -> name -> row; other sizes' rows of an earlier run stay
        "summary": {},
        "failures": [],
    }
    for size in args.sizes:
        data = Path(args.data.format(size=size))
        normals = Path(args.normals.format(size=size))
        ensure_dataset(data, size, 0, test_counts)
        ensure_dataset(normals, size, 1, {"n_train": 0, "n_test_good": held_out, "n_test_defect": 0})
        line = None
        if args.line_fpr is not None:
            line = Path(args.line.format(size=size))
            ensure_dataset(line, size, 2, {"n_train": 0, "n_test_good": LINE_IMAGES, "n_test_defect": 0})
        for members in combos:
            name = config_name(members)
            try:
                row = bench_config(args, size, members, data, normals, out, line)
            except RuntimeError as exc:
                log(f"{size} {name}: FAILED {str(exc).splitlines()[0]}")
                report["failures"].append({"size": size, "config": name, "error": str(exc)[-3000:]})
                write_outputs(report, out)
                continue
            report["configs"].setdefault(str(size), {})[name] = row
            report["summary"] = {
                s: [r for row in rows.values() for r in summary_rows(row)] for s, rows in report["configs"].items()
            }
            write_outputs(report, out)
    log(f"done: {out / 'bench.json'}, {out / 'tables.md'}, {out / 'cost_accuracy.png'}")


if __name__ == "__main__":
    main()
