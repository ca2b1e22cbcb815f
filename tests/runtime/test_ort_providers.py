"""ONNX Runtime's GPU providers as they really behave: a provider ORT was built with can still fail to load
(ORT then runs the session on the CPU), so the engine reads the session's providers, `auto` moves on and a
named device is refused; and the TensorRT EP's int8 and shape-profile options. Through gpu_fakes.FakeOrt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import gpu_fakes
from tilecore.export.bundle import export_run
from tilecore.export.tensorrt_build import TensorRTBuild
from tilecore.runtime.engines.base import BackendMissing, EngineOptions
from tilecore.runtime.engines.onnx_runtime import OrtEngine
from tilecore.runtime.engines.opener import open_engine
from tilecore.runtime.engines.tensorrt_plans import qdq_graph_name
from tilecore.runtime.manifest import read_manifest
from tilecore.runtime.predictor import Predictor

TRT, CUDA, CPU = gpu_fakes.ALL_ORT_PROVIDERS
A10 = ("NVIDIA Fake A10", 8, 6)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run exported plain, and with a TensorRT int8 plan (which keeps its signed-int8 Q/DQ graph)."""
    root = tmp_path_factory.mktemp("ort_providers")
    run = gpu_fakes.tiny_run(root)
    export_run(run, root / "plain")
    with pytest.MonkeyPatch.context() as patch:
        gpu_fakes.install(patch, gpus=[A10])
        export_run(run, root / "int8", tensorrt=TensorRTBuild(int8=True, max_batch=4, calibration_tiles=16))
    return {"plain": root / "plain", "int8": root / "int8"}


def graph_of(bundle: Path) -> Path:
    return bundle / read_manifest(bundle).members[0].engine


@pytest.mark.parametrize(("device", "loads"), [("cuda", set()), ("tensorrt", {CUDA}), ("tensorrt", set())])
def test_a_provider_that_fails_to_load_is_refused_by_name(bundles: dict, monkeypatch, device: str, loads: set) -> None:
    gpu_fakes.install_ort(monkeypatch, loads=loads)  # built with every provider; only `loads` start
    fell_to = CUDA if CUDA in loads and device == "tensorrt" else CPU
    wanted = {"cuda": CUDA, "tensorrt": TRT}[device]
    with pytest.raises(BackendMissing, match=rf"^--device {device}: ONNX Runtime could not start its {wanted} and "
                                             rf"fell back to {fell_to} ") as caught:  # fmt: skip
        open_engine(graph_of(bundles["plain"]), EngineOptions(device))
    assert "\n" not in str(caught.value)


def test_auto_moves_past_gpu_providers_that_did_not_load(bundles: dict, monkeypatch) -> None:
    """ORT built with TensorRT and CUDA, neither loading: auto goes on to OpenVINO (then the CPU), and says
    what runs; the kNN stays on the CPU beside it."""
    fake = gpu_fakes.install_ort(monkeypatch, loads=set())
    predictor = Predictor(bundles["plain"], device="auto")
    assert len(predictor.providers) == 1 and predictor.providers[0].startswith("OpenVINO CPU")
    assert predictor.knn_device == "cpu"
    asked = [session.asked[0][0] if isinstance(session.asked[0], tuple) else session.asked[0] for session in
             fake.sessions if session.asked]  # fmt: skip
    assert TRT in asked and CUDA in asked  # both were tried, neither is reported


def test_the_provider_that_runs_is_the_one_reported(bundles: dict, monkeypatch) -> None:
    gpu_fakes.install_ort(monkeypatch, loads={CUDA})
    engine = open_engine(graph_of(bundles["plain"]), EngineOptions("auto"))
    assert engine.provider == CUDA and engine.cuda_device == 0  # TensorRT EP refused, CUDA EP runs
    predictor = Predictor(bundles["plain"], device="cuda", gpu_id=0)
    assert predictor.providers == [CUDA]
    tiles = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    cpu = OrtEngine(graph_of(bundles["plain"]), EngineOptions("cpu"), "cpu")
    np.testing.assert_allclose(engine.run(tiles), cpu.run(tiles), rtol=1e-6)


def test_tensorrt_ep_int8_runs_the_signed_qdq_graph_with_the_bundles_profile(bundles: dict, monkeypatch) -> None:
    fake = gpu_fakes.install_ort(monkeypatch, loads={TRT, CUDA})
    bundle = bundles["int8"]
    manifest = read_manifest(bundle)
    qdq = qdq_graph_name(manifest.members[0].engine)
    assert qdq in manifest.files  # kept by the TensorRT export
    predictor = Predictor(bundle, device="tensorrt", precision="int8", max_batch=16)
    assert predictor.providers == [TRT]
    (session,) = [s for s in fake.sessions if len(s.asked) > 1]
    (_, options), *_ = session.asked
    assert options["trt_int8_enable"] is True and options["trt_fp16_enable"] is False
    assert options["trt_profile_min_shapes"] == "images:1x3x32x32"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "images:4x3x32x32"
    (engine,) = predictor.engines.values()
    assert engine.max_batch == 4  # the profile caps the batch: no batch outside it, no rebuild
    assert session.model_sha256 == manifest.files[qdq]  # the Q/DQ graph, not the NNCF uint8 graph

    fp32 = Predictor(bundle, device="tensorrt", max_batch=2)
    (_, options), *_ = [s for s in fake.sessions if len(s.asked) > 1][-1].asked
    assert options["trt_int8_enable"] is False
    assert fp32.engines[manifest.members[0].engine].max_batch == 2


def test_tensorrt_ep_profile_without_a_tensorrt_record_follows_the_runtime_batch(bundles: dict, monkeypatch) -> None:
    fake = gpu_fakes.install_ort(monkeypatch, loads={TRT, CUDA})
    engine = open_engine(graph_of(bundles["plain"]), EngineOptions("tensorrt", max_batch=3))
    (_, options), *_ = fake.sessions[-1].asked
    assert options["trt_profile_min_shapes"] == "images:1x3x32x32"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == "images:3x3x32x32"
    assert engine.max_batch == 3
    with pytest.raises(BackendMissing, match=r"^--device tensorrt --precision int8: the bundle has no signed-int8 "
                                             r"Q/DQ graph of backbone_\w+\.onnx"):  # fmt: skip
        Predictor(bundles["plain"], device="tensorrt", precision="int8")
