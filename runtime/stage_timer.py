"""Wall-clock seconds per named stage, summed over a batch: what the benchmark and results.jsonl report."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """`with timer("knn bank_m0_t0_0.faiss"): ...` adds that block's seconds to the stage's total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started

    def add(self, other: StageTimer) -> None:
        for stage, seconds in other.seconds.items():
            self.seconds[stage] += seconds

    def per_image_ms(self, images: int) -> dict[str, float]:
        return {stage: round(1000 * s / images, 3) for stage, s in self.seconds.items()}


def stage_group(stage: str) -> str:
    """The stage kind a timing key belongs to: "engine backbone_x.onnx" -> "engine", "knn bank_..." -> "knn"."""
    return stage.split(" ", 1)[0]
