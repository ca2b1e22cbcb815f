"""The folded PatchCore head against the paper's four-step definition, written out with torch ops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilecore.train.patchcore import PatchEmbedder, adaptive_pool_matrix


@pytest.mark.parametrize(("n_in", "n_out"), [(10, 4), (4608, 1024), (2048, 384), (27, 64), (7, 7)])
def test_pool_matrix_equals_adaptive_avg_pool1d(n_in: int, n_out: int) -> None:
    x = torch.randn(3, 1, n_in, dtype=torch.float64)
    expected = F.adaptive_avg_pool1d(x, n_out)[:, 0]
    ours = x[:, 0] @ torch.from_numpy(adaptive_pool_matrix(n_in, n_out)).T
    torch.testing.assert_close(ours, expected)


class TwoLayerFeatures(nn.Module):
    """A stand-in backbone returning a fine and a coarse feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.b = nn.Conv2d(5, 7, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        fa = self.a(x)
        return [fa, self.b(fa)]


def reference_embedding(maps: list[torch.Tensor], p: int, pretrain: int, target: int) -> torch.Tensor:
    """Steps 1-4 of PatchCore as published: unfold, upsample patches, pool per layer, pool across layers."""
    grid = maps[0].shape[-2:]
    per_layer = []
    for feature in maps:
        b, c, h, w = feature.shape
        patches = F.unfold(feature, kernel_size=p, padding=p // 2)  # [B, C*p*p, h*w]
        patches = patches.reshape(b, c * p * p, h, w)
        if (h, w) != grid:
            patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
        vectors = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * p * p)  # [B*h*w, 1, C*p*p]
        per_layer.append(F.adaptive_avg_pool1d(vectors, pretrain)[:, 0])  # [B*h*w, P]
    stacked = torch.stack(per_layer, dim=1).reshape(-1, 1, len(maps) * pretrain)  # [B*h*w, 1, L*P]
    embedding = F.adaptive_avg_pool1d(stacked, target)[:, 0]  # [B*h*w, D]
    return embedding.reshape(maps[0].shape[0], *grid, target)


@pytest.mark.parametrize(("pretrain", "target"), [(16, 8), (50, 24), (100, 30)])
def test_folded_head_equals_four_step_definition(pretrain: int, target: int) -> None:
    torch.manual_seed(0)
    features = TwoLayerFeatures().double().eval()
    embedder = PatchEmbedder(features, [5, 7], 3, pretrain, target).double().eval()
    images = torch.randn(2, 3, 24, 20, dtype=torch.float64)
    with torch.no_grad():
        ours = embedder(images)
        expected = reference_embedding(features(images), 3, pretrain, target)
    assert ours.shape == (2, 12, 10, target)
    # the folded kernels are stored in float32, hence a float32-level tolerance; a wrong fold is off by O(1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_even_patch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="odd"):
        PatchEmbedder(TwoLayerFeatures(), [5, 7], 2, 8, 4)


def test_head_kernels_are_float32_and_fixed() -> None:
    embedder = PatchEmbedder(TwoLayerFeatures(), [5, 7], 3, 16, 8)
    assert embedder.kernel0.dtype == torch.float32
    assert not any(p.requires_grad for name, p in embedder.named_parameters() if "kernel" in name)
    # 2 layers x 16 pretrain values pooled to 8: layer 0 feeds outputs 0-3, layer 1 outputs 4-7; each output
    # is an average of averages, so its weights sum to 1
    assert embedder.bands == [(0, 4), (4, 8)]
    np.testing.assert_allclose(embedder.kernel0.sum(dim=(1, 2, 3)).numpy(), [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(embedder.kernel1.sum(dim=(1, 2, 3)).numpy(), [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-6)
    # layer 0: 5 channels x 3 x 3 = 45 values pooled to 16; output 0 averages pretrain values 0-3, whose
    # windows of 45 -> 16 cover inputs 0-2, 2-5, 5-8, 8-11 (each 1 / window length)
    windows = [(0, 3), (2, 6), (5, 9), (8, 12)]
    expected = np.zeros(45)
    for start, end in windows:
        expected[start:end] += 0.25 / (end - start)
    np.testing.assert_allclose(embedder.kernel0[0].flatten().numpy(), expected, rtol=1e-6)
