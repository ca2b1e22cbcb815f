"""A non-square run (data.image_size = [h, w]) trains, evaluates, exports and runs with the scores of its
PyTorch model. The data is 12-bit mono in 16-bit PNGs (data.bit_depth = 12), in the plain layout, so the
same run also checks that the bit-depth rule travels from training to the bundle and the runtime's reader."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.train.test_run_checks import MEMBER  # the tiny random-init resnet18 member
from tilecore.export.bundle import export_run
from tilecore.runtime.manifest import read_manifest
from tilecore.runtime.predictor import Predictor
from tilecore.runtime.sources import stream
from tilecore.train.config import config_from_dict
from tilecore.train.evaluate import evaluate_run
from tilecore.train.fit import train_run

SETUPS = {
    "untiled 48x96": ([48, 96], {}, (1, 1)),
    "ST4 64x112, last column padded": ([64, 112], {"preset": "ST4"}, (2, 4)),  # tiles 32: 112 = 3.5 tiles
}


def write_12_bit(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels.astype(np.uint16))  # mono, values 0..4095 in a 16-bit PNG


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One category in the plain layout: <root>/good, <root>/bad, <root>/masks (files 60 x 120, resized)."""
    root = tmp_path_factory.mktemp("non_square") / "widgets"
    rng = np.random.default_rng(0)
    for i in range(12):
        write_12_bit(root / "good" / f"{i:02d}.png", rng.integers(1500, 2600, (60, 120)))
    for i in range(3):
        pixels = rng.integers(1500, 2600, (60, 120))
        mask = np.zeros((60, 120), np.uint8)
        mask[10 + 10 * i : 30 + 10 * i, 20 + 25 * i : 45 + 25 * i] = 255
        pixels[mask > 0] = 4095
        write_12_bit(root / "bad" / f"b{i}.png", pixels)
        (root / "masks").mkdir(exist_ok=True)
        assert cv2.imwrite(str(root / "masks" / f"b{i}.png"), mask)
    return root


@pytest.mark.parametrize("setup", list(SETUPS))
def test_non_square_run_matches_its_bundle(dataset: Path, tmp_path: Path, setup: str) -> None:
    image_size, tiling, grid = SETUPS[setup]
    data = {"root": str(dataset), "image_size": image_size, "val_fraction": 0.25, "bit_depth": 12}
    config = config_from_dict({"data": data, "members": [MEMBER], "tiling": tiling})
    assert config.data.format == "auto"
    run = tmp_path / "run"
    train_run(config, run)
    evaluate_run(run)
    pytorch = json.loads((run / "widgets" / "test_scores.json").read_text())
    assert {entry["label"] for entry in pytorch} == {0, 1}

    bundle = tmp_path / "bundle"
    manifest = export_run(run, bundle)
    assert manifest.image_size == tuple(image_size)
    assert manifest.tiling.grid == grid
    if tiling:  # a preset's tiles stay square (side = its fraction of the shorter side); untiled: the whole image
        assert manifest.tiling.tile == (32, 32)
    assert read_manifest(bundle).members[0].preprocess.bit_depth == 12

    listing = tmp_path / "test.txt"
    listing.write_text("".join(f"{entry['image']}\n" for entry in pytorch))
    items = list(stream(str(listing), bit_depth=read_manifest(bundle).members[0].preprocess.bit_depth))
    assert [item.error for item in items] == [None] * len(pytorch)
    results = Predictor(bundle, device="cpu").predict_batch([item.image for item in items])
    assert results[0].anomaly_map.shape == tuple(image_size)
    torch_scores = np.array([entry["score"] for entry in pytorch])
    runtime_scores = np.array([r.score for r in results])
    spread = torch_scores.max() - torch_scores.min()
    assert spread > 0
    assert np.abs(runtime_scores - torch_scores).max() <= 1e-4 * spread


@pytest.mark.parametrize(
    ("image_size", "tiling", "tile", "stride", "grid"),
    [
        (256, {"preset": "ST9"}, (128, 128), (64, 64), (3, 3)),  # an integer is square, as before
        ([256, 512], {"preset": "ST9"}, (128, 128), (64, 64), (3, 7)),  # S = 256, the shorter side
        ([512, 256], {"preset": "ENS4"}, (128, 128), (128, 128), (4, 2)),
        ([300, 200], {"preset": "ENS4"}, (100, 100), (100, 100), (3, 2)),
        ([48, 96], {}, (48, 96), (48, 96), (1, 1)),  # untiled: the whole image is one tile
    ],
)
def test_presets_scale_with_the_shorter_side(image_size, tiling: dict, tile, stride, grid) -> None:
    from tilecore.train.model import grid_for

    config = config_from_dict({"data": {"image_size": image_size}, "tiling": tiling})
    tile_grid, _, _ = grid_for(config)
    assert (tile_grid.tile_h, tile_grid.tile_w) == tile and (tile_grid.stride_h, tile_grid.stride_w) == stride
    assert (tile_grid.rows, tile_grid.cols) == grid


@pytest.mark.parametrize(
    ("image_size", "message"),
    [
        ([48], r"data.image_size: got list \[48\], expected integer >= 32 or \[height, width\]"),
        ([48, 96, 3], r"data.image_size: got list \[48, 96, 3\], expected"),
        ("big", r"data.image_size: got string 'big', expected"),
        ([48.0, 96], r"data.image_size: got list \[48.0, 96\], expected"),
        ([16, 96], r"data.image_size = \[16, 96\]; expected an integer >= 32 or \[height, width\] >= 32"),
    ],
)
def test_bad_image_sizes_are_refused_in_one_line(image_size, message: str) -> None:
    from tilecore.runtime.errors import TilecoreError

    with pytest.raises(TilecoreError, match=message):
        config_from_dict({"data": {"image_size": image_size}})
