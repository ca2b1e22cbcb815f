"""What a reduced-precision engine changes on a test set: image AUROC per precision and label agreement with fp32.

For each bundle (exported with `tilecore export ... --precision int8,bf16`), scores the category's test
images with fp32 (ONNX Runtime), int8 (ONNX Runtime and OpenVINO) and bf16 (OpenVINO), kNN in fp32 in
every case, and compares each with fp32: image AUROC, label agreement at the stored threshold, and the
largest and median score difference. `near_threshold` counts the test images whose fp32 score lies
within that median difference of the threshold: the labels a precision of that accuracy is likely to
flip, which bounds the agreement it can reach on this test set.

    .venv/bin/python tools/precision_agreement.py bundles/prec/* --data data/synth256 --out runs/precision.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PATHS = (("cpu", "fp32"), ("cpu", "int8"), ("openvino", "int8"), ("openvino", "bf16"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/synth256"))
    parser.add_argument("--out", type=Path, default=Path("runs/precision.json"))
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from tilecore.runtime.errors import TilecoreError
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.predictor import Predictor

    rows = []
    for bundle in args.bundles:
        manifest = json.loads((bundle / "manifest.json").read_text())
        paths = sorted((args.data / manifest["category"] / "test").glob("*/*.png"))
        truth = np.array([p.parent.name != "good" for p in paths])
        images = [read_rgb(p) for p in paths]
        scores = {}
        for device, precision in PATHS:
            try:
                predictor = Predictor(bundle, device=device, threads=2, precision=precision)
            except TilecoreError as exc:
                print(f"{bundle.name} {device} {precision}: not measured ({exc})")
                continue
            scores[(device, precision)] = np.array([r.score for r in predictor.predict_batch(images)])
        threshold = manifest["thresholds"]["image"]
        reference = scores[("cpu", "fp32")]
        for (device, precision), s in scores.items():
            diff = np.abs(s - reference)
            row = {
                "category": manifest["category"],
                "device": device,
                "precision": precision,
                "images": len(paths),
                "image_auroc": round(float(roc_auc_score(truth, s)), 4),
                "auroc_minus_fp32": round(float(roc_auc_score(truth, s) - roc_auc_score(truth, reference)), 4),
                "label_agreement": round(float(np.mean((s >= threshold) == (reference >= threshold))), 4),
                "flipped_labels": int(np.sum((s >= threshold) != (reference >= threshold))),
                "max_score_diff": round(float(diff.max()), 4),
                "median_score_diff": round(float(np.median(diff)), 4),
                "near_threshold": int(np.sum(np.abs(reference - threshold) < np.median(diff))),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
