"""Runtime speed: images/s and per-image latency of the exported bundle on CPU vs the PyTorch eager model.

For each setup (SM256, SM512, ENS4, ENS9 at 512 px, tf_efficientnet_lite0, coreset 1%), trains one
category, exports it, then times both paths on the same decoded test images (decoding excluded):
latency at batch 1 (p50 / p99 over all images, after warm-up) and throughput at --batch. Also checks
the two paths agree (max score difference relative to the score range).

    .venv/bin/python tools/bench_runtime.py --out runs/bench_runtime.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SETUPS = ("SM256", "SM512", "ENS4", "ENS9")


def timed(fn, images: list[np.ndarray], batch: int) -> list[float]:
    """Seconds per call of fn over consecutive batches of `images`."""
    seconds = []
    for i in range(0, len(images), batch):
        started = time.perf_counter()
        fn(images[i : i + batch])
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(fn, images: list[np.ndarray], batch: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn(images[:1])
    latency_ms = sorted(1000 * s for s in timed(fn, images, 1))
    throughput_s = timed(fn, images, batch)
    return {
        "latency_p50_ms": round(statistics.median(latency_ms), 2),
        "latency_p99_ms": round(float(np.percentile(latency_ms, 99)), 2),
        "images_per_second": round(len(images) / sum(throughput_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synth512")
    parser.add_argument("--category", default="grass")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench_runtime.json")
    args = parser.parse_args()

    import torch

    from tilecore.export.bundle import export_run
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.predictor import Predictor
    from tilecore.train.config import config_from_dict
    from tilecore.train.data import load_category
    from tilecore.train.ensemble import load_category_model
    from tilecore.train.fit import train_run
    from tilecore.train.model import load_embedder
    from tilecore.train.synth import build_synth_dataset

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "dataset.json").is_file():
        build_synth_dataset(data, 512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for setup in args.setups:
            config = config_from_dict(
                {
                    "data": {"root": str(data.resolve()), "image_size": 512, "categories": [args.category]},
                    "tiling": {"preset": setup},
                    "members": [{"coreset_ratio": 0.01}],
                    "train": {"batch_size": args.batch},
                }
            )
            run, bundle = tmp / setup, tmp / f"{setup}_bundle"
            train_run(config, run)
            export_run(run, bundle)
            samples = load_category(data, args.category, "mvtec", 0.1, 0).test
            images = [read_rgb(s.image) for s in samples]
            model = load_category_model(config, run, args.category, [load_embedder(config, run, 0)])
            predictor = Predictor(bundle, device="cpu", threads=args.threads)
            eager = measure(model.predict, images, args.batch, args.warmup)
            runtime = measure(predictor.predict_batch, images, args.batch, args.warmup)
            torch_scores, _ = model.predict(images)
            runtime_scores = np.array([r.score for r in predictor.predict_batch(images)])
            stages = predictor.predict_batch(images[:1])[0].timings_ms
            row = {
                "setup": setup,
                "images": len(images),
                "pytorch_eager": eager,
                "runtime_cpu": runtime,
                "speedup_throughput": round(runtime["images_per_second"] / eager["images_per_second"], 2),
                "max_score_diff_over_range": float(
                    np.abs(runtime_scores - torch_scores).max() / (torch_scores.max() - torch_scores.min())
                ),
                "runtime_stage_ms_batch1": stages,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "batch": args.batch, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
