"""What the Predictor loads is what the manifest checked: each bundle file is read once, checked, and loaded
from those bytes (manifest.read_checked); a file or manifest swapped after the check changes nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import onnx
import pytest

from tests import gpu_fakes
from tilecore.runtime import predictor as predictor_module
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.manifest import read_checked, read_manifest, write_manifest

A10 = ("NVIDIA Fake A10", 8, 6)


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run exported with an fp32 TensorRT plan (built by the fake TensorRT on A10)."""
    return gpu_fakes.tensorrt_bundle(tmp_path_factory.mktemp("checked_load"), "trt", gpus=(A10,))


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(bundle, tmp_path / "b")
    return tmp_path / "b"


def images_of(bundle: Path) -> list[np.ndarray]:
    data = bundle.parent / "data" / "gravel" / "test"
    return [read_rgb(p) for p in sorted(data.glob("*/*.png"))]


def other_faiss_index(path: Path) -> bytes:
    """A valid FAISS index with the same rows and dimension as the one at `path`, but other vectors."""
    index = faiss.read_index(str(path))
    other = faiss.IndexFlatL2(index.d)
    other.add(np.full((index.ntotal, index.d), 1e3, dtype=np.float32))  # [rows, D], far from every embedding
    return faiss.serialize_index(other).tobytes()


def other_onnx_graph(path: Path) -> bytes:
    """The same valid ONNX graph with one weight changed."""
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: len(onnx.numpy_helper.to_array(t).ravel()))
    changed = onnx.numpy_helper.to_array(weight) + 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(changed.astype(np.float32), weight.name))
    return model.SerializeToString()


def test_read_checked_returns_checked_bytes_and_refuses_the_rest(trt_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_of(trt_bundle, tmp_path)
    manifest = read_manifest(bundle)
    name = manifest.members[0].indexes[0].file
    assert read_checked(bundle, manifest, name) == (bundle / name).read_bytes()
    (bundle / name).write_bytes(other_faiss_index(bundle / name))
    with pytest.raises(
        TilecoreError, match=rf"^bundle .*: {re.escape(name)} is corrupt or altered \(sha256 mismatch\)$"
    ):
        read_checked(bundle, manifest, name)
    (bundle / name).unlink()
    with pytest.raises(TilecoreError, match=rf"{re.escape(name)} is missing$"):
        read_checked(bundle, manifest, name)
    (bundle / name).symlink_to(trt_bundle / name)  # the very bytes checked, but outside the bundle
    with pytest.raises(TilecoreError, match=rf"{re.escape(name)}' is a symbolic link"):
        read_checked(bundle, manifest, name)
    (bundle / name).unlink()
    os.mkfifo(bundle / name)  # opened without blocking, refused before any read
    with pytest.raises(TilecoreError, match=rf"{re.escape(name)} is not a regular file"):
        read_checked(bundle, manifest, name)
    with pytest.raises(TilecoreError, match="'manifest.json' is not listed in the manifest's files"):
        read_checked(bundle, manifest, "manifest.json")


@pytest.mark.parametrize("victim", [".faiss", ".onnx"])
def test_file_swapped_after_the_manifest_is_read_is_refused(
    trt_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: str
) -> None:
    """A valid file of the right shape swapped in after the manifest check: once loaded silently."""
    bundle = copy_of(trt_bundle, tmp_path)
    target = next(p for p in sorted(bundle.iterdir()) if p.suffix == victim)
    swapped = other_faiss_index(target) if victim == ".faiss" else other_onnx_graph(target)
    real_read_manifest = predictor_module.read_manifest

    def read_then_swap(*args: object, **kwargs: object) -> object:
        manifest = real_read_manifest(*args, **kwargs)
        target.write_bytes(swapped)
        return manifest

    monkeypatch.setattr(predictor_module, "read_manifest", read_then_swap)
    with pytest.raises(TilecoreError, match=rf"{re.escape(target.name)} is corrupt or altered \(sha256 mismatch\)"):
        predictor_module.Predictor(bundle, device="cpu")


def test_files_swapped_while_loading_change_nothing(trt_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    """The graph and the first index overwritten as that index is deserialized, after their check: the bytes
    checked are the ones that load."""
    bundle = copy_of(trt_bundle, tmp_path)
    manifest = read_manifest(bundle)
    victims = [manifest.members[0].engine, manifest.members[0].indexes[0].file]  # the first index read
    images = images_of(trt_bundle)
    expected = [r.score for r in predictor_module.Predictor(trt_bundle, device="cpu").predict_batch(images)]
    real_deserialize, swapped = faiss.deserialize_index, []

    def swap_then_deserialize(data: np.ndarray) -> faiss.Index:
        if not swapped:
            for name in victims:
                (bundle / name).write_bytes(b"swapped after its check")
                swapped.append(name)
        return real_deserialize(data)

    monkeypatch.setattr(faiss, "deserialize_index", swap_then_deserialize)
    predictor = predictor_module.Predictor(bundle, device="cpu")
    assert swapped  # the indexes come from checked bytes, not from a second open of the path
    assert [r.score for r in predictor.predict_batch(images)] == expected


OPEN_CALL = re.compile(r'^\d+\s+(?:openat2?|open)\((?:AT_FDCWD, )?"([^"]+)"')


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the C++ libraries' opens")
def test_each_used_file_is_opened_once_and_unused_ones_never(trt_bundle: Path, tmp_path: Path) -> None:
    """strace sees every open, ONNX Runtime's and FAISS's included: a file used is opened once (its check and
    its load are one read); the TensorRT plan, unused on the CPU, is not opened at all."""
    log = tmp_path / "strace.log"
    script = f"from tilecore.runtime.predictor import Predictor; Predictor({str(trt_bundle)!r}, device='cpu')"
    command = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log), sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:120]}")
    assert done.returncode == 0, done.stderr[-2000:]
    opened: dict[str, int] = {}
    for line in log.read_text().splitlines():
        if (match := OPEN_CALL.match(line)) and Path(match.group(1)).parent == trt_bundle:
            opened[Path(match.group(1)).name] = opened.get(Path(match.group(1)).name, 0) + 1
    manifest = read_manifest(trt_bundle)
    used = {m.engine for m in manifest.members} | {r.file for m in manifest.members for r in m.indexes}
    plans = {record.engine for record in manifest.tensorrt}
    assert plans and used | plans == set(manifest.files)
    assert {name: opened.get(name, 0) for name in manifest.files} == {
        **{name: 1 for name in used},
        **{name: 0 for name in plans},
    }


def test_native_plan_comes_from_the_manifest_the_predictor_checked(
    trt_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest on disk rewritten right after the Predictor read it (no TensorRT records, re-digested):
    the native engine still loads the plan the checked manifest lists, read once and checked."""
    trt, _ = gpu_fakes.install(monkeypatch, gpus=[A10])
    bundle = copy_of(trt_bundle, tmp_path)
    real_read_manifest = predictor_module.read_manifest

    def read_then_rewrite(*args: object, **kwargs: object) -> object:
        manifest = real_read_manifest(*args, **kwargs)
        write_manifest(bundle, replace(manifest, tensorrt=()))
        return manifest

    monkeypatch.setattr(predictor_module, "read_manifest", read_then_rewrite)
    predictor = predictor_module.Predictor(bundle, device="tensorrt-native")
    assert predictor.providers == [f"TensorRT {trt.__version__} fp32 on NVIDIA Fake A10 (cuda:0)"]
    monkeypatch.undo()
    gpu_fakes.install(monkeypatch, gpus=[A10])
    tampered = shutil.copytree(trt_bundle, tmp_path / "tampered")
    (record,) = read_manifest(tampered).tensorrt
    (tampered / record.engine).write_bytes(b"not the plan that was exported")
    with pytest.raises(TilecoreError, match=rf"{re.escape(record.engine)} is corrupt or altered"):
        predictor_module.Predictor(tampered, device="tensorrt-native")


def test_openvino_compiles_the_checked_bytes_and_keys_its_cache_by_the_manifest(
    trt_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = copy_of(trt_bundle, tmp_path)
    graph = read_manifest(bundle).members[0].engine
    sha256 = read_manifest(bundle).files[graph]
    real_read_manifest = predictor_module.read_manifest

    def read_then_swap(*args: object, **kwargs: object) -> object:
        manifest = real_read_manifest(*args, **kwargs)
        (bundle / graph).write_bytes(other_onnx_graph(bundle / graph))
        return manifest

    monkeypatch.setattr(predictor_module, "read_manifest", read_then_swap)
    with pytest.raises(TilecoreError, match=rf"{re.escape(graph)} is corrupt or altered"):
        predictor_module.Predictor(bundle, device="openvino")
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images = images_of(trt_bundle)
    predictor = predictor_module.Predictor(trt_bundle, device="openvino")
    (blob,) = (tmp_path / "cache" / "tilecore" / "openvino").glob("*.blob")
    assert blob.name.startswith(f"{sha256}-cpu-fp32-")
    expected = [r.score for r in predictor_module.Predictor(trt_bundle, device="cpu").predict_batch(images)]
    np.testing.assert_allclose([r.score for r in predictor.predict_batch(images)], expected, rtol=1e-4)
