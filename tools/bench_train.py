"""Training benchmark: fit time and peak RSS per category, and coreset selection alone.

Each category trains in its own process so its peak RSS is its own. Coreset timing uses the issue's
shape, 61,440 x 384 float32 rows (60 images x 32 x 32 patches), at ratios 0.1 and 0.01.

    .venv/bin/python tools/bench_train.py --data data/synth256 --out runs/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fit_one_category(data: str, category: str, run_dir: str) -> dict:
    """Worker: train one category with the default config; print its stats as JSON."""
    from tilecore.train.config import Config
    from tilecore.train.fit import train_run
    from tilecore.train.run_dir import peak_rss_mb

    config = Config()
    config.data.root = data
    config.data.categories = [category]
    started = time.perf_counter()
    metadata = train_run(config, Path(run_dir))
    stats = metadata["categories"][category]
    return {
        "category": category,
        "fit_seconds": stats["fit_seconds"],  # feature extraction + coreset
        "train_seconds_total": round(time.perf_counter() - started, 3),  # + model load + validation scoring
        "bank_size": stats["bank_size"],
        "train_images": stats["train_images"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def time_coreset(rows: int, dim: int, ratios: list[float], repeats: int) -> list[dict]:
    import torch

    from tilecore.train.coreset import approximate_greedy_coreset

    features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    results = []
    for ratio in ratios:
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            approximate_greedy_coreset(features, ratio, seed=0)
            seconds.append(time.perf_counter() - started)
        results.append(
            {
                "rows": rows,
                "dim": dim,
                "ratio": ratio,
                "median_seconds": round(statistics.median(seconds), 3),
                "runs_seconds": [round(s, 3) for s in seconds],
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synth256", help="MVTec-layout dataset (default: the synth set)")
    parser.add_argument("--out", default="runs/bench_train.json", help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=3, help="coreset timing repeats")
    parser.add_argument("--worker", nargs=2, metavar=("CATEGORY", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(fit_one_category(args.data, *args.worker)))
        return

    import torch

    from tilecore.train.data import list_categories

    categories = list_categories(Path(args.data), "mvtec")
    per_category = []
    with tempfile.TemporaryDirectory() as tmp:
        for category in categories:
            command = [sys.executable, __file__, "--data", args.data, "--worker", category, f"{tmp}/{category}"]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            per_category.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(per_category[-1], flush=True)
    coreset = time_coreset(61_440, 384, [0.1, 0.01], args.repeats)
    for row in coreset:
        print(row, flush=True)
    report = {
        "machine": {"threads": torch.get_num_threads(), "python": sys.version.split()[0]},
        "config": "defaults (tf_efficientnet_lite0 blocks.2+blocks.4, 256 px, embed 1024->384, coreset 0.1)",
        "per_category": per_category,
        "coreset": coreset,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
