"""The tiny trained run most tests start from: a random-init resnet18 at 64 px over a small synthetic set.

Each (category, tiling) is trained once per test session and copied to every later caller, with the dataset
paths the run records pointed at the caller's copy of the dataset (training is seeded: a copy holds the bytes
a fresh run would)."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tilecore.train.model import Embedder

TILES_2X2 = {"tile_size": [32], "stride": [32]}


# (category, tiling) -> the session's trained copy (a folder holding data/ and run/)
_TRAINED: dict[tuple[str, str], Path] = {}
# dataset folders tiny_run copied from a trained one -> their category
_COPIED_DATA: dict[Path, str] = {}
# the run files that name dataset images by absolute path
_PATH_FILES = ("config.json", "*/split.json", "*/kept.json")


def tiny_run(root: Path, category: str = "gravel", tiling: dict | None = None, name: str = "run") -> Path:
    """Train `root/<name>` (2 x 2 tiles of 32 px unless `tiling` says otherwise) on `root/data`, made once."""
    data, out = (root / "data").absolute(), root / name
    key = (category, json.dumps(tiling, sort_keys=True))
    reusable = not (data / "dataset.json").is_file() or _COPIED_DATA.get(data) == category
    if not reusable or out.exists():
        return _train_tiny_run(root, category, tiling, name)  # a dataset of the caller's own, or a resumed run
    if key not in _TRAINED:
        trained = Path(tempfile.mkdtemp(prefix="tilecore-tiny-"))
        atexit.register(shutil.rmtree, trained, True)
        _train_tiny_run(trained, category, tiling, "run")
        _TRAINED[key] = trained
    trained = _TRAINED[key]
    if not (data / "dataset.json").is_file():
        shutil.copytree(trained / "data", data)
        _COPIED_DATA[data] = category
    shutil.copytree(trained / "run", out)
    before, after = (json.dumps(str(trained / "data"))[1:-1], json.dumps(str(data))[1:-1])
    for pattern in _PATH_FILES:
        for path in out.glob(pattern):
            path.write_text(path.read_text().replace(before, after))
    return out


def _train_tiny_run(root: Path, category: str, tiling: dict | None, name: str) -> Path:
    from tilecore.train.config import config_from_dict
    from tilecore.train.fit import train_run
    from tilecore.train.synth import build_synth_dataset

    if not (root / "data" / "dataset.json").is_file():
        build_synth_dataset(root / "data", 256, n_train=8, n_test_good=2, n_test_defect=3, categories=(category,))
    member = {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False}
    config = config_from_dict(
        {
            "data": {"root": str(root / "data"), "image_size": 64, "val_fraction": 0.25},
            "members": [{**member, "pretrain_embed_dimension": 32, "target_embed_dimension": 16}],
            "tiling": TILES_2X2 if tiling is None else tiling,
        }
    )
    train_run(config, root / name)
    return root / name


def tiny_graph(run: Path, folder: Path, name: str = "backbone_0123456789abcdef.onnx") -> tuple[Path, Embedder]:
    """The run's first member as an ONNX graph in `folder`; returns (graph path, its Embedder)."""
    from tilecore.export.onnx_graph import export_embedder
    from tilecore.train.model import load_embedder
    from tilecore.train.run_dir import load_run_config

    embedder = load_embedder(load_run_config(run), run, 0)
    export_embedder(embedder.net, embedder.input_hw, folder / name)
    return folder / name, embedder
