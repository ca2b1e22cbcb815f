"""ONNX Runtime backends: `cpu`, `cuda` and `tensorrt` (its TensorRT execution provider, plans cached per
graph in the user's cache: trt_ep_cache_dir). ONNX Runtime's sessions are safe to run concurrently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from tilecore.runtime.artifacts import sha256_file
from tilecore.runtime.engines.base import BackendMissing, BundleGraph, EngineOptions, run_in_chunks, user_cache_dir
from tilecore.runtime.errors import TilecoreError

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


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
