"""The tiled-ensemble paper's six setups, and small-model ensembles vs single models, on the synth dataset.

Table 1 (Rolih et al. setups at 512 px): SM256, SM512, ST4, ST9, ENS4, ENS9 x (image AUROC, AUPRO, fit time,
peak RSS), mean +- std over seeds (the seed moves the validation split and the coreset start), plus image
AUROC per defect-size bin to show where small defects are won or lost.
Table 2 (in the spirit of Kondratyuk et al. 2020): tf_efficientnet_lite0/1/2 and mobilenetv2_100 alone and
in ensembles of two and three, accuracy vs backbone GFLOPs per image.

Every configuration trains and evaluates in its own process (fit time and peak RSS are its own).
`--variants` adds post-processing variants of the setups (e.g. `ENS9N,ENS9:image_score=max`): each reuses
the banks of the setup it shares them with (a copy of that run, recalibrated: train.run_dir's no-refit path),
so its time column is the recalibration's; a variant with no such setup among --setups is trained in full.

    .venv/bin/python tools/bench_setups.py --out runs/bench_setups
    .venv/bin/python tools/bench_setups.py --setups ENS9 --variants ENS9N,ENS9N:image_score=top3
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import to_toml  # noqa: E402 (tools/ is the script's path)

SETUPS = ("SM256", "SM512", "ST4", "ST9", "ENS4", "ENS9")
SMALL_BACKBONES = {  # name -> layers at strides 8 and 16
    "tf_efficientnet_lite0": ["blocks.2", "blocks.4"],
    "tf_efficientnet_lite1": ["blocks.2", "blocks.4"],
    "tf_efficientnet_lite2": ["blocks.2", "blocks.4"],
    "mobilenetv2_100": ["blocks.2", "blocks.4"],
}
# Defect area as a fraction of the image: the bins of the per-size breakdown.
RESULT_FILE = "bench_result.json"  # a finished configuration's figures, in its run folder (--runs)
SIZE_BINS = ((0.0, 0.001, "<0.1%"), (0.001, 0.005, "0.1-0.5%"), (0.005, 1.0, ">0.5%"))


def member(backbone: str, coreset: float) -> dict:
    return {"backbone": backbone, "layers": SMALL_BACKBONES[backbone], "coreset_ratio": coreset}


def parse_variant(spec: str) -> tuple[str, dict[str, dict]]:
    """"ENS9N" or "ENS9:image_score=max:fusion.rule=max" -> (preset, {section: {key: value}}); a key without
    a section is a [tiling] key, and a value that is not JSON is a string."""
    preset, *changes = spec.split(":")
    overrides: dict[str, dict] = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or not key:
            raise SystemExit(f"--variants {spec!r}: expected PRESET[:key=value...], got {change!r}")
        section, _, name = key.rpartition(".")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        overrides.setdefault(section or "tiling", {})[name] = parsed
    return preset, overrides


def variant_config(base: dict, overrides: dict[str, dict]) -> dict:
    raw = json.loads(json.dumps(base))  # a deep copy
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


def bank_source(raw: dict, trained: dict[str, dict]) -> str | None:
    """The trained setup (name -> config) whose banks `raw` reuses: one it differs from in post-processing
    keys alone (train.config.POSTPROCESSING_KEYS), or None."""
    from tilecore.train.config import config_from_dict
    from tilecore.train.run_dir import changed_keys

    config = config_from_dict(raw)
    for name, base in trained.items():
        if not changed_keys(config_from_dict(base), config)[0]:
            return name
    return None


def setup_config(data: str, size: int, preset: str, seed: int, coreset: float) -> dict:
    return {
        "data": {"root": data, "image_size": size, "split_seed": seed},
        "tiling": {"preset": preset},
        "members": [member("tf_efficientnet_lite0", coreset)],
        "train": {"seed": seed},
    }


def size_bin_auroc(run_dir: Path, image_area: int) -> dict[str, float | None]:
    """Image AUROC of normal test images vs the defects in each size bin, pooled over categories."""
    from sklearn.metrics import roc_auc_score

    rows = [r for f in sorted(run_dir.glob("*/test_scores.json")) for r in json.loads(f.read_text())]
    normal = [r["score"] for r in rows if r["label"] == 0]
    result = {}
    for low, high, name in SIZE_BINS:
        sized = [r for r in rows if r["label"] == 1 and r["defect_pixels"] is not None]  # masks known
        defects = [r["score"] for r in sized if low <= r["defect_pixels"] / image_area < high]
        labels = [0] * len(normal) + [1] * len(defects)
        result[name] = float(roc_auc_score(labels, normal + defects)) if defects else None
    return result


def backbone_gflops(config_raw: dict) -> float:
    """Backbone + head GFLOPs per image: every member on every tile, at its backbone input size."""
    from tilecore.train.cascade_fit import member_gflops
    from tilecore.train.config import config_from_dict

    return sum(member_gflops(config_from_dict(config_raw)))


def run_worker(config_path: str, run_dir: str) -> dict:
    """Train + evaluate one configuration in this process; returns its figures."""
    from tilecore.train.config import load_config
    from tilecore.train.evaluate import evaluate_run
    from tilecore.train.fit import train_run
    from tilecore.train.run_dir import peak_rss_mb

    config = load_config(config_path)
    done = Path(run_dir) / RESULT_FILE
    if done.is_file():  # --runs: a finished configuration is read back
        return json.loads(done.read_text())
    started = time.perf_counter()
    train_run(config, Path(run_dir))
    fit_seconds = time.perf_counter() - started
    train_rss = peak_rss_mb()
    report = evaluate_run(Path(run_dir))
    result = {
        "fit_seconds": round(fit_seconds, 2),
        "train_peak_rss_mb": round(train_rss, 1),
        "image_auroc": report["mean"]["image_auroc"],
        "aupro": report["mean"]["aupro"],
        "pixel_auroc": report["mean"]["pixel_auroc"],
        "per_category": {c: {k: m[k] for k in ("image_auroc", "aupro")} for c, m in report["categories"].items()},
        "size_bins": size_bin_auroc(Path(run_dir), config.data.image_size**2),
    }
    done.write_text(json.dumps(result) + "\n")
    return result


def run_config(raw: dict, tmp: Path, name: str) -> dict:
    config_path = tmp / f"{name}.toml"
    config_path.write_text(to_toml(raw))
    command = [sys.executable, __file__, "--worker", str(config_path), str(tmp / name)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mean_std(values: list[float]) -> str:
    if not values:  # e.g. no defect of a size bin in a small test split
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def setups_table(results: dict[str, list[dict]]) -> str:
    bins = [name for _, _, name in SIZE_BINS]
    head = "| setup | image AUROC | AUPRO | fit time (s) | peak RSS (MB) | " + " | ".join(
        f"img AUROC {b}" for b in bins
    )
    lines = [head + " |", "|" + "---|" * (5 + len(bins))]
    for setup, runs in results.items():
        source = runs[0].get("banks_from")
        shown = f"{setup} (banks of {source}; time: recalibration)" if source else setup
        cells = [
            mean_std([r["image_auroc"] for r in runs]),
            mean_std([r["aupro"] for r in runs]),
            mean_std([r["fit_seconds"] for r in runs]),
            f"{statistics.mean(r['train_peak_rss_mb'] for r in runs):.0f}",
        ]
        cells += [mean_std([r["size_bins"][b] for r in runs if r["size_bins"][b] is not None]) for b in bins]
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def efficiency_table(rows: list[dict]) -> str:
    lines = ["| members | GFLOPs / image | image AUROC | AUPRO | fit time (s) |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["gflops"]):
        lines.append(
            f"| {' + '.join(r['members'])} | {r['gflops']:.2f} | {r['image_auroc']:.3f} | {r['aupro']:.3f} | "
            f"{r['fit_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synth512", help="512 px synth dataset (built if missing)")
    parser.add_argument("--small-data", default="data/synth256", help="256 px synth dataset for table 2")
    parser.add_argument("--out", default="runs/bench_setups", help="folder for bench.json and tables.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=SETUPS)
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated PRESET[:key=value...] (e.g. ENS9N,ENS9:image_score=max), on the setups' banks",
    )
    parser.add_argument("--size", type=int, default=512, help="image size of the setups (the paper's 512)")
    parser.add_argument("--coreset", type=float, default=0.01, help="coreset ratio (PatchCore's ensemble 1%%)")
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--runs", help="keep the run folders here (a rerun reads finished ones back; default: none)")
    parser.add_argument("--tables-from", nargs="+", type=Path, help="only render tables from bench.json files")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tables_from:
        merged: dict = {"setups": {}, "efficiency": []}
        for path in args.tables_from:
            part = json.loads(path.read_text())
            merged["setups"].update(part["setups"])
            merged["efficiency"] += part["efficiency"]
        print(setups_table(merged["setups"]))
        if merged["efficiency"]:
            print("\n" + efficiency_table(merged["efficiency"]))
        return
    if args.worker:
        print(json.dumps(run_worker(*args.worker)))
        return

    from tilecore.train.synth import build_synth_dataset

    specs = [spec for spec in args.variants.split(",") if spec]
    variants = [parse_variant(spec) for spec in specs]  # a bad spec fails before any work
    for path, size in ((args.data, args.size), (args.small_data, 256))[: 1 if args.skip_efficiency else 2]:
        if not (Path(path) / "dataset.json").is_file():
            build_synth_dataset(Path(path), size)
    data = str(Path(args.data).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"setups": {}, "efficiency": [], "coreset_ratio": args.coreset, "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(args.runs or tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        for setup in args.setups:
            runs = []
            for seed in args.seeds:
                raw = setup_config(data, args.size, setup, seed, args.coreset)
                runs.append(run_config(raw, tmp, f"{setup}_s{seed}"))
                print(setup, seed, {k: runs[-1][k] for k in ("image_auroc", "aupro", "fit_seconds")}, flush=True)
            report["setups"][setup] = runs
            (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        for spec, (preset, overrides) in zip(specs, variants, strict=True):
            runs = []
            for seed in args.seeds:
                raw = variant_config(setup_config(data, args.size, preset, seed, args.coreset), overrides)
                trained = {s: setup_config(data, args.size, s, seed, args.coreset) for s in args.setups}
                source = bank_source(raw, trained)
                name = f"variant_{re.sub(r'[^A-Za-z0-9]+', '-', spec)}_s{seed}"  # one folder per spec (--runs)
                if source is not None and not (tmp / name).exists():  # its banks: a copy of that run, ...
                    ignore = shutil.ignore_patterns(RESULT_FILE)  # ... recalibrated by the worker's train_run
                    shutil.copytree(tmp / f"{source}_s{seed}", tmp / name, ignore=ignore)
                runs.append({**run_config(raw, tmp, name), "banks_from": source})
                print(spec, seed, {k: runs[-1][k] for k in ("image_auroc", "aupro", "fit_seconds")}, flush=True)
            report["setups"][spec] = runs
            (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        if not args.skip_efficiency:
            small = str(Path(args.small_data).resolve())
            for n in (1, 2, 3):
                for combo in itertools.combinations(SMALL_BACKBONES, n):
                    raw = {
                        "data": {"root": small, "image_size": 256},
                        "members": [member(b, 0.1) for b in combo],
                    }
                    result = run_config(raw, tmp, "eff_" + "_".join(combo))
                    row = {"members": list(combo), "gflops": backbone_gflops(raw), **result}
                    report["efficiency"].append(row)
                    print(combo, {k: row[k] for k in ("gflops", "image_auroc", "aupro")}, flush=True)
                    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    heading = f"## Setups at {args.size} px, seeds {args.seeds}, coreset {args.coreset}"
    tables = f"{heading}\n\n{setups_table(report['setups'])}\n"
    if report["efficiency"]:
        tables += f"\n## Small-model ensembles at 256 px (seed 0)\n\n{efficiency_table(report['efficiency'])}\n"
    (out / "tables.md").write_text(tables)
    print(tables)


if __name__ == "__main__":
    main()
