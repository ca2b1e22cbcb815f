"""Building, saving and loading a run's embedder: backbone + PatchCore head, plus its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tilecore.runtime.artifacts import atomic_write
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.preprocess import Preprocess, preprocess_batch
from tilecore.train.backbones import create_feature_extractor, default_mean_std, feature_channels
from tilecore.train.config import Config
from tilecore.train.patchcore import PatchEmbedder
from tilecore.train.weights import resolve_weights

EMBEDDER_FILE = "embedder.safetensors"


@dataclass
class Embedder:
    net: PatchEmbedder
    preprocess: Preprocess

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images [H, W, 3] -> patch embeddings [B, h, w, D] float32."""
        batch = torch.from_numpy(preprocess_batch(images, self.preprocess))  # [B, 3, S, S]
        return self.net(batch).numpy()


def preprocess_for(config: Config) -> Preprocess:
    mean, std = default_mean_std(config.model.backbone)
    size = config.data.image_size
    return Preprocess(size, size, tuple(config.model.mean or mean), tuple(config.model.std or std))


def build_net(config: Config, state_dict: dict[str, torch.Tensor] | None) -> PatchEmbedder:
    m = config.model
    features = create_feature_extractor(m.backbone, m.layers, state_dict)
    return PatchEmbedder(
        features, feature_channels(features), m.patch_size, m.pretrain_embed_dimension, m.target_embed_dimension
    ).eval()


def create_embedder(config: Config) -> tuple[Embedder, str]:
    """A fresh embedder with weights resolved from the config; returns it and the weights' source."""
    resolved = resolve_weights(config.model.backbone, config.model.weights, config.model.pretrained)
    if resolved.state_dict is None:
        torch.manual_seed(config.train.seed)  # random init is reproducible from the seed
    return Embedder(build_net(config, resolved.state_dict), preprocess_for(config)), resolved.source


def save_embedder(embedder: Embedder, run_dir: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in embedder.net.state_dict().items()}
    atomic_write(run_dir / EMBEDDER_FILE, lambda tmp: save_file(state, str(tmp)))


def load_embedder(config: Config, run_dir: Path) -> Embedder:
    """The exact embedder a run trained with (its weights file, never a fresh download)."""
    from safetensors.torch import load_file

    path = run_dir / EMBEDDER_FILE
    if not path.is_file():
        raise TilecoreError(f"run {run_dir}: {EMBEDDER_FILE} missing; run `tilecore train` first")
    net = build_net(config, None)
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001
        raise TilecoreError(f"run {run_dir}: {EMBEDDER_FILE} does not match the run's config ({exc})") from None
    return Embedder(net.eval(), preprocess_for(config))
