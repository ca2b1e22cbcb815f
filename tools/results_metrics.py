"""Image-level metrics computed from the runtime's own outputs (results.jsonl of `tilecore run`).

The label of each input comes from its folder in the MVTec layout: test/good is normal, any other
test/<defect> folder is anomalous. The runtime's label is its calibrated threshold decision.

    .venv/bin/python tools/results_metrics.py predictions/*/results.jsonl --out predictions/metrics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def metrics(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    scored = [r for r in records if "score" in r]
    truth = np.array([Path(r["input"]).parent.name != "good" for r in scored])
    scores = np.array([r["score"] for r in scored])
    predicted = np.array([r["label"] == "anomalous" for r in scored])
    tp = int(np.sum(predicted & truth))
    return {
        "images": len(scored),
        "failed": len(records) - len(scored),
        "image_auroc": float(roc_auc_score(truth, scores)) if 0 < truth.sum() < len(truth) else None,
        "threshold_precision": tp / max(int(predicted.sum()), 1),
        "threshold_recall": tp / max(int(truth.sum()), 1),
        "median_ms_per_image": float(np.median([r["timings_ms"]["total"] for r in scored])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = {str(path.parent.name): metrics(path) for path in args.results}
    for name, values in report.items():
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        print(f"{name}: {shown}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
