import numpy as np
import pytest

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import RULE_REWEIGHTED, BankScorer


def brute_force_nearest(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    diffs = queries[:, None, :].astype(np.float64) - bank[None, :, :].astype(np.float64)
    return np.sqrt((diffs**2).sum(axis=2)).min(axis=1)


def test_patch_and_image_scores_are_euclidean_nearest_distances() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 16)).astype(np.float32)
    embeddings = rng.normal(size=(3, 4, 5, 16)).astype(np.float32)
    patch_scores, image_scores = BankScorer.from_bank(bank).score(embeddings)
    expected = brute_force_nearest(bank, embeddings.reshape(-1, 16)).reshape(3, 4, 5)
    np.testing.assert_allclose(patch_scores, expected, rtol=1e-5)
    np.testing.assert_allclose(image_scores, expected.reshape(3, -1).max(axis=1), rtol=1e-5)


def test_bank_member_scores_zero() -> None:
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(30, 8)).astype(np.float32) * 100
    patch_scores, image_scores = BankScorer.from_bank(bank).score(bank[:25].reshape(1, 5, 5, 8))
    # each patch is a bank row: distance 0, up to float32 rounding of |x|^2 + |y|^2 - 2xy (|x| ~ 280 here),
    # which may round below zero and is clamped there, never a NaN from a negative square root
    np.testing.assert_allclose(patch_scores, np.zeros((1, 5, 5)), atol=1e-2)
    np.testing.assert_allclose(image_scores, [0.0], atol=1e-2)


def test_reweighting_matches_the_paper_formula() -> None:
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(40, 6)).astype(np.float32)
    embeddings = rng.normal(size=(2, 3, 3, 6)).astype(np.float32) * 2
    k = 4
    _, plain = BankScorer.from_bank(bank).score(embeddings)
    _, weighted = BankScorer.from_bank(bank, RULE_REWEIGHTED, k).score(embeddings)
    for b in range(2):
        patches = embeddings[b].reshape(-1, 6).astype(np.float64)
        nearest = np.sqrt(((patches[:, None] - bank[None]) ** 2).sum(-1))  # [9, 40]
        worst = nearest.min(axis=1).argmax()
        anchor = nearest[worst].argmin()  # m*
        anchor_to_bank = np.sqrt(((bank - bank[anchor]) ** 2).sum(-1))
        neighbourhood = np.argsort(anchor_to_bank)[:k]  # N_b(m*), m* included
        d = nearest[worst, neighbourhood]
        weight = 1 - np.exp(nearest[worst, anchor]) / np.exp(d).sum()
        assert weighted[b] == pytest.approx(weight * plain[b], rel=1e-4)


def test_bad_bank_and_rule_are_refused() -> None:
    with pytest.raises(TilecoreError, match="memory bank"):
        BankScorer.from_bank(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(TilecoreError, match="scoring rule"):
        BankScorer.from_bank(np.zeros((3, 4), dtype=np.float32), rule="mean")



class CountedIndex:
    """A FAISS index that records the bank and the number of queries of every search."""

    def __init__(self, index, bank: int, searched: list[tuple[int, int]]) -> None:
        self.index, self.bank, self.searched = index, bank, searched

    def search(self, queries: np.ndarray, k: int):
        self.searched.append((self.bank, len(queries)))
        return self.index.search(queries, k)


def test_a_batch_meets_each_bank_in_one_search() -> None:
    """score_locations hands every bank all of a batch's patches at once: one search per bank and chunk."""
    from tilecore.runtime.merge import score_locations
    from tilecore.runtime.tiling import tile_grid

    rng = np.random.default_rng(3)
    grid = tile_grid((8, 8), (4, 4), (4, 4))  # 4 locations
    banks = [rng.normal(size=(20, 6)).astype(np.float32) for _ in range(grid.count)]
    scorers = [BankScorer.from_bank(bank) for bank in banks]
    searched: list[tuple[int, int]] = []  # (bank, queries) of every search
    for j, scorer in enumerate(scorers):
        scorer.index = CountedIndex(scorer.index, j, searched)
    embeddings = rng.normal(size=(5, grid.count, 2, 3, 6)).astype(np.float32)  # [B, T, h, w, D]
    outputs = score_locations(lambda locations: embeddings[:, locations], scorers, grid, sigma=0.0, chunk=3)
    assert sorted(searched) == [(j, 5 * 2 * 3) for j in range(grid.count)]  # once each, all 5 images' patches
    for j, bank in enumerate(banks):  # and each location was scored against its own bank
        expected = brute_force_nearest(bank, embeddings[:, j].reshape(-1, 6)).reshape(5, 2, 3).max(axis=(1, 2))
        np.testing.assert_allclose(outputs.scores[:, j], expected, rtol=1e-5)
