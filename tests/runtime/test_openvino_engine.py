"""The OpenVINO backend: same embeddings as ONNX Runtime in fp32, float32 out in bf16, a verified cache folder
of its own, and a clean fallback where OpenVINO is missing."""

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import openvino as openvino_required  # noqa: F401 - in the dev install (what CI runs): missing fails, never skips
import pytest

from tests.tiny import tiny_run
from tilecore.export.bundle import export_run
from tilecore.runtime.engines.base import BackendMissing, EngineOptions
from tilecore.runtime.engines.opener import open_engine
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openvino")
    export_run(tiny_run(root, "brick"), root / "bundle")
    return root / "bundle"


def engine_path(bundle: Path) -> Path:
    return next(bundle.glob("backbone_*.onnx"))


def tiles(count: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 3, 32, 32)).astype(np.float32)


def test_fp32_embeddings_equal_onnx_runtime(bundle: Path, tmp_path: Path) -> None:
    options = EngineOptions("openvino", threads=1, max_batch=2, precision="fp32", cache_dir=tmp_path / "cache")
    openvino = open_engine(engine_path(bundle), options)
    reference = open_engine(engine_path(bundle), EngineOptions("cpu", threads=1)).run(tiles())
    out = openvino.run(tiles())  # 5 tiles in chunks of 2: the last chunk has another batch size
    assert out.dtype == np.float32 and out.shape == reference.shape
    assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max()
    assert "OpenVINO" in openvino.provider
    assert any((tmp_path / "cache").iterdir())  # compiled blob cached where asked, not in the working dir


def test_bf16_runs_in_bf16_and_returns_float32(bundle: Path, tmp_path: Path) -> None:
    """Where the CPU lacks bf16 instructions, --precision bf16 is refused (OpenVINO would simulate it, slower
    than fp32), and the simulation the exporter measures with runs instead."""
    from tilecore.runtime.engines.openvino import cpu_has_bf16

    options = EngineOptions("openvino", precision="bf16", cache_dir=tmp_path)
    if not cpu_has_bf16():
        with pytest.raises(TilecoreError, match="no bf16 instructions"):
            open_engine(engine_path(bundle), options)
        options = EngineOptions("openvino", precision="bf16", cache_dir=tmp_path, simulated_bf16=True)
    try:
        engine = open_engine(engine_path(bundle), options)
    except TilecoreError as exc:  # no bf16 from OpenVINO at all on this CPU (no AVX-512): said so in one line
        assert "OpenVINO compiled" in str(exc)
        pytest.skip(f"OpenVINO runs no bf16 here: {exc}")
    assert "bf16" in engine.provider and ("simulated" in engine.provider) == (not cpu_has_bf16())
    reference = open_engine(engine_path(bundle), EngineOptions("cpu")).run(tiles())
    out = engine.run(tiles())
    assert out.dtype == np.float32  # kNN always gets float32
    error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert 0 < error < 0.05  # really reduced precision, and close


def test_predictor_on_openvino_matches_cpu_scores(bundle: Path, tmp_path: Path) -> None:
    images = [read_rgb(p) for p in sorted((bundle.parent / "data" / "brick" / "test").glob("*/*.png"))]
    cpu = [r.score for r in Predictor(bundle, device="cpu").predict_batch(images)]
    ov = [r.score for r in Predictor(bundle, device="openvino").predict_batch(images)]
    assert np.allclose(ov, cpu, rtol=1e-4, atol=1e-4)


def test_bf16_on_onnx_runtime_is_refused_in_one_line(bundle: Path) -> None:
    with pytest.raises(TilecoreError, match="use --device openvino"):
        open_engine(engine_path(bundle), EngineOptions("cpu", precision="bf16"))


def test_missing_openvino_is_named_and_auto_falls_back(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(BackendMissing, match="openvino package is not installed"):
        open_engine(engine_path(bundle), EngineOptions("openvino"))
    engine = open_engine(engine_path(bundle), EngineOptions("auto"))
    assert engine.provider == "CPUExecutionProvider"


def test_streams_run_chunks_in_parallel_and_keep_their_order(bundle: Path, tmp_path: Path) -> None:
    one = EngineOptions("openvino", threads=2, max_batch=2, cache_dir=tmp_path)
    two = EngineOptions("openvino", threads=2, max_batch=2, cache_dir=tmp_path, streams=2)
    reference, parallel = open_engine(engine_path(bundle), one), open_engine(engine_path(bundle), two)
    assert "2 streams" in parallel.provider and "streams" not in reference.provider
    batch = tiles(5)  # chunks of 2, 2 and 1 tiles, two in flight at a time
    np.testing.assert_allclose(parallel.run(batch), reference.run(batch), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(parallel.run(batch[3:]), reference.run(batch[3:]), rtol=1e-5, atol=1e-5)
    images = [read_rgb(p) for p in sorted((bundle.parent / "data" / "brick" / "test").glob("*/*.png"))]
    cpu = [r.score for r in Predictor(bundle, device="cpu").predict_batch(images)]
    ov = [r.score for r in Predictor(bundle, device="openvino", threads=2, streams=2).predict_batch(images)]
    assert np.allclose(ov, cpu, rtol=1e-4, atol=1e-4)


def test_streams_are_openvinos_only(bundle: Path) -> None:
    with pytest.raises(TilecoreError, match="--streams 2: parallel streams are OpenVINO's"):
        open_engine(engine_path(bundle), EngineOptions("cpu", streams=2))
    with pytest.raises(TilecoreError, match="--streams 0"):
        EngineOptions("openvino", streams=0)
    assert "2 streams" in open_engine(engine_path(bundle), EngineOptions("auto", streams=2)).provider


def only_blob(cache: Path) -> Path:
    (blob,) = cache.glob("*.blob")
    return blob


def test_corrupt_cache_blob_is_replaced_by_a_fresh_compile(bundle: Path, tmp_path: Path, caplog) -> None:
    """A blob altered on disk (weights overwritten: OpenVINO itself imports it and computes other
    embeddings) fails its sha256, is deleted, recompiled and written again; the embeddings are a fresh
    compile's, bit for bit."""
    options = EngineOptions("openvino", threads=1, max_batch=2, precision="fp32", cache_dir=tmp_path / "cache")
    fresh = open_engine(engine_path(bundle), options).run(tiles())
    blob = only_blob(tmp_path / "cache")
    np.testing.assert_array_equal(open_engine(engine_path(bundle), options).run(tiles()), fresh)  # from the cache
    data = bytearray(blob.read_bytes())
    start, end = len(data) // 50 & ~3, len(data) // 10 & ~3  # weights of the first layers
    data[start:end] = np.full((end - start) // 4, 0.01, np.float32).tobytes()
    blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tilecore"):
        np.testing.assert_array_equal(open_engine(engine_path(bundle), options).run(tiles()), fresh)
    assert any("does not match its sha256" in r.getMessage() for r in caplog.records)
    rewritten = only_blob(tmp_path / "cache").read_bytes()
    assert rewritten != bytes(data)
    assert (tmp_path / "cache" / f"{blob.name}.sha256").read_text().strip() == hashlib.sha256(rewritten).hexdigest()
    assert blob.name.startswith(hashlib.sha256(engine_path(bundle).read_bytes()).hexdigest() + "-cpu-fp32-")


def test_cache_blob_that_will_not_import_is_replaced(bundle: Path, tmp_path: Path, caplog) -> None:
    """A blob whose sidecar matches but that OpenVINO cannot import (another version's format, a blob
    written by hand) is deleted and recompiled, with one warning."""
    options = EngineOptions("openvino", threads=1, precision="fp32", cache_dir=tmp_path)
    fresh = open_engine(engine_path(bundle), options).run(tiles())
    blob = only_blob(tmp_path)
    blob.write_bytes(b"not a compiled model")
    (tmp_path / f"{blob.name}.sha256").write_text(hashlib.sha256(b"not a compiled model").hexdigest())
    with caplog.at_level(logging.WARNING, logger="tilecore"):
        np.testing.assert_array_equal(open_engine(engine_path(bundle), options).run(tiles()), fresh)
    assert [r.getMessage() for r in caplog.records if "cannot be imported" in r.getMessage()]
    assert blob.read_bytes() != b"not a compiled model"


def test_cache_keys_name_precision_and_settings_and_unwritable_cache_still_runs(bundle: Path, tmp_path: Path) -> None:
    reference = open_engine(engine_path(bundle), EngineOptions("cpu", threads=1)).run(tiles())
    for streams in (1, 2):
        options = EngineOptions("openvino", threads=1, precision="fp32", cache_dir=tmp_path / "c", streams=streams)
        open_engine(engine_path(bundle), options)
    assert len(list((tmp_path / "c").glob("*-cpu-fp32-*.blob"))) == 2  # one per compile settings
    (tmp_path / "file").write_text("")
    options = EngineOptions("openvino", threads=1, precision="fp32", cache_dir=tmp_path / "file")
    out = open_engine(engine_path(bundle), options).run(tiles())  # no cache folder possible: compiled anyway
    assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max()
