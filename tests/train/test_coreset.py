import numpy as np
import pytest
import torch

from tilecore.runtime.errors import TilecoreError
from tilecore.train.coreset import approximate_greedy_coreset, coreset_size, torch_greedy_coreset


def exact_greedy(points: np.ndarray, start: int, size: int) -> list[int]:
    """k-center greedy with a full distance matrix (fine for a few hundred points)."""
    full = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    chosen = [start]
    for _ in range(size - 1):
        chosen.append(int(full[:, chosen].min(axis=1).argmax()))
    return chosen


def test_matches_exact_greedy_when_no_projection_is_needed() -> None:
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ours = approximate_greedy_coreset(features, ratio=0.1, seed=3, projection_dim=128)
    assert ours.tolist() == exact_greedy(features.numpy().astype(np.float64), int(ours[0]), 30)


def test_projection_keeps_greedy_coverage_of_small_clusters() -> None:
    """One big cluster and seven small far-away ones: greedy k-center must visit every cluster."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(8, 512)) * 20.0
    sizes = [300] + [10] * 7
    points = np.concatenate([c + rng.normal(size=(n, 512)) for c, n in zip(centres, sizes, strict=True)])
    cluster = np.repeat(np.arange(8), sizes)
    ours = approximate_greedy_coreset(torch.from_numpy(points).float(), ratio=8 / 370, seed=0)
    assert len(ours) == coreset_size(370, 8 / 370) == 8
    assert sorted(cluster[ours].tolist()) == list(range(8))
    random_pick = np.random.default_rng(0).choice(370, size=8, replace=False)
    assert len(set(cluster[random_pick].tolist())) < 8  # what the coreset is for


def test_deterministic_and_seed_dependent() -> None:
    features = torch.randn(1000, 200, generator=torch.Generator().manual_seed(2))
    a = approximate_greedy_coreset(features, 0.02, seed=7)
    b = approximate_greedy_coreset(features, 0.02, seed=7)
    c = approximate_greedy_coreset(features, 0.02, seed=8)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_ratio_one_keeps_everything_and_bad_ratio_fails() -> None:
    features = torch.randn(10, 4)
    assert approximate_greedy_coreset(features, 1.0).tolist() == list(range(10))
    with pytest.raises(TilecoreError, match="ratio"):
        approximate_greedy_coreset(features, 0.0)


def test_torch_path_matches_exact_greedy_when_no_projection_is_needed() -> None:
    """The torch loop GPUs run (train.coreset.torch_greedy_coreset), here on the CPU: the same exact-greedy picks."""
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    ours = torch_greedy_coreset(features, ratio=0.1, seed=3, projection_dim=128)
    assert ours.tolist() == exact_greedy(features.numpy().astype(np.float64), int(ours[0]), 30)
