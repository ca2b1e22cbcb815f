"""Approximate greedy coreset selection (PatchCore, Sec. 3.2), in O(N) memory.

Distances are measured in a random projection to `projection_dim` dimensions (Johnson-Lindenstrauss);
the exact greedy algorithm's N x N matrix is never built. The selection keeps one vector: each point's
distance to its nearest already-selected point, updated once per step. The random starting point is
the first member of the coreset. On a GPU, greedy_coreset runs the same algorithm in torch on the device
(torch_greedy_coreset); on the CPU it stays in NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from tilecore.runtime.errors import TilecoreError


def coreset_size(n: int, ratio: float) -> int:
    return max(1, min(n, int(math.ceil(n * ratio))))


def approximate_greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    seed: int = 0,
    projection_dim: int = 128,
    on_progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Indices (into `features` [N, D]) of a greedy k-center coreset of ceil(N * ratio) points."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise TilecoreError(f"coreset: features of shape {tuple(features.shape)}, expected [N > 0, D]")
    if not 0.0 < ratio <= 1.0:
        raise TilecoreError(f"coreset ratio {ratio}: expected 0 < ratio <= 1")
    n, d = features.shape
    target = coreset_size(n, ratio)
    if target == n:
        return np.arange(n)
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if d > projection_dim:
        projection = torch.randn(d, projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = points @ projection  # [N, D] -> [N, projection_dim]
    start = int(torch.randint(n, (1,), generator=generator))
    # The loop runs in NumPy: its BLAS matrix-vector product is several times faster than torch.mv here.
    points_np = np.ascontiguousarray(points.numpy(), dtype=np.float32)  # [N, d']
    squared_norms = np.einsum("ij,ij->i", points_np, points_np)  # [N]
    buffer = np.empty(n, dtype=np.float32)

    def squared_distances_to(index: int) -> np.ndarray:  # [N], written into `buffer`
        np.dot(points_np, points_np[index], out=buffer)
        np.multiply(buffer, -2.0, out=buffer)
        np.add(buffer, squared_norms, out=buffer)
        np.add(buffer, squared_norms[index], out=buffer)
        return buffer

    selected = np.empty(target, dtype=np.int64)
    selected[0] = start
    nearest = squared_distances_to(start).copy()
    report_every = max(1, target // 100)
    for step in range(1, target):
        chosen = int(np.argmax(nearest))
        selected[step] = chosen
        np.minimum(nearest, squared_distances_to(chosen), out=nearest)
        if on_progress is not None and step % report_every == 0:
            on_progress(step, target)
    if on_progress is not None:
        on_progress(target, target)
    return selected


def greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    projection_dim: int = 128,
    on_progress: Callable[[int, int], None] | None = None,
    force_torch: bool = False,
) -> np.ndarray:
    """The coreset training uses: on the CPU approximate_greedy_coreset (NumPy, unchanged), elsewhere, or with
    `force_torch`, the same algorithm in torch on `device` (torch_greedy_coreset)."""
    device = torch.device(device)
    if device.type == "cpu" and not force_torch:
        return approximate_greedy_coreset(features, ratio, seed, projection_dim, on_progress)
    return torch_greedy_coreset(features, ratio, seed, device, projection_dim, on_progress)


def torch_greedy_coreset(
    features: torch.Tensor,
    ratio: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    projection_dim: int = 128,
    on_progress: Callable[[int, int], None] | None = None,
    rows_per_chunk: int = 65536,
) -> np.ndarray:
    """approximate_greedy_coreset in torch on `device`: the same projection and starting point (drawn on the CPU
    from the same generator), the same update and the same first-maximum argmax; it can pick differently only
    where float32 rounding of a different BLAS reorders near-equal distances. `features` may stay on the host:
    it is projected `rows_per_chunk` rows at a time, so the device holds [N, projection_dim] and one chunk."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise TilecoreError(f"coreset: features of shape {tuple(features.shape)}, expected [N > 0, D]")
    if not 0.0 < ratio <= 1.0:
        raise TilecoreError(f"coreset ratio {ratio}: expected 0 < ratio <= 1")
    device = torch.device(device)
    n, d = features.shape
    target = coreset_size(n, ratio)
    if target == n:
        return np.arange(n)
    generator = torch.Generator().manual_seed(seed)
    projection = None
    if d > projection_dim:
        projection = (torch.randn(d, projection_dim, generator=generator) / math.sqrt(projection_dim)).to(device)
    start = int(torch.randint(n, (1,), generator=generator))
    chunks = [chunk.to(device).float() for chunk in features.split(rows_per_chunk)]  # each [c, D]
    if projection is not None:
        chunks = [chunk @ projection for chunk in chunks]  # [c, D] -> [c, projection_dim], one chunk at a time
    points = torch.cat(chunks) if len(chunks) > 1 else chunks[0]  # [N, d']
    del chunks
    squared_norms = (points * points).sum(dim=1)  # [N]

    def squared_distances_to(index: torch.Tensor) -> torch.Tensor:  # index [1] on the device -> [N]
        distances = torch.mv(points, points.index_select(0, index)[0])
        return distances.mul_(-2.0).add_(squared_norms).add_(squared_norms.index_select(0, index))

    selected = torch.empty(target, dtype=torch.int64, device=device)
    chosen = torch.tensor([start], dtype=torch.int64, device=device)
    selected[0:1] = chosen
    nearest = squared_distances_to(chosen)
    report_every = max(1, target // 100)
    for step in range(1, target):
        chosen = torch.argmax(nearest, dim=0, keepdim=True)  # [1], first maximum; stays on the device (no sync)
        selected[step : step + 1] = chosen
        torch.minimum(nearest, squared_distances_to(chosen), out=nearest)
        if on_progress is not None and step % report_every == 0:
            on_progress(step, target)
    if on_progress is not None:
        on_progress(target, target)
    return selected.cpu().numpy()
