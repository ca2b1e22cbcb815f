"""How a figure is taken: warm-up first, then repeated calls until enough images or the time runs out.

Latency is per image at batch 1 (p50 / p90 / p99); throughput is images per second at a batch size,
over the same decoded images cycled in order. Medians and percentiles, never a single call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

MIN_CALLS = 3  # even when the duration runs out first


@dataclass(frozen=True)
class Protocol:
    batches: tuple[int, ...] = (1, 8, 16)
    duration_s: float = 10.0  # upper bound per measurement
    min_images: int = 100  # a measurement stops once this many images are done (or the duration is over)
    warmup: int = 3  # calls before any timing
    max_batch: int = 16  # tiles per engine call

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = Protocol(batches=(1, 4), duration_s=1.0, min_images=6, warmup=1, max_batch=8)


def cycle_batches(count: int, batch: int) -> Callable[[int], list[int]]:
    """call number -> the item indexes of that call's batch, cycling through `count` items."""
    return lambda call: [(call * batch + i) % count for i in range(batch)]


def repeat(fn: Callable[[int], None], batch: int, protocol: Protocol) -> list[float]:
    """Seconds of each call fn(call_number), until min_images images are done or the duration is over."""
    seconds: list[float] = []
    started = time.perf_counter()
    while True:
        call_started = time.perf_counter()
        fn(len(seconds))
        seconds.append(time.perf_counter() - call_started)
        done = len(seconds) * batch >= protocol.min_images
        out_of_time = time.perf_counter() - started >= protocol.duration_s
        if len(seconds) >= MIN_CALLS and (done or out_of_time):
            return seconds


def latency_summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "calls": len(seconds),
    }


def images_per_second(seconds: list[float], batch: int) -> float:
    """Throughput from the median call: robust to a stray slow call on a busy machine."""
    return round(batch / float(np.median(seconds)), 2)
