"""ONNX Runtime backends: `cpu`, `cuda` and `tensorrt` (its TensorRT execution provider, plans cached per
graph in the user's cache: trt_ep_cache_dir). ONNX Runtime's sessions are safe to run concurrently.

Which providers run is read from the session, not from get_available_providers(): that lists what ONNX
Runtime was built with, and when the CUDA or TensorRT provider then fails to load (a missing libcudnn,
libnvinfer, a CUDA of another major), ONNX Runtime logs it and runs the session on the CPU. A session
whose first provider is not the one asked for is "this device cannot run" (BackendMissing: `auto` moves on,
a named device is refused in one line), and `provider` is always the one that really runs.

At int8 the TensorRT EP builds from the bundle's signed-int8 Q/DQ graph (opener.graph_at_precision) with
trt_int8_enable; its profile (trt_profile_min/opt/max_shapes) spans batch 1 to the bundle's TensorRT
profile, or to the runtime's batch, so a short last batch does not rebuild the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from tilecore.runtime.artifacts import sha256_file
from tilecore.runtime.engines.base import BackendMissing, BundleGraph, EngineOptions, run_in_chunks, user_cache_dir
from tilecore.runtime.engines.tensorrt_plans import records_for
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import Profile

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


def profile_option(shape: tuple[int, ...], name: str) -> str:
    """The TensorRT EP's shape syntax: "images:4x3x32x32"."""
    return f"{name}:{'x'.join(str(d) for d in shape)}"


def choose_providers(
    device: str,
    available: list[str],
    cache_dir: Path | None,
    gpu_id: int = 0,
    int8: bool = False,
    profile: Profile | None = None,
) -> list:
    """ONNX Runtime's provider list for `device`; a device ONNX Runtime was not built with is BackendMissing.

    The TensorRT EP keeps its engines and its timing cache in `cache_dir` (trt_ep_cache_dir; None: no
    cache), so only the first session on a device pays the build; `int8` enables its int8 kernels (for a
    Q/DQ graph); `profile` becomes its explicit shape profile. Both GPU providers run on CUDA device `gpu_id`.
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
            options = {"device_id": gpu_id, **cache, "trt_fp16_enable": False, "trt_int8_enable": int8}
            if profile is not None:
                options["trt_profile_min_shapes"] = profile_option(profile.min, profile.input_name)
                options["trt_profile_opt_shapes"] = profile_option(profile.opt, profile.input_name)
                options["trt_profile_max_shapes"] = profile_option(profile.max, profile.input_name)
            providers.append((provider, options))
        elif name == "cuda":
            providers.append((provider, {"device_id": gpu_id}))
        else:
            providers.append(provider)
    return providers


def check_session_providers(running: list[str], device: str) -> str:
    """The provider that really runs the session (its first), or BackendMissing when it is not the one `device`
    asked for: ONNX Runtime fell back (module docstring)."""
    wanted = PROVIDERS[device]
    if not running or running[0] != wanted:
        actual = running[0] if running else "no provider"
        raise BackendMissing(
            f"--device {device}: ONNX Runtime could not start its {wanted} and fell back to {actual} "
            "(its log above names the library that did not load)"
        )
    return wanted


def trt_ep_profile(model: bytes | str, graph: BundleGraph | None, max_batch: int) -> Profile:
    """The TensorRT EP's batch profile: the bundle's TensorRT record's for this graph where it has one (its
    min / opt / max), else batch 1 to `max_batch` with opt = max (the runtime fills whole batches but the last)
    over the graph's own input, read by a CPU session."""
    fp32_name = graph.name.replace(".qdq.onnx", ".onnx") if graph is not None else None
    records = records_for(graph.manifest, fp32_name) if graph is not None else []
    if records:
        return records[0].profile
    probe = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0]
    item = tuple(int(d) for d in probe.shape[1:])  # [3, h, w]: only the batch axis is dynamic
    return Profile(probe.name, (1, *item), (max_batch, *item), (max_batch, *item))


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
        int8 = device == "tensorrt" and options.precision == "int8"  # the Q/DQ graph (module docstring)
        model = graph.data if graph is not None else str(path)  # the checked bytes, never the path again
        profile = None
        if device == "tensorrt" and PROVIDERS[device] in available:
            profile = trt_ep_profile(model, graph, options.max_batch)
        providers = choose_providers(device, available, cache_dir, options.gpu_id, int8, profile)
        try:
            self.session = ort.InferenceSession(model, session_options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise TilecoreError(f"engine {path.name}: cannot load ({str(exc).splitlines()[0][:200]})") from None
        self.provider = check_session_providers(self.session.get_providers(), device)
        self.cuda_device = options.gpu_id if self.provider != PROVIDERS["cpu"] else None  # knn_gpu follows it
        self.input_name = self.session.get_inputs()[0].name
        # the TensorRT EP's profile caps its batch (a larger one would rebuild the engine)
        self.max_batch = options.max_batch if profile is None else min(options.max_batch, profile.max_batch)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        return run_in_chunks(lambda x: self.session.run(None, {self.input_name: x})[0], tiles, self.max_batch)
