"""kNN scoring against hand-worked numbers and a brute-force reference, independent of runtime/knn.py.

README "Rules training and runtime share", Scores: Euclidean distance to the nearest bank entry in
FAISS, float32, square root taken once; tile score = max patch score; optional PatchCore eq. 7
reweighting (`scoring = "reweighted"`), which needs k > 1 neighbours (with k = 1 the softmax over one
neighbour is 1 and the weight 1 - 1 would zero every score, so k = 1 scores as the nearest rule does).
"""

import math
from pathlib import Path

import faiss
import numpy as np
import pytest

from tilecore.runtime.knn import RULE_NEAREST, RULE_REWEIGHTED, BankScorer

# Four bank entries in 2-D and one image of 1 x 2 patches, worked by hand:
#   q0 = (0, 0.5): nearest m0 at 0.5
#   q1 = (3, 4):   distances 5 (m0), sqrt(20) (m1), sqrt(13) (m2), sqrt(85) (m3) -> nearest m2 at sqrt(13)
# The worst patch is q1 with m* = m2; the neighbours of m2 in the bank, nearest first: m2 (0), m0 (2),
# m1 (sqrt 5), m3 (sqrt 164).
BANK = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]], dtype=np.float32)
PATCHES = np.array([[[[0.0, 0.5], [3.0, 4.0]]]], dtype=np.float32)  # [B=1, h=1, w=2, D=2]
NEAREST = [0.5, math.sqrt(13)]


def eq7_weight(query_to_neighbours: list[float]) -> float:
    """1 - exp(|q - m*|) / sum over N(m*) of exp(|q - m|), m* first in the list."""
    return 1.0 - math.exp(query_to_neighbours[0]) / sum(math.exp(d) for d in query_to_neighbours)


def test_scores_are_euclidean_distances_hand_worked() -> None:
    patch_scores, image_scores = BankScorer.from_bank(BANK).score(PATCHES)
    assert patch_scores.shape == (1, 1, 2) and image_scores.shape == (1,)
    assert patch_scores.dtype == np.float32 and image_scores.dtype == np.float32
    np.testing.assert_allclose(patch_scores[0, 0], NEAREST, rtol=1e-6)  # squared would be 0.25 and 13
    assert image_scores[0] == pytest.approx(math.sqrt(13), rel=1e-6)  # the max patch score


def test_a_3_4_5_triangle() -> None:
    bank = np.array([[0.0, 0.0, 0.0], [30.0, 40.0, 0.0]], dtype=np.float32)
    queries = np.array([[[[3.0, 4.0, 0.0], [24.0, 32.0, 0.0]]]], dtype=np.float32)  # 5 from m0, 10 from m1
    patch_scores, image_scores = BankScorer.from_bank(bank).score(queries)
    np.testing.assert_allclose(patch_scores[0, 0], [5.0, 10.0], rtol=1e-6)
    np.testing.assert_allclose(image_scores, [10.0], rtol=1e-6)


@pytest.mark.parametrize(
    ("k", "neighbours"),
    [
        (2, [math.sqrt(13), 5.0]),  # N(m2) = {m2, m0}
        (3, [math.sqrt(13), 5.0, math.sqrt(20)]),  # + m1
        (4, [math.sqrt(13), 5.0, math.sqrt(20), math.sqrt(85)]),  # + m3
        (9, [math.sqrt(13), 5.0, math.sqrt(20), math.sqrt(85)]),  # k beyond the bank: all of it
    ],
)
def test_reweighting_hand_worked(k: int, neighbours: list[float]) -> None:
    patch_scores, image_scores = BankScorer.from_bank(BANK, RULE_REWEIGHTED, k).score(PATCHES)
    np.testing.assert_allclose(patch_scores[0, 0], NEAREST, rtol=1e-6)  # patch scores are never reweighted
    expected = math.sqrt(13) * eq7_weight(neighbours)
    assert image_scores[0] == pytest.approx(expected, rel=1e-5)
    assert 0 < image_scores[0] < math.sqrt(13)


def test_reweighting_k2_in_closed_form() -> None:
    # k = 2: weight = 1 - e^sqrt13 / (e^sqrt13 + e^5) = 1 / (1 + e^(sqrt13 - 5)) = 0.80130...
    _, image_scores = BankScorer.from_bank(BANK, RULE_REWEIGHTED, 2).score(PATCHES)
    assert image_scores[0] == pytest.approx(math.sqrt(13) / (1 + math.exp(math.sqrt(13) - 5)), rel=1e-5)
    assert image_scores[0] == pytest.approx(2.8891, abs=1e-4)


def test_reweighting_with_one_neighbour_is_the_nearest_rule() -> None:
    _, reweighted = BankScorer.from_bank(BANK, RULE_REWEIGHTED, 1).score(PATCHES)
    _, nearest = BankScorer.from_bank(BANK, RULE_NEAREST, 1).score(PATCHES)
    np.testing.assert_array_equal(reweighted, nearest)
    assert reweighted[0] == pytest.approx(math.sqrt(13), rel=1e-6)  # not 0, which eq. 7 with k = 1 gives


# --- brute force on random data, through a FAISS index read back from disk (as a bundle loads it) ----------


def brute_force(bank: np.ndarray, patches: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches [B, h, w, D] -> (nearest distances [B, h, w], eq. 7 image scores [B]) in float64 loops."""
    b, h, w, d = patches.shape
    bank64 = bank.astype(np.float64)
    patch_scores = np.zeros((b, h * w))
    image_scores = np.zeros(b)
    for i in range(b):
        queries = patches[i].reshape(-1, d).astype(np.float64)
        dist = np.array([[math.dist(q, m) for m in bank64] for q in queries])  # [h*w, n]
        patch_scores[i] = dist.min(axis=1)
        worst = int(patch_scores[i].argmax())
        anchor = int(dist[worst].argmin())  # m*
        image_scores[i] = patch_scores[i, worst]
        if k > 1:
            from_anchor = [math.dist(bank64[anchor], m) for m in bank64]
            order = sorted(range(len(bank64)), key=lambda j: from_anchor[j])[:k]  # N(m*), m* first
            image_scores[i] *= eq7_weight([dist[worst, j] for j in order])
    return patch_scores.reshape(b, h, w), image_scores


@pytest.mark.parametrize("k", [1, 3])
def test_loaded_index_scores_equal_brute_force(tmp_path: Path, k: int) -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(60, 8)).astype(np.float32)
    patches = (rng.normal(size=(3, 4, 5, 8)) * 1.5).astype(np.float32)
    index = faiss.IndexFlatL2(8)
    index.add(bank)
    faiss.write_index(index, str(tmp_path / "bank.faiss"))
    scorer = BankScorer.from_index(faiss.read_index(str(tmp_path / "bank.faiss")), RULE_REWEIGHTED, k, "bank.faiss")
    patch_scores, image_scores = scorer.score(patches)
    expected_patches, expected_images = brute_force(bank, patches, k)
    np.testing.assert_allclose(patch_scores, expected_patches, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(image_scores, expected_images, rtol=1e-5, atol=1e-6)
    if k == 1:
        np.testing.assert_allclose(image_scores, expected_patches.reshape(3, -1).max(axis=1), rtol=1e-5)
