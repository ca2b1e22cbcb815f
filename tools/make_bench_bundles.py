"""Train and export the paper's setups on one category of the 512 px synthetic set, as bundles for `tilecore bench`.

    .venv/bin/python tools/make_bench_bundles.py --out bundles/bench            # SM256 SM512 ENS4 ENS9, lite0
    .venv/bin/tilecore bench bundles/bench/{SM256,SM512,ENS4,ENS9} --threads 2 --out bench/setups

Backbone tf_efficientnet_lite0 (real ImageNet weights, offline), coreset 1%, the `grass` category. `SM` is an
untiled single model at full resolution; `--precision int8 bf16` adds reduced-precision engines.

    .venv/bin/python tools/make_bench_bundles.py --setups SM --size 256 --data data/synth256 --backbone resnet18 \
        --layers layer2 layer3 --no-pretrained --precision int8 bf16 --precision-floor 0 --out bundles/r18
Runs are kept in <out>/runs; a bundle that already exists is left as it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SETUPS = ("SM256", "SM512", "ENS4", "ENS9")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synth512")
    parser.add_argument("--category", default="grass")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", nargs="+", default=None, help="feature layers; default: the backbone's")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--precision", nargs="*", default=[], help="reduced-precision engines to add: int8 bf16")
    parser.add_argument("--precision-floor", dest="floor", type=float, default=0.99, help="least label agreement")
    parser.add_argument("--out", default="bundles/bench")
    args = parser.parse_args()

    from tilecore.export.bundle import export_run
    from tilecore.runtime.manifest import MANIFEST_FILE
    from tilecore.train.config import config_from_dict
    from tilecore.train.fit import train_run
    from tilecore.train.synth import build_synth_dataset

    data, out = Path(args.data), Path(args.out)
    if not (data / "dataset.json").is_file():
        build_synth_dataset(data, args.size)
    member = {"backbone": args.backbone, "coreset_ratio": 0.01, "pretrained": args.pretrained}
    if args.layers:
        member["layers"] = args.layers
    for setup in args.setups:
        if (out / setup / MANIFEST_FILE).is_file():
            print(f"{out / setup}: exists, kept")
            continue
        tiling = {"preset": setup} if setup in SETUPS or setup in ("ST4", "ST9") else {}
        config = config_from_dict(
            {
                "data": {"root": str(data.resolve()), "image_size": args.size, "categories": [args.category]},
                "tiling": tiling,
                "members": [member],
            }
        )
        train_run(config, out / "runs" / setup)
        export_run(out / "runs" / setup, out / setup, precisions=tuple(args.precision), precision_floor=args.floor)
        print(f"{out / setup}: written")


if __name__ == "__main__":
    main()
