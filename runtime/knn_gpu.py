"""kNN on a GPU: FAISS's GPU indexes behind the same search() the CPU indexes offer (runtime.knn).

The Predictor calls place_beside_engines once after loading its engines and banks: the indexes move to a
GPU only when an engine really computes there (its `cuda_device`, set by the ONNX Runtime engine from the
provider the session runs on and by the native TensorRT engine), never because a GPU merely exists: an
`auto` run that fell back to the CPU keeps its kNN on the CPU too. Nothing else in the runtime touches
faiss's GPU API.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import faiss
import numpy as np

from tilecore.runtime.knn import BankScorer


class SerialGpuIndex:
    """A FAISS GPU index searched by one thread at a time. FAISS's GPU indexes, and the resource object
    they share, are not thread-safe even for search (its CPU indexes are), so all share one lock."""

    def __init__(self, index: faiss.Index, lock: threading.Lock) -> None:
        self.index, self.lock = index, lock

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.index.search(queries, k)

    def __getattr__(self, name: str) -> object:
        return getattr(self.index, name)


def engines_gpu(engines: Iterable[object]) -> int | None:
    """The CUDA device the first GPU engine among `engines` runs on, or None when all run on the CPU."""
    return next((e.cuda_device for e in engines if getattr(e, "cuda_device", None) is not None), None)


def place_beside_engines(scorers: list[BankScorer], engines: Iterable[object]) -> str:
    """place_on_device on the engines' GPU, or "cpu" when no engine runs on a GPU."""
    gpu = engines_gpu(engines)
    return "cpu" if gpu is None else place_on_device(scorers, "cuda", gpu)


def place_on_device(scorers: list[BankScorer], device: str, gpu_id: int) -> str:
    """Put every index on GPU `gpu_id` through one shared FAISS resource object when faiss-gpu sees that GPU and
    `device` is not cpu; returns where the kNN search runs ("cpu" or "cuda:<id>")."""
    if device == "cpu" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= gpu_id:
        return "cpu"
    resources = faiss.StandardGpuResources()  # one for all indexes: a resource object per index exhausts memory
    resources.setTempMemory(256 * 1024 * 1024)
    lock = threading.Lock()  # the resources' one user at a time (SerialGpuIndex)
    moved: dict[int, faiss.Index] = {}
    for scorer in {id(s): s for s in scorers}.values():  # stacked banks repeat one scorer: visit it once
        if id(scorer.index) not in moved:  # and scorers sharing an index move it once
            try:
                moved[id(scorer.index)] = SerialGpuIndex(faiss.index_cpu_to_gpu(resources, gpu_id, scorer.index), lock)
            except RuntimeError:  # FAISS has no GPU version of this index kind (HNSW): it stays on the CPU
                moved[id(scorer.index)] = scorer.index
        scorer.index = moved[id(scorer.index)]
    return f"cuda:{gpu_id}"
