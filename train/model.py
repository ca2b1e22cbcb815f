"""A member's embedder (backbone + PatchCore head + preprocessing + tiling), built, saved and loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tilecore.runtime.artifacts import atomic_write
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.preprocess import Preprocess, normalise_rgb, tiles_at
from tilecore.runtime.tiling import TileGrid, tile_grid
from tilecore.train.backbones import create_feature_extractor, default_mean_std, feature_channels
from tilecore.train.config import Config, MemberConfig, image_hw, tiling_geometry
from tilecore.train.patchcore import PatchEmbedder
from tilecore.train.run_dir import MEMBERS_DIR
from tilecore.train.weights import resolve_weights


@dataclass
class Embedder:
    net: PatchEmbedder
    preprocess: Preprocess  # RGB -> normalised image at the working resolution
    grid: TileGrid
    input_hw: tuple[int, int]  # each tile is resized to this before the backbone
    pixels_per_pass: int = 4 * 256 * 256  # backbone batch budget; CPUs slow down sharply past a few tiles
    device: torch.device = torch.device("cpu")  # where the net runs (place); embeddings come back as NumPy

    def normalise(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 images -> normalised images [3, H, W] at the working resolution."""
        return [normalise_rgb(image, self.preprocess) for image in images]

    @torch.inference_mode()
    def embed_normalised(self, normalised: list[np.ndarray], locations: list[int]) -> np.ndarray:
        """Normalised images -> patch embeddings [B, T', h, w, D] float32 at the chosen tile locations."""
        batch = np.stack([tiles_at(image, self.grid, locations, self.input_hw) for image in normalised])
        b, t = batch.shape[:2]  # [B, T', 3, in_h, in_w]
        flat = torch.from_numpy(batch.reshape(b * t, *batch.shape[2:]))  # [B*T', 3, in_h, in_w]
        # on the CPU .to, .float and .cpu return their input: the same tensors as without a device
        passes = [self.net(chunk.to(self.device)).float().cpu() for chunk in flat.split(self.tiles_per_pass)]
        embeddings = torch.cat(passes)  # [B*T', h, w, D] float32
        return embeddings.numpy().reshape(b, t, *embeddings.shape[1:])

    def place(self, device: torch.device, autocast: torch.dtype | None = None) -> Embedder:
        """Run the net on `device`, its backbone under autocast to `autocast` (None: float32); returns self."""
        self.net.to(device)
        self.net.autocast = autocast
        self.device = device
        return self

    def embed(self, images: list[np.ndarray], locations: list[int] | None = None) -> np.ndarray:
        """RGB uint8 images -> patch embeddings [B, T', h, w, D] (all tile locations by default)."""
        chosen = list(range(self.grid.count)) if locations is None else locations
        return self.embed_normalised(self.normalise(images), chosen)

    @property
    def tiles_per_pass(self) -> int:
        return max(1, self.pixels_per_pass // (self.input_hw[0] * self.input_hw[1]))


def grid_for(config: Config) -> tuple[TileGrid, tuple[int, int], bool]:
    tile, stride, model_input, stacked = tiling_geometry(config)
    return tile_grid(image_hw(config), tile, stride), model_input, stacked


def preprocess_for(config: Config, member: MemberConfig) -> Preprocess:
    mean, std = default_mean_std(member.backbone)
    height, width = image_hw(config)
    stats = (tuple(member.mean or mean), tuple(member.std or std))
    return Preprocess(height, width, *stats, bit_depth=config.data.bit_depth)


def build_net(member: MemberConfig, state_dict: dict[str, torch.Tensor] | None) -> PatchEmbedder:
    features = create_feature_extractor(member.backbone, member.layers, state_dict)
    channels = feature_channels(features)
    head = (member.patch_size, member.pretrain_embed_dimension, member.target_embed_dimension)
    return PatchEmbedder(features, channels, *head).eval()


def embedder_path(run_dir: Path, index: int) -> Path:
    return run_dir / MEMBERS_DIR / f"m{index}.safetensors"


def wrap(config: Config, member: MemberConfig, net: PatchEmbedder) -> Embedder:
    grid, model_input, _ = grid_for(config)
    return Embedder(net, preprocess_for(config, member), grid, model_input, config.train.pixels_per_pass)


def create_embedder(config: Config, index: int) -> tuple[Embedder, str]:
    """A fresh embedder for member `index`, with weights resolved from the config, and their source."""
    member = config.members[index]
    resolved = resolve_weights(member.backbone, member.weights, member.pretrained)
    if resolved.state_dict is None:
        torch.manual_seed(config.train.seed + index)  # random init is reproducible from the seed
    return wrap(config, member, build_net(member, resolved.state_dict)), resolved.source


def save_embedder(embedder: Embedder, run_dir: Path, index: int) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in embedder.net.state_dict().items()}
    atomic_write(embedder_path(run_dir, index), lambda tmp: save_file(state, str(tmp)))


def load_embedder(config: Config, run_dir: Path, index: int) -> Embedder:
    """The exact embedder a run trained member `index` with (its weights file, never a fresh download)."""
    from safetensors.torch import load_file

    path = embedder_path(run_dir, index)
    if not path.is_file():
        raise TilecoreError(f"run {run_dir}: {path.relative_to(run_dir)} missing; run `tilecore train` first")
    member = config.members[index]
    net = build_net(member, None)
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001
        raise TilecoreError(f"run {run_dir}: {path.name} does not match the run's config ({exc})") from None
    return wrap(config, member, net.eval())
