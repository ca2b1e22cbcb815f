"""Nearest-neighbour scoring against a PatchCore memory bank, in FAISS and always in float32.

FAISS's IndexFlatL2 returns squared L2 distances; the square root is taken here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from tilecore.runtime.errors import TilecoreError

# Scoring rules, named in run metadata and manifests.
RULE_NEAREST = "nearest"  # image score = max over patches of the distance to the nearest bank entry
RULE_REWEIGHTED = "reweighted"  # PatchCore eq. 7: that max, scaled by 1 - softmax over k bank neighbours
INDEX_KINDS = ("flat", "hnsw", "ivfpq")  # exact; approximate (export.indexes)


def set_knn_threads(threads: int) -> None:
    """CPU threads FAISS's searches use (OpenMP, process-wide); 0 leaves the library's default."""
    if threads:
        faiss.omp_set_num_threads(threads)


def build_flat_index(bank: np.ndarray) -> faiss.IndexFlatL2:
    """Exact L2 index over a memory bank [n, D]."""
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise TilecoreError(f"memory bank: shape {bank.shape}, expected [n > 0, D]")
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    return index


def read_bank_index(data: bytes, name: str, rows: int, dim: int, where: str) -> faiss.Index:
    """A bundle's FAISS index from its checked bytes (manifest.read_checked), refused unless it holds exactly
    the `rows` x `dim` bank its manifest records; `name` (the file's) labels the refusals."""
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))  # bytes [n] -> index, no re-read
    except RuntimeError:  # FAISS's message is a C++ backtrace; the file passed its sha256, so it was re-hashed
        raise TilecoreError(f"{where}: {name} is not a FAISS index") from None
    if (index.ntotal, index.d) != (rows, dim):
        raise TilecoreError(
            f"{where}: {name} holds {index.ntotal} rows of dimension {index.d}, the manifest says {rows} x {dim}"
        )
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries [m, D] -> (Euclidean distances [m, k], bank indices [m, k])."""
    squared, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    # FAISS's BLAS path (|x|^2 + |y|^2 - 2xy) can go slightly negative for near-identical vectors.
    return np.sqrt(np.maximum(squared, 0.0)), ids


@dataclass
class BankScorer:
    """Scores patch embeddings against one memory bank."""

    index: faiss.Index
    bank: np.ndarray  # [n, D] float32, needed by the reweighting rule
    rule: str = RULE_NEAREST
    num_neighbours: int = 1
    name: str = "bank"  # the bank's file name in a bundle; labels its kNN timing

    @classmethod
    def from_bank(cls, bank: np.ndarray, rule: str = RULE_NEAREST, num_neighbours: int = 1) -> BankScorer:
        if rule not in (RULE_NEAREST, RULE_REWEIGHTED):
            raise TilecoreError(f"scoring rule {rule!r}: expected {RULE_NEAREST!r} or {RULE_REWEIGHTED!r}")
        if num_neighbours < 1:
            raise TilecoreError(f"num_neighbours {num_neighbours}: expected >= 1")
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        return cls(build_flat_index(bank), bank, rule, num_neighbours)

    @classmethod
    def from_index(
        cls, index: faiss.Index, rule: str = RULE_NEAREST, num_neighbours: int = 1, name: str = "bank"
    ) -> BankScorer:
        """A scorer over a loaded exact index (the bank is read back for the reweighting rule)."""
        scorer = cls.from_bank(np.zeros((1, index.d), dtype=np.float32), rule, num_neighbours)  # validates
        if rule == RULE_REWEIGHTED and num_neighbours > 1:
            bank = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal))  # exact and HNSW indexes only
        else:
            bank = np.zeros((0, index.d), dtype=np.float32)  # the nearest rule never reads the bank
        return cls(index, bank, scorer.rule, num_neighbours, name)

    def score(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patch embeddings [B, h, w, D] -> (patch scores [B, h, w], image scores [B])."""
        b, h, w, d = embeddings.shape
        distances, ids = search(self.index, embeddings.reshape(b * h * w, d), 1)
        patch_scores = distances[:, 0].reshape(b, h, w)
        nearest_ids = ids[:, 0].reshape(b, h * w)
        flat_scores = patch_scores.reshape(b, h * w)
        worst = flat_scores.argmax(axis=1)  # [B] index of the most anomalous patch
        image_scores = flat_scores[np.arange(b), worst]
        if self.rule == RULE_REWEIGHTED and self.num_neighbours > 1:
            worst_embeddings = embeddings.reshape(b, h * w, d)[np.arange(b), worst]  # [B, D]
            anchors = nearest_ids[np.arange(b), worst]  # [B] nearest bank entry m* of each worst patch
            image_scores = image_scores * self._reweight(worst_embeddings, anchors)
        return patch_scores.astype(np.float32), image_scores.astype(np.float32)

    def _reweight(self, queries: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        """1 - exp(|q - m*|) / sum over the k bank neighbours m of m* of exp(|q - m|), per query [B]."""
        k = min(self.num_neighbours, self.bank.shape[0])
        _, neighbour_ids = search(self.index, self.bank[anchors], k)  # [B, k], includes m* itself
        neighbours = self.bank[neighbour_ids]  # [B, k, D]
        distances = np.linalg.norm(neighbours - queries[:, None, :], axis=2).astype(np.float64)  # [B, k]
        anchor_distance = np.linalg.norm(self.bank[anchors] - queries, axis=1).astype(np.float64)  # [B]
        top = distances.max(axis=1)
        softmax_anchor = np.exp(anchor_distance - top) / np.exp(distances - top[:, None]).sum(axis=1)
        return (1.0 - softmax_anchor).astype(np.float32)
