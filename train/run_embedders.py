"""A run's member embedders in one process, each loaded from the run folder once and kept for later jobs.

The driver hands its own (created, saved and placed) to local jobs; a Ray worker builds one per run folder
the first time a task of that run lands on it, so the next task there skips loading the backbone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tilecore.runtime.knn import set_knn_threads
from tilecore.train.config import Config
from tilecore.train.device import Placement, resolve_placement
from tilecore.train.model import Embedder, embedder_path, load_embedder


@dataclass
class RunEmbedders:
    """Member index -> its embedder on `placement`'s device, loaded from `run_dir` on first use."""

    config: Config
    run_dir: Path
    placement: Placement
    loaded: dict[int, Embedder] = field(default_factory=dict)

    def get(self, index: int) -> Embedder:
        if index not in self.loaded:
            embedder = load_embedder(self.config, self.run_dir, index)
            self.loaded[index] = embedder.place(self.placement.device, self.placement.autocast)
        return self.loaded[index]


_WORKER_CACHE: dict[tuple, RunEmbedders] = {}  # one process's runs (a Ray worker serves many tasks)


def task_threads(config: Config) -> int:
    """Torch threads of a Ray task: train.threads, else the CPUs the task holds (ray.num_cpus). A bank's
    bytes depend on the thread count (the backbone's float sums are split by thread): a local run with the
    same count writes the same bytes."""
    return config.train.threads or max(1, round(config.ray.num_cpus))


def match_knn_threads() -> None:
    """FAISS searches with as many threads as torch computes with. Its distances' last bits depend on its
    thread count too (docs/ray.md), and its OpenMP setting is its own, process-wide, left as the last caller
    set it: each job that runs kNN sets it again."""
    set_knn_threads(torch.get_num_threads())


def worker_embedders(config: Config, run_dir: Path) -> RunEmbedders:
    """This process's embedders of the run in `run_dir` for `config`, placed where `[train]` says; sets the
    task's torch threads (task_threads).

    The cache key holds the weight files' sizes and times, so a run folder trained afresh under the same
    name is loaded afresh."""
    files = sorted(embedder_path(run_dir, i) for i in range(len(config.members)))
    stamps = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None for p in files)
    key = (str(Path(run_dir).resolve()), json.dumps(config.to_dict(), sort_keys=True), stamps)
    torch.set_num_threads(task_threads(config))
    if key not in _WORKER_CACHE:
        placement = resolve_placement(config.train.device, config.train.amp)
        _WORKER_CACHE.clear()  # one run at a time per worker: memory stays at one run's models
        _WORKER_CACHE[key] = RunEmbedders(config, run_dir, placement)
    return _WORKER_CACHE[key]
