"""The tiny trained run most tests start from: a random-init resnet18 at 64 px over a small synthetic set."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tilecore.train.model import Embedder

TILES_2X2 = {"tile_size": [32], "stride": [32]}


def tiny_run(root: Path, category: str = "gravel", tiling: dict | None = None, name: str = "run") -> Path:
    """Train `root/<name>` (2 x 2 tiles of 32 px unless `tiling` says otherwise) on `root/data`, made once."""
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
