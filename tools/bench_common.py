"""Helpers the benchmark tools share (tools/bench_cascade.py, tools/bench_spatial.py, tools/bench_setups.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NORMAL_SHARE = 0.95  # of a production-like stream


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_toml(raw: dict) -> str:
    lines = []
    for section, values in raw.items():
        for table in values if isinstance(values, list) else [values]:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def stream_normals_needed(defects: int, test_good: int) -> int:
    """Held-out normals to add to `test_good` good images so that normals are NORMAL_SHARE of the stream."""
    normals = round(defects * NORMAL_SHARE / (1 - NORMAL_SHARE))
    return max(0, normals - test_good)


def run_worker(command: list[str], what: str) -> dict:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def tilecore_cli() -> list[str]:
    script = Path(sys.executable).parent / "tilecore"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tilecore.cli"]


def mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def line_calibrated(bundle: Path, line: Path, category: str, target_fpr: float) -> Path:
    """`tilecore calibrate` of `bundle` into BUNDLE-line on the line's good images (LINE/CATEGORY/test/good,
    a synth set of another seed than the streams' held-out normals): the threshold flagging at most
    `target_fpr` of them, the cascade windows and tile gate refit there."""
    out = bundle.with_name(f"{bundle.name}-line")
    shutil.rmtree(out, ignore_errors=True)
    good = str(line / category / "test" / "good" / "*.png")
    command = [*tilecore_cli(), "calibrate", str(bundle), good, "--target-fpr", str(target_fpr), "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"calibrate {bundle} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out
