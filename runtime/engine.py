"""Backbone engines: normalised tiles [N, 3, h, w] -> patch embeddings [N, h', w', D] float32.

`open_engine(path, options, graph)` picks the backend. ONNX Runtime serves `cpu`, `cuda` and `tensorrt` (its
TensorRT execution provider, plans cached per graph in the user's cache: trt_ep_cache_dir); `openvino`
and `tensorrt-native` live in their own modules and are imported only when asked for. `auto` walks
AUTO_ORDER and takes the first backend that is present, saying which one runs. Every engine returns
float32 whatever precision it computes in, so kNN, normalisation and thresholds always run in float32.

A Predictor passes `graph` (BundleGraph): every backend then loads the bytes the manifest checked
(manifest.read_checked) instead of opening the path again, names its caches by the manifest's sha256
instead of hashing the graph again, and native TensorRT takes its plan from that same manifest. Without
it (export, tests, tools opening a bare .onnx), the backends read `path` themselves.

Every engine may be shared by threads: ONNX Runtime's sessions are safe to run concurrently, the OpenVINO
and native TensorRT engines serialise their own calls (one lock each around state a call owns).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from tilecore.runtime.artifacts import sha256_file
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import Manifest, read_checked

log = logging.getLogger("tilecore")

DEVICES = ("auto", "cpu", "cuda", "tensorrt", "tensorrt-native", "openvino")
AUTO_ORDER = ("tensorrt-native", "tensorrt", "cuda", "openvino", "cpu")
PRECISIONS = ("fp32", "bf16", "int8", "auto")
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class BackendMissing(TilecoreError):
    """A backend asked for is not installed or has no device here; `auto` moves on to the next one."""


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"
    threads: int = 0  # 0: the library's default
    max_batch: int = 4  # tiles per engine call
    precision: str = "fp32"  # fp32 | bf16 | int8 | auto (what the backend and bundle offer)
    gpu_id: int = 0
    cache_dir: Path | None = None  # compiled-model cache (OpenVINO, ORT's TensorRT EP); None: user_cache_dir
    streams: int = 1  # OpenVINO inference streams run in parallel, `threads` shared among them
    # measurement only: let OpenVINO simulate bf16 on a CPU without bf16 instructions (its bf16 numerics,
    # at a fraction of fp32's speed); a deployment on such a CPU is refused bf16
    simulated_bf16: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise TilecoreError(f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise TilecoreError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
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


def trt_ep_cache_dir(graph: Path, cache_dir: Path | None, sha256: str | None = None) -> Path | None:
    """The TensorRT EP's plan folder for `graph`: `<cache>/<graph sha256>` (`sha256`, or hashed here), so a
    graph never meets another graph's plans, and bundles stay read-only and byte for byte what the manifest
    lists. None (no cache) where it cannot be made.

    ONNX Runtime deserializes these plans without any check of its own: a plan in the folder is trusted
    as the user's own file. Deleting the folder costs one rebuild."""
    try:
        folder = (cache_dir or user_cache_dir("trt_ep")) / (sha256 or sha256_file(graph))
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home, or no graph (the session then names it): build every time
    return folder


def choose_providers(device: str, available: list[str], cache_dir: Path | None, gpu_id: int = 0) -> list:
    """ONNX Runtime's provider list for `device`; a device asked for by name but absent is BackendMissing.

    The TensorRT EP keeps its engines and its timing cache in `cache_dir` (trt_ep_cache_dir; None: no
    cache), so only the first session on a device pays the build; both GPU providers run on CUDA device
    `gpu_id`.
    """
    if device not in PROVIDERS:
        raise TilecoreError(f"ONNX Runtime device {device!r}: expected one of {', '.join(PROVIDERS)}")
    if PROVIDERS[device] not in available:
        raise BackendMissing(
            f"--device {device}: ONNX Runtime here has no {PROVIDERS[device]} (available: {', '.join(available)}); "
            "install the gpu extra with CUDA 12 / TensorRT 10 libraries, or use --device cpu"
        )
    providers: list = []
    for name in dict.fromkeys([device, "cuda", "cpu"] if device == "tensorrt" else [device, "cpu"]):
        provider = PROVIDERS[name]
        if provider not in available:
            continue
        if name == "tensorrt":
            cache = {"trt_engine_cache_enable": False, "trt_timing_cache_enable": False}
            if cache_dir is not None:
                cache = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}
                cache |= {"trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}  # default: CWD
            providers.append((provider, {"device_id": gpu_id, **cache, "trt_fp16_enable": False}))
        elif name == "cuda":
            providers.append((provider, {"device_id": gpu_id}))
        else:
            providers.append(provider)
    return providers


class OrtEngine:
    """One ONNX graph run by ONNX Runtime on the provider `device` names."""

    def __init__(self, path: Path, options: EngineOptions, device: str, graph: BundleGraph | None = None) -> None:
        if options.precision == "bf16":
            raise TilecoreError(
                f"--precision bf16: ONNX Runtime's {device} provider has no bf16 convolutions; use --device openvino"
            )
        session_options = ort.SessionOptions()
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        # ORT's idle threads spin by default and take the cores FAISS's kNN needs right after each call
        # (measured on 2 cores: ENS9 batch 1 went from 5.3 to 7.4 images/s with spinning off).
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        cache_dir = (
            trt_ep_cache_dir(path, options.cache_dir, graph.sha256 if graph else None)
            if device == "tensorrt" and PROVIDERS[device] in available
            else None
        )
        providers = choose_providers(device, available, cache_dir, options.gpu_id)
        model = graph.data if graph is not None else str(path)  # the checked bytes, never the path again
        try:
            self.session = ort.InferenceSession(model, session_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise TilecoreError(f"engine {path.name}: cannot load ({str(exc).splitlines()[0][:200]})") from None
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.max_batch = options.max_batch

    def run(self, tiles: np.ndarray) -> np.ndarray:
        return run_in_chunks(lambda x: self.session.run(None, {self.input_name: x})[0], tiles, self.max_batch)


def open_backend(path: Path, options: EngineOptions, device: str, graph: BundleGraph | None = None) -> Engine:
    """The engine for one concrete device name (never `auto`)."""
    if options.streams > 1 and device != "openvino":
        raise BackendMissing(f"--streams {options.streams}: parallel streams are OpenVINO's; use --device openvino")
    if device == "openvino":
        from tilecore.runtime.openvino_engine import OpenVinoEngine

        return OpenVinoEngine(path, options, graph)
    if device == "tensorrt-native":
        from tilecore.runtime.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, options, graph)
    return OrtEngine(path, options, device, graph)


def open_engine(path: Path, options: EngineOptions, graph: BundleGraph | None = None) -> Engine:
    """The engine for the ONNX graph at `path` on options.device; `auto` takes the first backend present.
    `graph`: the same graph from a checked bundle, loaded from its checked bytes (module docstring)."""
    if options.device != "auto":
        return open_backend(path, options, options.device, graph)
    reasons = []
    for device in AUTO_ORDER:
        try:
            engine = open_backend(path, options, device, graph)
        except BackendMissing as missing:
            log.debug("auto: %s", missing)
            reasons.append(str(missing))
            continue
        log.info("engine %s runs on %s", path.name, engine.provider)
        return engine
    raise TilecoreError(f"engine {path.name}: no backend could load it ({reasons[-1]})")  # cpu, then, was refused
