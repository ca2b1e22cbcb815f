"""Training wall time here vs through Ray, and what the measured task costs predict for many products.

Two configurations are trained on the demo dataset (`make demo` builds data/synth256) as a user would train
them, each in a fresh `tilecore train` process: the demo config (one tf_efficientnet_lite0, 256 px, untiled:
one bank per category) and ENS9 with three members (mobilenetv2_100, tf_efficientnet_lite0,
tf_efficientnet_lite1, all with their offline ImageNet weights: 27 banks per category). Each is trained
locally and through `--ray local` (a private Ray instance holding this machine's CPUs), in the order local,
Ray, local, Ray... (--repeats rounds), so both see the same drift of a shared machine; the medians are
reported.

Every run records each job's own seconds (metadata `task_seconds`: each bank, each calibration). From the
Ray runs of ENS9 those task costs give an estimate of 100 products x ENS9 x 3 members (2,700 banks, 100
calibrations) on W workers: the executor's own order (all banks queued first, a product's calibration
queued when its last bank is written), each worker taking the next queued job, plus the fixed cost of a
Ray run measured here (the Ray run's wall time minus the same simulation of its own jobs on this cluster's
slots). Task costs are those of this machine's CPU (one torch thread per task); a worker with a GPU runs
each task faster by a factor this tool cannot measure without one.

    .venv/bin/python tools/bench_ray.py --data data/synth256 --out runs/bench_ray --repeats 2
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

ENS9_MEMBERS = ("mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1")
LAYERS = ["blocks.2", "blocks.4"]  # strides 8 and 16 on all three (tools/bench_setups.SMALL_BACKBONES)
CONFIGS = {
    "demo": "",  # the defaults
    "ens9x3": "[tiling]\npreset = 'ENS9'\n"
    + "".join(f"\n[[members]]\nbackbone = '{b}'\nlayers = {json.dumps(LAYERS)}\n" for b in ENS9_MEMBERS),
}
PRODUCTS = 100
WORKERS = (1, 8, 64)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def train(config: Path, data: Path, out: Path, ray: bool) -> dict:
    """One `tilecore train` in a fresh process; its wall time and the run's metadata."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "tilecore.cli", "train", str(config), "--data", str(data), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(command + (["--ray", "local"] if ray else []), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    metadata = json.loads((out / "metadata.json").read_text())
    return {"wall_s": round(wall, 2), "task_seconds": metadata["task_seconds"], "execution": metadata["execution"]}


def makespan(banks: list[list[float]], calibrations: list[float], workers: int) -> float:
    """Seconds until the last job ends on `workers` workers: every product's banks queued first (product by
    product), a product's calibration queued when its last bank ends; a free worker takes the oldest job."""
    queued = deque((product, cost, "bank") for product, costs in enumerate(banks) for cost in costs)
    banks_left = [len(costs) for costs in banks]
    running: list[tuple[float, int, int, str]] = []  # a heap of (end, tie-break, product, kind)
    now, idle, started = 0.0, workers, 0
    while queued or running:
        while idle and queued:
            product, cost, kind = queued.popleft()
            heapq.heappush(running, (now + cost, started, product, kind))
            started, idle = started + 1, idle - 1
        now, _, product, kind = heapq.heappop(running)
        idle += 1
        if kind == "bank":
            banks_left[product] -= 1
            if banks_left[product] == 0:
                queued.append((product, calibrations[product], "calibration"))
    return now


def split_tasks(task_seconds: dict[str, float]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per category: its banks' seconds, and its calibration's (labels as train.fit names the jobs)."""
    banks: dict[str, list[float]] = {}
    calibrations: dict[str, float] = {}
    for label, seconds in task_seconds.items():
        category, _, rest = label.partition(" ")
        if rest == "calibration":
            calibrations[category] = seconds
        else:
            banks.setdefault(category, []).append(seconds)
    return banks, calibrations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/synth256"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ray"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "configs": {}}
    for name in args.configs:
        config = args.out / f"{name}.toml"
        config.write_text(CONFIGS[name])
        rounds: dict[str, list[dict]] = {"local": [], "ray": []}
        for r in range(args.repeats):
            for how in ("local", "ray"):
                result = train(config, args.data.resolve(), args.out / f"{name}-{how}-{r}", how == "ray")
                rounds[how].append(result)
                print(f"{name} {how} round {r}: {result['wall_s']:.1f} s", file=sys.stderr, flush=True)
        entry: dict = {}
        for how, runs in rounds.items():
            walls = [x["wall_s"] for x in runs]
            entry[how] = {"wall_s": walls, "median_wall_s": statistics.median(walls)}
        entry["ray_over_local"] = round(entry["ray"]["median_wall_s"] / entry["local"]["median_wall_s"], 3)
        slots = int(
            rounds["ray"][0]["execution"]["cluster_cpus"] // rounds["ray"][0]["execution"]["task_options"]["num_cpus"]
        )
        banks, calibrations = split_tasks(rounds["ray"][0]["task_seconds"])
        categories = sorted(banks)
        simulated_here = makespan([banks[c] for c in categories], [calibrations[c] for c in categories], slots)
        fixed = [x["wall_s"] - simulated_here for x in rounds["ray"]]
        entry["ray_slots"] = slots
        entry["ray_simulated_jobs_s"] = round(simulated_here, 2)
        entry["ray_fixed_s"] = round(statistics.median(fixed), 2)  # start-up, model loads, scheduling, writes
        per_bank = [s for c in categories for s in banks[c]]
        entry["bank_s"] = {"median": statistics.median(per_bank), "count_per_category": len(banks[categories[0]])}
        entry["calibration_s"] = {"median": statistics.median(calibrations.values())}
        if name == "ens9x3":  # the fleet estimate: products drawn in turn from the measured categories
            fleet_banks = [banks[categories[p % len(categories)]] for p in range(PRODUCTS)]
            fleet_calibrations = [calibrations[categories[p % len(categories)]] for p in range(PRODUCTS)]
            entry["fleet"] = {
                "products": PRODUCTS,
                "banks": sum(len(b) for b in fleet_banks),
                "estimate_s": {
                    str(w): round(makespan(fleet_banks, fleet_calibrations, w) + entry["ray_fixed_s"], 1)
                    for w in WORKERS
                },
            }
        report["configs"][name] = entry
        (args.out / "bench_ray.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
