"""Run the planned measurements, each in a worker process, and attach the ratios the report prints."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from tilecore.bench.measure import Job


def run_job(job: Job) -> dict:
    """One measurement in a fresh process: its memory and threads are its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "tilecore.bench.worker"],
        input=json.dumps(job.to_dict()),
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or [f"worker exited with {proc.returncode}"])[-1]
        return {"label": job.label, "backend": job.backend, "precision": job.precision, "error": reason[:300]}
    return json.loads(lines[-1])


def largest_batch(row: dict) -> str | None:
    batches = row.get("throughput", {})
    return max(batches, key=int) if batches else None


def add_ratios(rows: list[dict]) -> None:
    """Throughput at the largest batch relative to the same setup's first backend and to the first setup."""
    ok = [r for r in rows if "error" not in r]
    for row in ok:
        batch = largest_batch(row)
        same_setup = next(r for r in ok if r["label"] == row["label"])
        same_backend = next(r for r in ok if (r["backend"], r["precision"]) == (row["backend"], row["precision"]))
        row["ratios"] = {
            "batch": batch,
            f"vs_{same_setup['backend']}_{same_setup['precision']}": round(
                row["throughput"][batch] / same_setup["throughput"][batch], 2
            ),
            f"vs_{same_backend['label']}": round(row["throughput"][batch] / same_backend["throughput"][batch], 2),
        }


def run_all(jobs: list[Job], on_job: Callable[[Job, dict], None] | None = None) -> list[dict]:
    rows = []
    for job in jobs:
        rows.append(run_job(job))
        if on_job is not None:
            on_job(job, rows[-1])
    add_ratios(rows)
    return rows
