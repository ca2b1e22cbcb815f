"""One measurement: one bundle on one backend at one precision, timed in this process.

Runs in a worker process of its own (tilecore.bench.worker), so its peak RSS is its own and one
backend's threads never compete with another's. Inputs are decoded once; "with decode" figures read the
files again inside the timed loop.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tilecore.bench.protocol import Protocol, cycle_batches, images_per_second, latency_summary, repeat
from tilecore.runtime.engines.table import BENCH_PRECISIONS
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.predictor import Predictor
from tilecore.runtime.preprocess import normalise_rgb, tiles_at
from tilecore.runtime.stage_timer import StageTimer, stage_group

BACKENDS = tuple(BENCH_PRECISIONS)  # the runtime's backends (engines.table) and "pytorch"


@dataclass
class Job:
    bundle: str
    device: str  # one of BACKENDS; "pytorch" is the eager model of the bundle's source run
    precision: str
    images: list[str]
    protocol: Protocol
    threads: int = 0
    label: str = ""  # the setup's name in tables and plots
    run: str = ""  # run dir for "pytorch"; empty: the manifest's source_run
    memory_only: bool = False  # load, score two images, report memory (the resolution sweep)
    streams: int = 1  # OpenVINO's parallel inference streams
    trust: str = ""  # public key file the bundle must be signed by; empty: none asked for

    @property
    def backend(self) -> str:
        """The device as tables name it: "openvino 2 streams" where streams run in parallel."""
        return self.device if self.streams == 1 else f"{self.device} {self.streams} streams"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Job:
        return cls(**{**raw, "protocol": Protocol(**{**raw["protocol"], "batches": tuple(raw["protocol"]["batches"])})})


@dataclass
class StageTable:
    """Per-image stage times at batch 1, collected call by call, with each call's end-to-end time."""

    calls: list[dict[str, float]] = field(default_factory=list)
    end_to_end_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        """Medians per stage and per stage kind; the sum check uses means, which add up where medians don't."""
        stages = sorted({k for call in self.calls for k in call})
        median = {k: round(float(np.median([call.get(k, 0.0) for call in self.calls])), 3) for k in stages}
        groups: dict[str, float] = {}
        for stage, ms in median.items():
            groups[stage_group(stage)] = round(groups.get(stage_group(stage), 0.0) + ms, 3)
        stage_mean = float(np.mean([sum(call.values()) for call in self.calls]))
        end_to_end_mean = float(np.mean(self.end_to_end_ms))
        return {
            "stages_ms": median,
            "groups_ms": groups,
            "stage_sum_ms": round(stage_mean, 3),
            "end_to_end_ms": round(end_to_end_mean, 3),
            "stage_sum_over_end_to_end": round(stage_mean / end_to_end_mean, 3),
        }


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB (Linux); NaN elsewhere.

    VmHWM (peak RSS) belongs to this process image and restarts at exec, unlike getrusage's ru_maxrss,
    which a worker inherits from the process that forked it.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    return proc_status_mb("VmHWM")


def current_rss_mb() -> float:
    return proc_status_mb("VmRSS")


def gpu_memory_mb() -> float | None:
    """Peak GPU memory held by this process where a CUDA GPU and pynvml exist, else None."""
    try:
        import pynvml  # optional: not a dependency of the CPU install
    except ImportError:
        return None
    try:
        import os

        pynvml.nvmlInit()
        used = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    used += proc.usedGpuMemory
        return round(used / 2**20, 1)
    except Exception:  # noqa: BLE001 - NVML raises its own errors when no GPU is there
        return None


def backbone_only(predictor: Predictor, images: list[np.ndarray], batch: int, protocol: Protocol) -> float:
    """Images/s of the engines alone on the images' tiles, cut and normalised beforehand."""
    per_member = []
    for member, _ in predictor.members:
        spec = member.preprocess
        locations = list(range(predictor.grid.count))
        grid, input_hw = predictor.grid, predictor.input_hw
        tiles = [tiles_at(normalise_rgb(image, spec), grid, locations, input_hw) for image in images]
        per_member.append((predictor.engines[member.engine], tiles))  # tiles: [T, 3, h, w] per image
    pick = cycle_batches(len(images), batch)

    def call(n: int) -> None:  # the engine calls predict_batch makes, same sizes and order, nothing else
        for engine, tiles in per_member:
            chunk = max(1, engine.max_batch // batch)  # tile locations per call, as in Predictor
            for start in range(0, len(tiles[0]), chunk):
                # [batch * chunk, 3, h, w]: the chunk's locations of every image in the batch
                engine.run(np.concatenate([tiles[i][start : start + chunk] for i in pick(n)]))

    for n in range(protocol.warmup):
        call(n)
    return images_per_second(repeat(call, batch, protocol), batch)


def cascade_figures(predictor: Predictor, images: list[np.ndarray], batch: int, protocol: Protocol) -> dict:
    """A bundle with early exits (member stages, a coarse stage or both) on these images: how many images
    and fine tiles each stage ran, and its throughput at `batch` against the full ensemble's (the same
    Predictor with its exits off), measured A/B/A/B."""
    cascade, coarse = predictor.cascade, predictor.coarse
    results = [
        r for start in range(0, len(images), batch) for r in predictor.predict_batch(images[start : start + batch])
    ]
    every = predictor.grid.count  # fine tile locations per image
    tiles = [every if r.tiles_run is None else r.tiles_run for r in results]  # fine locations each image ran
    stages = []
    if coarse is not None:
        stages.append({"members": ["coarse"], "images": len(results), "tiles": len(results), "exits": 0,
                       "fine_tiles_skipped": every * len(results) - sum(tiles)})  # fmt: skip
    member_stages = cascade.stages if cascade is not None else ()
    if not member_stages:
        stages.append({"members": list(range(len(predictor.members))), "images": len(results),
                       "tiles": sum(tiles) * len(predictor.members), "exits": len(results)})  # fmt: skip
    for s, stage in enumerate(member_stages):
        reached = [n for r, n in zip(results, tiles, strict=True) if r.exit_stage >= s + 1]
        exits = sum(r.exit_stage == s + 1 for r in results)
        stages.append({"members": list(stage.members), "images": len(reached),
                       "tiles": sum(reached) * len(stage.members), "exits": exits})  # fmt: skip
    pick = cycle_batches(len(images), batch)
    rates: dict[str, list[float]] = {"cascade": [], "full": []}
    for _ in range(2):  # A/B/A/B: a drifting machine load hits both alike
        for mode in ("cascade", "full"):
            if mode == "full":
                predictor.cascade, predictor.coarse = None, None
            try:
                seconds = repeat(lambda n: predictor.predict_batch([images[i] for i in pick(n)]), batch, protocol)
            finally:
                predictor.cascade, predictor.coarse = cascade, coarse
            rates[mode].append(images_per_second(seconds, batch))
    cascade_rate, full_rate = float(np.median(rates["cascade"])), float(np.median(rates["full"]))
    return {
        "batch": batch,
        "images": len(images),
        "stages": stages,
        "fine_tiles_run_share": round(sum(tiles) / (every * len(results)), 4),
        "images_per_second": {"cascade": rates["cascade"], "full": rates["full"]},
        "speedup": round(cascade_rate / full_rate, 3),
    }


def load_scorer(job: Job):
    """(score function over a list of RGB images, the Predictor or None for the eager model)."""
    if job.device == "pytorch":
        from tilecore.bench.eager import load_eager_model

        model = load_eager_model(Path(job.bundle), job.run, job.threads)
        return model.predict, None
    predictor = Predictor(
        job.bundle,
        job.device,
        job.threads,
        job.protocol.max_batch,
        precision=job.precision,
        streams=job.streams,
        trust=job.trust or None,  # the worker loads the bundle again: it checks the signature again
    )
    return predictor.predict_batch, predictor


def measure(job: Job) -> dict:
    """Every figure of one (bundle, backend, precision): the worker's JSON answer."""
    rss_start = current_rss_mb()
    paths = job.images
    decode = StageTimer()
    with decode("decode"):
        images = [read_rgb(p) for p in paths]
    decode_ms = round(1000 * decode.seconds["decode"] / len(images), 3)
    score, predictor = load_scorer(job)
    rss_loaded = current_rss_mb()
    row: dict = {
        "label": job.label,
        "bundle": job.bundle,
        "backend": job.backend,
        "precision": job.precision,
        "provider": ", ".join(predictor.providers) if predictor else "PyTorch eager (CPU)",
        "image_hw": list(images[0].shape[:2]),
    }
    p = job.protocol
    if job.memory_only:
        for image in images[:2]:
            score([image])
        return {**row, **memory(rss_start, rss_loaded)}
    for n in range(p.warmup):
        score([images[n % len(images)]])

    table = StageTable()

    def one(n: int) -> None:
        timer = StageTimer()
        image = images[n % len(images)]
        if predictor is None:
            score([image])
            return
        started = time.perf_counter()
        predictor.predict_batch([image], timer)
        table.end_to_end_ms.append(1000 * (time.perf_counter() - started))
        table.calls.append(timer.per_image_ms(1))

    latency = latency_summary(repeat(one, 1, p))
    row["latency_batch1"] = latency
    row["stages_batch1"] = {**table.summary(), "decode_ms": decode_ms} if predictor else {"decode_ms": decode_ms}
    row["throughput"], row["throughput_with_decode"], row["backbone_only"], row["efficiency"] = {}, {}, {}, {}
    for batch in p.batches:
        pick = cycle_batches(len(images), batch)
        seconds = repeat(lambda n, pick=pick: score([images[i] for i in pick(n)]), batch, p)
        row["throughput"][str(batch)] = images_per_second(seconds, batch)
        seconds = repeat(lambda n, pick=pick: score([read_rgb(paths[i]) for i in pick(n)]), batch, p)
        row["throughput_with_decode"][str(batch)] = images_per_second(seconds, batch)
        if predictor is not None:
            alone = backbone_only(predictor, images, batch, p)
            row["backbone_only"][str(batch)] = alone
            row["efficiency"][str(batch)] = round(row["throughput"][str(batch)] / alone, 3)
    if predictor is not None and (predictor.cascade is not None or predictor.coarse is not None):  # as above
        row["cascade"] = cascade_figures(predictor, images, max(p.batches), p)
    return {**row, **memory(rss_start, rss_loaded)}


def memory(rss_start: float, rss_loaded: float) -> dict:
    return {
        "memory": {
            "rss_before_load_mb": rss_start,
            "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": gpu_memory_mb(),
        }
    }
