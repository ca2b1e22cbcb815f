"""`tilecore run BUNDLE INPUT --ray ADDRESS`: a stream's batches scored by Ray actors, each holding a Predictor.

The driver does everything else, as in a local run (runtime.run_stream): it opens the bundle itself, reads and
validates the inputs, and writes every record and picture, in input order. An actor only scores: it opens the
bundle once, at the absolute path the driver names (a file system all nodes share, docs/ray.md), with the
driver's Predictor options, so its results equal a local run's. Images go out and Results come back through
Ray's object store, in memory; nothing is written as a pickle. A killed actor process is restarted and the
batch it held is sent again (MAX_RESTARTS times), so the run still has every result. An actor that cannot open
the bundle (a node without the shared folder) fails the run with one line, at its first batch.

Ray is imported only through the `ray` module the caller passes (runtime.ray_cluster.ray_session).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.predictor import Predictor, Result
from tilecore.runtime.ray_cluster import get
from tilecore.runtime.run_stream import BatchScorer, timed_batch

MAX_RESTARTS = 2  # restarts of a killed actor, and retries of the batch it was scoring
BATCHES_PER_ACTOR = 2  # in flight: one being scored, one waiting, so an actor never idles between batches


class BatchWorker:
    """A Predictor in a Ray actor (ray_scorer makes the class remote); its process is titled ray::BatchWorker."""

    def __init__(self, bundle: str, predictor_kwargs: dict[str, Any]) -> None:
        self.predictor: Predictor | TilecoreError
        try:
            self.predictor = Predictor(bundle, **predictor_kwargs)
        except TilecoreError as error:  # e.g. no shared FS: this node lacks the bundle the driver opened
            # raised by each batch, so the driver says it in one line (Ray reports a failed __init__ as a traceback)
            self.predictor = TilecoreError(f"--ray: a Ray worker cannot open the bundle ({error})")

    def predict_batch(self, images: list[np.ndarray]) -> tuple[list[Result], float]:
        """One Result per image, in order, and the milliseconds scoring took per image."""
        if isinstance(self.predictor, TilecoreError):
            raise self.predictor
        return timed_batch(self.predictor, images)


def ray_scorer(
    ray: ModuleType, bundle: str | Path, actors: int, predictor_kwargs: dict[str, Any], gpus: float = 0.0
) -> BatchScorer:
    """A scorer that sends batches round-robin to `actors` actors of one CPU (and `gpus` GPUs) each, each running
    `Predictor(bundle, **predictor_kwargs)`; a TilecoreError an actor raises comes back as itself."""
    retries = {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_RESTARTS}
    remote = ray.remote(num_cpus=1, num_gpus=gpus, **retries)(BatchWorker)
    path = str(Path(bundle).resolve())  # the workers' working folder is not the driver's
    workers = [remote.remote(path, predictor_kwargs) for _ in range(actors)]
    turns = itertools.cycle(workers)
    return BatchScorer(
        submit=lambda images: next(turns).predict_batch.remote(images),
        collect=lambda ref: get(ray, ref),
        in_flight=BATCHES_PER_ACTOR * actors,
    )
