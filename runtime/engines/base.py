"""What every backend shares: EngineOptions, BundleGraph, the Engine protocol, BackendMissing.

A Predictor passes `graph` (BundleGraph): every backend then loads the bytes the manifest checked
(manifest.read_checked) instead of opening the path again, names its caches by the manifest's sha256
instead of hashing the graph again, and native TensorRT takes its plan from that same manifest. Without
it (export, tests, tools opening a bare .onnx), the backends read `path` themselves.

Every engine returns float32 whatever precision it computes in, so kNN, normalisation and thresholds
always run in float32. Every engine may be shared by threads: ONNX Runtime's sessions are safe to run
concurrently, the OpenVINO and native TensorRT engines serialise their own calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from tilecore.runtime.engines.table import check_device, check_run_precision
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import Manifest, read_checked


class BackendMissing(TilecoreError):
    """A backend asked for is not installed or has no device here; `auto` moves on to the next one."""


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"
    threads: int = 0  # 0: the library's default
    max_batch: int = 4  # tiles per engine call
    precision: str = "fp32"  # one of table.RUN_PRECISIONS
    gpu_id: int = 0
    cache_dir: Path | None = None  # compiled-model cache (OpenVINO, ORT's TensorRT EP); None: user_cache_dir
    streams: int = 1  # OpenVINO inference streams run in parallel, `threads` shared among them
    # measurement only: let OpenVINO simulate bf16 on a CPU without bf16 instructions (its bf16 numerics,
    # at a fraction of fp32's speed); a deployment on such a CPU is refused bf16
    simulated_bf16: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)
        check_run_precision(self.precision)
        if self.max_batch < 1:
            raise TilecoreError(f"max batch {self.max_batch}: expected >= 1")
        if self.streams < 1:
            raise TilecoreError(f"--streams {self.streams}: expected >= 1")


@dataclass
class BundleGraph:
    """A graph of a bundle whose manifest the caller has read and trusts (the Predictor's): `sha256` names it
    in compiled-model caches, `data` is its bytes, read once on first use and checked against that sha256."""

    bundle: Path
    manifest: Manifest  # also the source of native TensorRT's records and plans
    name: str  # the graph's file name in the bundle

    @property
    def sha256(self) -> str:
        return self.manifest.files[self.name]

    @cached_property
    def data(self) -> bytes:
        return read_checked(self.bundle, self.manifest, self.name)


class Engine(Protocol):
    provider: str  # what actually runs, e.g. "CPUExecutionProvider" or "OpenVINO CPU bf16"
    max_batch: int

    def run(self, tiles: np.ndarray) -> np.ndarray: ...


def run_in_chunks(infer, tiles: np.ndarray, max_batch: int) -> np.ndarray:
    """Call infer on at most max_batch tiles at a time; float32 out whatever the engine computed in."""
    chunks = [infer(tiles[i : i + max_batch]) for i in range(0, len(tiles), max_batch)]
    return np.concatenate(chunks).astype(np.float32, copy=False)


def user_cache_dir(kind: str) -> Path:
    """`$XDG_CACHE_HOME/tilecore/<kind>` (default ~/.cache): compiled engines, never the bundle or the CWD."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tilecore" / kind
