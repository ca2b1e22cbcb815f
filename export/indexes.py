"""FAISS indexes for a bank: exact by default, approximate on request with its recall measured.

Approximate indexes trade exactness for speed on large banks. Their recall@1 against the exact index is
measured at export time on embeddings of the held-out validation images and written into the manifest.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import INDEX_KINDS, build_flat_index

__all__ = ["INDEX_KINDS", "build_index", "recall_at_1"]


def build_index(bank: np.ndarray, kind: str, seed: int = 0) -> faiss.Index:
    """An index of `kind` over bank [n, D] float32."""
    if kind == "flat":
        return build_flat_index(bank)
    n, d = bank.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32)
        index.hnsw.efSearch = 64
        index.add(bank)
        return index
    if kind == "ivfpq":
        lists = max(1, min(int(math.sqrt(n)), n // 39))  # FAISS wants ~39 training points per list
        sub = next(m for m in (16, 12, 8, 6, 4, 3, 2, 1) if d % m == 0)  # PQ sub-quantizers must divide D
        bits = 8 if n >= 256 * 39 else 4
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, lists, sub, bits)
        index.cp.seed = seed
        index.train(bank)
        index.add(bank)
        index.nprobe = min(lists, 8)
        return index
    raise TilecoreError(f"--index {kind!r}: expected one of {', '.join(INDEX_KINDS)}")


def recall_at_1(index: faiss.Index, exact: faiss.Index, queries: np.ndarray) -> float:
    """Fraction of queries [m, D] whose nearest bank entry the index finds, by distance (ties count)."""
    exact_distances, _ = exact.search(queries, 1)
    found_ids = index.search(queries, 1)[1][:, 0]
    bank = exact.reconstruct_n(0, exact.ntotal)
    found = np.sum((bank[found_ids] - queries) ** 2, axis=1)  # [m] squared distance to what was found
    return float(np.mean(found <= exact_distances[:, 0] * (1 + 1e-5) + 1e-6))
