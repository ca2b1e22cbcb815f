"""The greedy coreset on the CPU: NumPy (what training uses there) against the same algorithm in torch.

Both pick from the same seeded features; runs alternate NumPy / torch (A/B/A/B) so that a noisy machine
affects both alike, and the JSON records every time, the medians, their ratio and whether the picks agree.

    .venv/bin/python tools/bench_coreset.py --rows 61440 --dim 384 --ratio 0.1 --out runs/bench_coreset.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import cpu_model, write_json  # noqa: E402 (tools/ is the script's path)

from tilecore.train.coreset import approximate_greedy_coreset, torch_greedy_coreset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=61440)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_coreset.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    features = torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0))  # [N, D]
    runs = {"numpy": approximate_greedy_coreset, "torch": torch_greedy_coreset}
    times: dict[str, list[float]] = {name: [] for name in runs}
    picks = {}
    for _ in range(args.rounds):
        for name, coreset in runs.items():
            started = time.perf_counter()
            picks[name] = coreset(features, args.ratio, seed=0)
            times[name].append(round(time.perf_counter() - started, 3))
            print(name, times[name][-1], "s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "command": "python tools/bench_coreset.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "seconds": times,
        "median_seconds": medians,
        "torch_over_numpy": round(medians["torch"] / medians["numpy"], 3),
        "same_picks": bool(np.array_equal(np.asarray(picks["numpy"]), np.asarray(picks["torch"]))),
    }
    write_json(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
