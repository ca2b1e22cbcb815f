"""The images a run keeps for export, so that `tilecore export` needs only the run directory.

At train time each category keeps, as PNG at the working image size, its readable held-out validation
images (what export scores to check reduced precisions, and embeds to measure an index's recall) and an
evenly spaced subset of its training images (what int8 calibration cuts tiles from). They are resized
exactly as the runtime resizes (runtime.preprocess.resize_rgb) and PNG is lossless, so the runtime's
preprocessing gives the very tensors the dataset's own files give: resizing an image that already has
the working size is the identity.

    <run>/<category>/kept/validation/0000.png ...
    <run>/<category>/kept/calibration/0000.png ...
    <run>/<category>/kept.json     names of both lists and the dataset files they came from; written last
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb, write_png
from tilecore.runtime.preprocess import resize_rgb
from tilecore.train.run_dir import KEPT_DIR, KEPT_FILE, SPLIT_FILE, read_json

VALIDATION = "validation"
CALIBRATION = "calibration"
# Training tiles the int8 calibrators take by default (export.reduced_precision.CALIBRATION_TILES and
# TensorRT's --calibration-tiles): the subset kept holds every image they pick, so calibration is unchanged.
CALIBRATION_TILES = 128


def calibration_picks(count: int, tile_locations: int, limit: int = CALIBRATION_TILES) -> list[int]:
    """Indices of the training images int8 calibration takes `limit` tiles from (export.quantize's rule)."""
    wanted = min(count, math.ceil(limit / tile_locations))
    return np.linspace(0, count - 1, wanted).round().astype(int).tolist() if count else []


def keep_images(
    run_dir: Path,
    category: str,
    validation: list[Path],
    train: list[Path],
    image_size: tuple[int, int],
    tile_locations: int,
    bit_depth: str | int = "auto",
) -> None:
    """Write the category's kept images: every one of `validation`, the calibration picks of `train` (both
    readable images, in split order), at `image_size` (height, width), read with the run's `bit_depth`
    (so they are the 8-bit images training saw). A record that lists the same sources at the same size and
    depth is kept as it is (a resumed run)."""
    folder = run_dir / category
    height, width = image_size
    sources = {
        VALIDATION: [str(p) for p in validation],
        CALIBRATION: [str(train[i]) for i in calibration_picks(len(train), tile_locations)],
    }
    record_path = folder / KEPT_FILE
    if record_path.is_file():
        record = read_json(record_path)
        names = [folder / n for kind in (VALIDATION, CALIBRATION) for n in record.get(kind, [])]
        same = (
            record.get("sources") == sources
            and record.get("image_size") == [height, width]
            and record.get("bit_depth", "auto") == bit_depth
        )
        if same and all(path.is_file() for path in names):
            return
        record_path.unlink()  # the kept images change: the record goes first, so it never lists a half set
    record: dict = {"image_size": [height, width], "bit_depth": bit_depth, "sources": sources}
    for kind, paths in sources.items():
        record[kind] = []
        for j, path in enumerate(paths):
            name = f"{KEPT_DIR}/{kind}/{j:04d}.png"
            resized = resize_rgb(read_rgb(path, bit_depth=bit_depth), height, width)  # [H, W, 3] uint8
            write_png(folder / name, resized)
            record[kind].append(name)
    atomic_write_json(record_path, record)


def kept_images(run_dir: Path, category: str, kind: str) -> list[str]:
    """Paths of the images the run keeps for export (`kind` VALIDATION or CALIBRATION). A run trained
    before runs kept them falls back to the dataset files its split lists (all training images for
    calibration), which must then still exist."""
    folder = run_dir / category
    if (folder / KEPT_FILE).is_file():
        paths = [str(folder / name) for name in read_json(folder / KEPT_FILE)[kind]]
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise TilecoreError(
                f"run {run_dir}: kept image {missing[0]} is missing ({len(missing)} of {len(paths)} {kind} "
                f"images); re-run `tilecore train` on this run to write them again"
            )
        return paths
    split = read_json(folder / SPLIT_FILE)
    paths = split[VALIDATION if kind == VALIDATION else "train"]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise TilecoreError(
            f"run {run_dir}: {category} keeps no {kind} images (trained before runs kept them) and its dataset "
            f"image {missing[0]} is gone ({len(missing)} of {len(paths)}); restore the dataset or retrain the run"
        )
    return paths
