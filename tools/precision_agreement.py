"""What a reduced-precision engine changes on a test set: image AUROC per precision and label agreement with fp32.

For each bundle (exported with `tilecore export ... --precision int8,bf16`), scores the category's test
images with fp32 (ONNX Runtime, the reference, and OpenVINO), int8 (ONNX Runtime and OpenVINO) and bf16
(OpenVINO where the CPU has bf16 instructions; "openvino-simulated": OpenVINO's bf16 simulated on an
AVX-512 CPU without them, its numerics but not its speed; "emulated": every tensor rounded to bf16 on
ONNX Runtime, export.bf16_emulation), kNN in fp32 in every case, and compares each with fp32: image
AUROC, label agreement at the stored threshold, and the largest and median score difference.
`near_threshold` counts the test images whose fp32 score lies within that median difference of the
threshold: the labels a precision of that accuracy is likely to flip, which bounds the agreement it can
reach on this test set. `--recheck M` (or auto) adds int8 and bf16 paths that score again in fp32 every
image within M of the threshold (a cascade), counting how many it rechecked; each path's images/s is
timed over the test set in batches of 16.

    .venv/bin/python tools/precision_agreement.py bundles/prec/* --data data/synth256 --out runs/precision.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

PATHS = (
    ("cpu", "fp32"),
    ("openvino", "fp32"),
    ("cpu", "int8"),
    ("openvino", "int8"),
    ("openvino", "bf16"),
    ("openvino-simulated", "bf16"),
    ("emulated", "bf16"),
)
CASCADES = (("cpu", "int8"), ("openvino", "int8"), ("openvino", "bf16"), ("openvino-simulated", "bf16"))
BATCH = 16  # images per predict_batch call when timing a path


def timed_scores(predictor, images: list) -> tuple[np.ndarray, int, float]:
    """(scores, images rechecked in fp32, images/s over the test set in batches of BATCH after a warm-up)."""
    predictor.predict_batch(images[:2])
    start = time.perf_counter()
    results = [r for i in range(0, len(images), BATCH) for r in predictor.predict_batch(images[i : i + BATCH])]
    seconds = time.perf_counter() - start
    return np.array([r.score for r in results]), sum(r.rechecked for r in results), len(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=Path("data/synth256"))
    parser.add_argument("--out", type=Path, default=Path("runs/precision.json"))
    parser.add_argument(
        "--recheck", help="also measure int8 and bf16 with this fp32 recheck margin (cascades), or auto"
    )
    args = parser.parse_args()
    routes = PATHS + tuple((*path, args.recheck) for path in CASCADES if args.recheck)

    from sklearn.metrics import roc_auc_score

    from tilecore.export.bf16_emulation import EMULATED
    from tilecore.export.reduced_precision import SIMULATED, bf16_engines, score_difference
    from tilecore.runtime.errors import TilecoreError
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.manifest import read_manifest
    from tilecore.runtime.predictor import Predictor

    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="tilecore-bf16-emulated-"))  # emulated graphs, outside the bundles
    for bundle in args.bundles:
        manifest = read_manifest(bundle)
        paths = sorted((args.data / manifest.category / "test").glob("*/*.png"))
        truth = np.array([p.parent.name != "good" for p in paths])
        images = [read_rgb(p) for p in paths]
        scores, rechecked, speed, rechecked_margin = {}, {}, {}, {}
        for device, precision, *recheck in routes:
            margin = recheck[0] if recheck else None
            try:
                engines = bf16_engines(bundle, device, scratch, threads=2) if device in (SIMULATED, EMULATED) else None
                predictor = Predictor(
                    bundle,
                    device="cpu" if engines else device,
                    threads=2,
                    precision=precision,
                    recheck=margin,
                    engines=engines,
                )
            except TilecoreError as exc:
                print(f"{bundle.name} {device} {precision}: not measured ({exc})")
                continue
            key = (device, precision, *recheck)
            scores[key], rechecked[key], speed[key] = timed_scores(predictor, images)
            rechecked_margin[key] = predictor.recheck
        threshold = manifest.thresholds.image
        reference = scores[("cpu", "fp32")]
        for key, s in scores.items():
            device, precision, *recheck = key
            diff = np.abs(s - reference)
            flipped = score_difference(reference, s, threshold)["flipped_labels"]  # the exporter's own count
            row = {
                "category": manifest.category,
                "device": device,
                "precision": precision,
                "recheck": recheck[0] if recheck else None,
                "recheck_margin": rechecked_margin.get(key),
                "rechecked_fp32": rechecked[key],
                "images_per_second": round(speed[key], 2),
                "images": len(paths),
                "image_auroc": round(float(roc_auc_score(truth, s)), 4),
                "auroc_minus_fp32": round(float(roc_auc_score(truth, s) - roc_auc_score(truth, reference)), 4),
                "label_agreement": round((len(s) - flipped) / len(s), 4),
                "flipped_labels": flipped,
                "max_score_diff": round(float(diff.max()), 4),
                "median_score_diff": round(float(np.median(diff)), 4),
                "near_threshold": int(np.sum(np.abs(reference - threshold) < np.median(diff))),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    shutil.rmtree(scratch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
