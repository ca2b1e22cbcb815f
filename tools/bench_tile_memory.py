"""Peak training RSS of tiled ensembles vs input resolution: does memory stay at one tile's level?

Trains one category with a fixed tile (256 px, stride 128: more tiles as the image grows) and with the
ENS9 preset (3 x 3 tiles of half the image: the tile grows with the image), at 512 and 1024 px, and an
untiled single model for contrast. Each run is its own process, so each peak RSS is its own.

    .venv/bin/python tools/bench_tile_memory.py --out runs/bench_tile_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [  # name, image size, tiling table
    ("fixed tile 256/128", 512, {"tile_size": [256], "stride": [128]}),
    ("fixed tile 256/128", 1024, {"tile_size": [256], "stride": [128]}),
    ("ENS9 preset", 512, {"preset": "ENS9"}),
    ("ENS9 preset", 1024, {"preset": "ENS9"}),
    ("SM (untiled)", 512, {}),
    ("SM (untiled)", 1024, {}),
]


def worker(config_path: str, run_dir: str) -> dict:
    from tilecore.train.config import load_config
    from tilecore.train.fit import train_run
    from tilecore.train.run_dir import peak_rss_mb

    metadata = train_run(load_config(config_path), Path(run_dir))
    (stats,) = metadata["categories"].values()
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "fit_seconds": stats["fit_seconds"], "banks": stats["banks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="grass")
    parser.add_argument("--out", default="runs/bench_tile_memory.json")
    parser.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))), help="indexes into CASES")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from tilecore.train.synth import build_synth_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for size in (512, 1024):
            data = Path(f"data/synth{size}")
            if not (data / "dataset.json").is_file():
                build_synth_dataset(data, size)
        for i in args.cases:
            name, size, tiling = CASES[i]
            lines = [
                f'[data]\nroot = "{Path(f"data/synth{size}").resolve()}"\nimage_size = {size}',
                f'categories = ["{args.category}"]',
                "[tiling]",
                *(f"{k} = {json.dumps(v)}" for k, v in tiling.items()),
                "[[members]]\ncoreset_ratio = 0.01",
            ]
            (tmp / f"{i}.toml").write_text("\n".join(lines) + "\n")
            command = [sys.executable, __file__, "--worker", str(tmp / f"{i}.toml"), str(tmp / f"run{i}")]
            proc = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append({"setup": name, "image_size": size, **json.loads(proc.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
