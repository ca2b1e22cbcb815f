"""Export -> bundle -> runtime: parity with the PyTorch model, checked files, atomic export."""

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tilecore.export import bundle as bundle_module
from tilecore.export.bundle import export_run, validation_queries
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.manifest import DIGEST_FILE, MANIFEST_FILE, read_manifest
from tilecore.runtime.predictor import Predictor
from tilecore.train.config import config_from_dict
from tilecore.train.data import load_category
from tilecore.train.ensemble import bank_path, load_bank, load_category_model
from tilecore.train.fit import train_run
from tilecore.train.model import load_embedder
from tilecore.train.synth import build_synth_dataset

RESNET = {"backbone": "resnet18", "pretrained": False, "pretrain_embed_dimension": 32, "target_embed_dimension": 16}
SETUPS = {  # the three shapes the parity promise names: a single model, a two-member ensemble, ENS9
    "SM": {"members": [{**RESNET, "layers": ["layer2", "layer3"]}]},
    "two_members": {
        "members": [{**RESNET, "layers": ["layer2", "layer3"]}, {**RESNET, "layers": ["layer1", "layer2"]}],
        "fusion": {"rule": "geometric"},
    },
    "ENS9": {"members": [{**RESNET, "layers": ["layer2", "layer3"]}], "tiling": {"preset": "ENS9"}},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle_data")
    build_synth_dataset(root, 256, n_train=8, n_test_good=3, n_test_defect=5, categories=("brick",))
    return root


@pytest.fixture(scope="module")
def runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bundle_runs")
    runs = {}
    for name, setup in SETUPS.items():
        data = {"root": str(dataset), "image_size": 128 if name == "ENS9" else 64, "val_fraction": 0.25}
        config = config_from_dict({**setup, "data": data})
        train_run(config, base / name)
        runs[name] = base / name
    return runs


def pytorch_and_runtime(run: Path, bundle: Path, dataset: Path) -> tuple:
    config = config_from_dict(json.loads((run / "config.json").read_text()))
    embedders = [load_embedder(config, run, i) for i in range(len(config.members))]
    model = load_category_model(config, run, "brick", embedders)
    samples = load_category(dataset, "brick", "mvtec", config.data.val_fraction, config.data.split_seed).test
    images = [read_rgb(s.image) for s in samples]
    labels = np.array([s.label for s in samples])
    torch_scores, torch_maps = model.predict(images)
    results = Predictor(bundle, device="cpu", cascade=False).predict_batch(images)
    runtime_scores = np.array([r.score for r in results])
    runtime_maps = np.stack([r.anomaly_map for r in results])
    return labels, torch_scores, torch_maps, runtime_scores, runtime_maps


@pytest.mark.parametrize("setup", list(SETUPS))
def test_runtime_matches_pytorch(runs: dict, dataset: Path, tmp_path: Path, setup: str) -> None:
    bundle = tmp_path / "bundle"
    export_run(runs[setup], bundle)
    labels, torch_scores, torch_maps, runtime_scores, runtime_maps = pytorch_and_runtime(runs[setup], bundle, dataset)
    score_range = torch_scores.max() - torch_scores.min()
    assert score_range > 0
    assert np.abs(runtime_scores - torch_scores).max() <= 1e-4 * score_range
    assert np.abs(runtime_maps - torch_maps).max() <= 1e-4 * (torch_maps.max() - torch_maps.min())
    assert roc_auc_score(labels, runtime_scores) == roc_auc_score(labels, torch_scores)


def test_manifest_describes_the_bundle(runs: dict, tmp_path: Path) -> None:
    manifest = export_run(runs["ENS9"], tmp_path / "b")
    assert manifest.tiling.grid == (3, 3) and manifest.tiling.tile == (64, 64)
    (member,) = manifest.members
    assert len(member.banks) == 9 and len(set(member.banks)) == 9
    assert member.distance == "euclidean" and member.scoring == "nearest"
    assert member.feature_grid == (8, 8) and member.embedding_dim == 16
    assert {(r.file, r.dim) for r in member.indexes} == {(name, 16) for name in member.banks}
    assert all(r.rows > 1 and r.recall_at_1 is None for r in member.indexes)
    raw = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    assert raw["postprocess"]["blur_sigma"] == 4.0 and raw["postprocess"]["map_rule"]["padding"] == "symmetric"
    assert manifest.postprocess.rule.blur_sigma == 4.0
    assert set(manifest.files) == {p.name for p in (tmp_path / "b").iterdir()} - {MANIFEST_FILE, DIGEST_FILE}
    assert not any(name.endswith(".pkl") or name.endswith(".pt") for name in manifest.files)
    assert read_manifest(tmp_path / "b") == manifest  # what export_run returns is what it wrote


def test_identical_backbones_share_one_engine(dataset: Path, tmp_path: Path) -> None:
    same = {**RESNET, "layers": ["layer2", "layer3"], "pretrained": True, "backbone": "tf_efficientnet_lite0"}
    same["layers"] = ["blocks.2", "blocks.4"]
    config = config_from_dict(
        {
            "data": {"root": str(dataset), "image_size": 64, "val_fraction": 0.25},
            "members": [same, {**same, "coreset_ratio": 0.2}],
        }
    )
    train_run(config, tmp_path / "run")
    manifest = export_run(tmp_path / "run", tmp_path / "b")
    assert manifest.members[0].engine == manifest.members[1].engine
    assert sum(name.endswith(".onnx") for name in manifest.files) == 1


@pytest.mark.parametrize("victim", [".faiss", ".onnx"])
def test_tampered_or_truncated_files_are_refused(runs: dict, tmp_path: Path, victim: str) -> None:
    bundle = tmp_path / "b"
    export_run(runs["SM"], bundle)
    target = next(p for p in sorted(bundle.iterdir()) if p.name.endswith(victim))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if victim == ".onnx" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(TilecoreError, match=f"{target.name} is corrupt or altered"):
        Predictor(bundle, device="cpu")
    target.unlink()
    with pytest.raises(TilecoreError, match=f"{target.name} is missing"):
        read_manifest(bundle)


def test_export_logs_each_stage_as_it_starts(runs: dict, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="tilecore"):
        export_run(runs["two_members"], tmp_path / "b")
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("export: ")]
    assert stages == [
        "export: read run (1/4)",
        "export: graphs and indexes, member 1 of 2 (2/4)",
        "export: graphs and indexes, member 2 of 2 (2/4)",
        "export: manifest (3/4)",
        "export: commit (4/4)",
    ]


def test_interrupted_export_leaves_nothing_that_loads(runs: dict, tmp_path: Path, monkeypatch) -> None:
    def killed(*args: object) -> None:
        raise KeyboardInterrupt("fake Ctrl-C in export_member_banks")  # what Ctrl-C mid-export looks like

    monkeypatch.setattr(bundle_module, "export_member_banks", killed)
    with pytest.raises(KeyboardInterrupt, match="^fake Ctrl-C in export_member_banks$"):  # propagated as raised
        export_run(runs["SM"], tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "backbone_x.onnx").write_bytes(b"partial")
    with pytest.raises(TilecoreError, match="no manifest.json"):
        read_manifest(tmp_path / "half")


def test_export_refuses_bad_requests(runs: dict, tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    with pytest.raises(TilecoreError, match="already exists"):
        export_run(runs["SM"], tmp_path / "exists")
    with pytest.raises(TilecoreError, match="--category 'wood'"):
        export_run(runs["SM"], tmp_path / "b", "wood")


def brute_force_recall(index: faiss.Index, bank: np.ndarray, queries: np.ndarray) -> float:
    """Share of queries [m, D] for which `index` finds an entry as near as the true nearest of bank [n, D]."""
    bank, found = bank.astype(np.float64), index.search(queries, 1)[1][:, 0]
    q = queries.astype(np.float64)
    exact = ((q**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * q @ bank.T).min(axis=1)  # [m]
    return float(np.mean(((bank[found] - q) ** 2).sum(1) <= exact * (1 + 1e-5) + 1e-6))


def exact_over_contents(index: faiss.Index) -> faiss.Index:
    """A flat index over the vectors `index` holds (for IVF-PQ: its codes decoded)."""
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    flat = faiss.IndexFlatL2(index.d)
    flat.add(index.reconstruct_n(0, index.ntotal))
    return flat


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_report_their_recall(runs: dict, dataset: Path, tmp_path: Path, kind: str) -> None:
    run = runs["ENS9"]
    manifest = export_run(run, tmp_path / "b", index_kind=kind)
    (member,) = manifest.members
    recalls = {r.file: r.recall_at_1 for r in member.indexes}
    assert member.index_kind == kind and set(recalls) == set(member.banks)
    embedder = load_embedder(config_from_dict(json.loads((run / "config.json").read_text())), run, 0)
    for name, recall in recalls.items():  # recomputed: the run's bank, brute-force nearest neighbours
        locations = [i for i, bank_file in enumerate(member.banks) if bank_file == name]
        bank = load_bank(bank_path(run, "brick", 0, name.removeprefix("bank_m0_").removesuffix(".faiss")))
        queries = validation_queries(run, "brick", embedder, locations)
        index = faiss.read_index(str(tmp_path / "b" / name))
        assert recall == pytest.approx(brute_force_recall(index, bank, queries))
        if kind == "hnsw":  # banks of < 64 rows: every node links to every other, HNSW's search is exhaustive
            assert len(bank) < 64 and recall == 1.0
        else:  # too few rows for a second list: one list, probed, PQ codes scanned in full
            assert (index.nlist, index.nprobe) == (1, 1)
    # On these small banks the search is exhaustive (HNSW as above; IVF-PQ has one list, probed), so the
    # runtime's scores are those of exact search over what each index holds (for IVF-PQ: its decoded codes).
    images = [read_rgb(p) for p in sorted(dataset.glob("brick/test/*/*.png"))]
    predictor = Predictor(tmp_path / "b", device="cpu")
    scores = np.array([r.score for r in predictor.predict_batch(images)])
    for scorer in {id(s): s for _, scorers in predictor.members for s in scorers}.values():
        scorer.index = exact_over_contents(scorer.index)
    np.testing.assert_allclose(scores, [r.score for r in predictor.predict_batch(images)], rtol=1e-5, atol=1e-5)


def test_killed_export_leaves_no_bundle(runs: dict, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    command = [sys.executable, "-m", "tilecore.cli", "export", str(runs["ENS9"]), "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.suffix == ".onnx" for p in tmp_path.glob(".*partial/*")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the kill came after the export finished"
    (partial,) = tmp_path.glob(".bundle.*.partial")
    with pytest.raises(TilecoreError, match="no manifest.json"):
        read_manifest(partial)
