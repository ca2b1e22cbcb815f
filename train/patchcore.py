"""The whole PatchCore embedding pass in one module: image batch -> patch embeddings [B, h, w, D].

Roth et al. (2022) build a patch embedding from several backbone layers:
  1. local neighbourhood aggregation: every position takes its p x p neighbourhood (zero padded),
     flattened channel-major to a vector of C * p * p values;
  2. deeper layers are bilinearly upsampled to the grid of the first chosen layer;
  3. each layer's vector is adaptive-average-pooled to `pretrain_embed_dimension` values;
  4. the layers' pooled vectors are concatenated and adaptive-average-pooled to `target_embed_dimension`.

Steps 1, 3 and 4 are fixed linear maps and step 2 is linear across positions, so they commute: per layer
we fold 1+3+4 into one p x p convolution with C inputs and D outputs, upsample its output, and sum the
layers. The result equals the four-step definition (tests compare them) and exports to ONNX as plain
Conv / Resize / Pad / Add, with no adaptive pooling whose sizes do not divide.

Step 4 averages contiguous windows of the concatenated layers, so each layer feeds only its own band of
the D outputs (the first layer the first half, and so on) and the rest of its kernel rows are zero. Each
layer's convolution computes its band alone and is zero-padded to D: the same numbers at about half the
cost of the full kernel (resnet18 and lite0 heads: 2x fewer multiply-adds).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The [n_out, n_in] matrix of 1-D adaptive average pooling (windows as in torch's adaptive_avg_pool1d)."""
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def nonzero_rows(kernel: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the band of output channels where a folded kernel [D, C, p, p] has any non-zero weight."""
    rows = torch.nonzero(kernel.flatten(1).abs().sum(dim=1)).flatten()
    return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)


def folded_layer_kernels(
    channels: list[int], patch_size: int, pretrain_dim: int, target_dim: int
) -> list[torch.Tensor]:
    """One conv kernel [target_dim, C_l, p, p] per layer, equal to steps 1, 3 and 4 above."""
    n_layers = len(channels)
    aggregate = adaptive_pool_matrix(n_layers * pretrain_dim, target_dim)  # [D, L * P]
    kernels = []
    for layer, c in enumerate(channels):
        per_layer = adaptive_pool_matrix(c * patch_size * patch_size, pretrain_dim)  # [P, C * p * p]
        block = aggregate[:, layer * pretrain_dim : (layer + 1) * pretrain_dim]  # [D, P]
        folded = block @ per_layer  # [D, C * p * p], channel-major like torch's unfold
        kernels.append(torch.from_numpy(folded.reshape(target_dim, c, patch_size, patch_size)).float())
    return kernels


class PatchEmbedder(nn.Module):
    """Frozen backbone + PatchCore head: images [B, 3, H, W] -> patch embeddings [B, h, w, D]."""

    def __init__(
        self, features: nn.Module, channels: list[int], patch_size: int, pretrain_dim: int, target_dim: int
    ) -> None:
        super().__init__()
        if patch_size % 2 != 1:
            raise ValueError(f"patch_size {patch_size}: expected an odd number")
        self.features = features
        self.patch_size = patch_size
        kernels = folded_layer_kernels(channels, patch_size, pretrain_dim, target_dim)
        for i, kernel in enumerate(kernels):
            self.register_buffer(f"kernel{i}", kernel)
        self.num_layers = len(kernels)
        self.target_dim = target_dim
        self.bands = [nonzero_rows(kernel) for kernel in kernels]  # fixed by the sizes, not by the weights
        # training's --amp: the backbone runs under autocast to this dtype, the head in float32; None (export,
        # evaluation, the CPU default) leaves the graph as it is
        self.autocast: torch.dtype | None = None

    def backbone_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's feature maps, list of [B, C_l, h_l, w_l] float32, shallow to deep."""
        if self.autocast is None:
            return self.features(images)
        with torch.autocast(images.device.type, dtype=self.autocast):
            maps = self.features(images)
        return [feature.float() for feature in maps]  # the head and everything after it stay float32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone_maps(images)  # list of [B, C_l, h_l, w_l], shallow to deep
        grid = maps[0].shape[-2:]
        embedding = None
        for i, feature in enumerate(maps):
            lo, hi = self.bands[i]
            kernel = getattr(self, f"kernel{i}")[lo:hi]  # the layer's band of output channels
            projected = F.conv2d(feature, kernel, padding=self.patch_size // 2)  # [B, hi - lo, h_l, w_l]
            if projected.shape[-2:] != grid:
                projected = F.interpolate(projected, size=grid, mode="bilinear", align_corners=False)
            projected = F.pad(projected, (0, 0, 0, 0, lo, self.target_dim - hi))  # [B, D, h, w]: zeros outside
            embedding = projected if embedding is None else embedding + projected  # [B, D, h, w]
        return embedding.permute(0, 2, 3, 1).contiguous()  # [B, D, h, w] -> [B, h, w, D]
