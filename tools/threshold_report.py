"""Precision, recall and F1 at the default (calibrated) image threshold, per category, for one threshold rule.

Trains the built-in default config on a dataset with `fusion.threshold = RULE`, evaluates the test split
(`tilecore eval`), and prints JSON: per category the rule the run recorded, the threshold, and precision /
recall / F1 of "anomalous when score >= threshold". Comparing rules on one dataset:

    .venv/bin/tilecore data synth --out /tmp/h4/synth256 --size 256
    .venv/bin/python tools/threshold_report.py --data /tmp/h4/synth256 --rule quantile --out /tmp/h4/runs/quantile
    .venv/bin/python tools/threshold_report.py --data /tmp/h4/synth256 --rule auto --out /tmp/h4/runs/auto

`quantile` is the rule the default ("auto") applied to normals-only validation splits before synthetic
anomalies; `auto` now paints them (runtime.calibration.calibrate_threshold). The test split is used only
here, to measure; calibration never sees it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tilecore.runtime.calibration import THRESHOLD_RULES
from tilecore.runtime.errors import TilecoreError


def threshold_report(data: Path, out: Path, rule: str) -> dict:
    """Train (or resume) the default config with threshold rule `rule` into `out`, evaluate, and report."""
    from tilecore.train.config import load_config, validate
    from tilecore.train.evaluate import evaluate_run
    from tilecore.train.fit import train_run

    config = load_config(None)
    config.data.root = str(data.resolve())
    config.fusion.threshold = rule
    validate(config)
    metadata = train_run(config, out)
    metrics = evaluate_run(out)
    report: dict = {"rule": rule, "data": str(data), "run": str(out), "categories": {}}
    for name, values in metrics["categories"].items():
        stats = metadata["categories"][name]
        report["categories"][name] = {
            "threshold_rule": stats.get("threshold_rule"),
            "threshold": round(stats["threshold"], 4),
            "validation_images": stats["validation_images"],
            "precision": round(values["threshold_precision"], 4),
            "recall": round(values["threshold_recall"], 4),
            "f1": round(values["threshold_f1"], 4),
            "image_auroc": round(values["image_auroc"], 4),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset root")
    parser.add_argument("--out", type=Path, required=True, help="run directory to train into")
    parser.add_argument("--rule", choices=THRESHOLD_RULES, default="auto", help="fusion.threshold")
    args = parser.parse_args()
    try:
        report = threshold_report(args.data, args.out, args.rule)
    except TilecoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
