"""Backbone engines through ONNX Runtime, on the best execution provider present.

`auto` tries TensorRT, then CUDA, then the CPU, and says which one runs. TensorRT builds its plan on
first use and caches it next to the bundle (`<bundle>/trt_cache`), tied to that GPU and TensorRT version.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tilecore.runtime.errors import TilecoreError

log = logging.getLogger("tilecore")

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def choose_providers(device: str, available: list[str], cache_dir: Path) -> list:
    """The provider list for `device`; a device asked for by name but absent is an error."""
    if device not in DEVICES:
        raise TilecoreError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    wanted = ["tensorrt", "cuda", "cpu"] if device == "auto" else [device, "cpu"]
    if device != "auto" and PROVIDERS[device] not in available:
        raise TilecoreError(
            f"--device {device}: ONNX Runtime here has no {PROVIDERS[device]} (available: {', '.join(available)}); "
            "install the gpu extra with CUDA 12 / TensorRT 10 libraries, or use --device cpu"
        )
    providers: list = []
    for name in wanted:
        provider = PROVIDERS[name]
        if provider not in available or provider in [p if isinstance(p, str) else p[0] for p in providers]:
            continue
        if name == "tensorrt":
            options = {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
                "trt_fp16_enable": False,
            }
            providers.append((provider, options))
        else:
            providers.append(provider)
    return providers


class Engine:
    """One ONNX graph: normalised tiles [N, 3, h, w] -> patch embeddings [N, h', w', D] (float32)."""

    def __init__(self, path: Path, device: str = "auto", threads: int = 0, max_batch: int = 4) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = choose_providers(device, ort.get_available_providers(), path.parent / "trt_cache")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise TilecoreError(f"engine {path.name}: cannot load ({str(exc).splitlines()[0][:200]})") from None
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.max_batch = max_batch
        log.info("engine %s runs on %s", path.name, self.provider)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        chunks = [
            self.session.run(None, {self.input_name: tiles[i : i + self.max_batch]})[0]
            for i in range(0, len(tiles), self.max_batch)
        ]
        return np.concatenate(chunks)
