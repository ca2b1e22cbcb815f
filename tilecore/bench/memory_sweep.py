"""Memory vs input resolution: a single model (SM: the whole image is one tile) against a tiled ensemble
(ENS: 256 px tiles, one bank per tile location) at 256, 512, 1024 and 2048 px.

Each (setup, resolution) is trained on a small synthetic grass set, exported, and measured in a worker
process of its own: RSS before loading the bundle, after loading it, and the peak while two images are
scored. The tiled ensemble's promise is that its peak stays near one tile's level as the image grows.
Bundles are kept in `<work>/sweep` and reused by later runs. Needs the train extra (torch, timm).
"""

from __future__ import annotations

from pathlib import Path

from tilecore.bench.measure import Job
from tilecore.bench.protocol import QUICK
from tilecore.bench.run_bench import run_job
from tilecore.runtime.manifest import MANIFEST_FILE, read_manifest

SIZES = (256, 512, 1024, 2048)
TILE = 256
SETUPS = ("SM", "ENS")


def sweep_config(setup: str, size: int, data: Path) -> dict:
    tiling = {} if setup == "SM" else {"tile_size": [min(TILE, size)], "stride": [min(TILE, size)]}
    return {
        "data": {"root": str(data.resolve()), "image_size": size, "categories": ["grass"], "val_fraction": 0.5},
        "tiling": tiling,
        "members": [{"coreset_ratio": 0.01}],
    }


def sweep_bundle(work: Path, setup: str, size: int, progress=None) -> Path:
    """Train and export one sweep setup unless its bundle is already there."""
    bundle = work / "sweep" / f"{setup}_{size}"
    if (bundle / MANIFEST_FILE).is_file():
        return bundle
    from tilecore.export.bundle import export_run
    from tilecore.train.config import config_from_dict
    from tilecore.train.fit import train_run
    from tilecore.train.synth import build_synth_dataset

    data = work / "sweep" / f"data{size}"
    if not (data / "dataset.json").is_file():
        build_synth_dataset(data, size, n_train=4, n_test_good=2, n_test_defect=0, categories=("grass",))
    run = work / "sweep" / f"run_{setup}_{size}"
    train_run(config_from_dict(sweep_config(setup, size, data)), run, progress)
    export_run(run, bundle)
    return bundle


def memory_sweep(work: Path, sizes: tuple[int, ...] = SIZES, threads: int = 0, on_row=None, progress=None) -> list:
    rows = []
    for size in sizes:
        for setup in SETUPS:
            bundle = sweep_bundle(work, setup, size, progress)
            images = sorted(str(p) for p in (work / "sweep" / f"data{size}" / "grass" / "test" / "good").glob("*.png"))
            job = Job(str(bundle), "cpu", "fp32", images, QUICK, threads, f"{setup}_{size}", memory_only=True)
            tiles = len(read_manifest(bundle, verify=False).members[0].banks)
            rows.append({"setup": setup, "size": size, "tiles": tiles, **run_job(job)})
            if on_row is not None:
                on_row(rows[-1])
    return rows
