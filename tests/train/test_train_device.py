"""Training on a device (train.device): names and refusals, the CPU path unchanged byte for byte, the torch coreset
and kNN against the NumPy and FAISS ones, AMP's float32 embeddings; on a real GPU (`-m gpu`) cuda against cpu."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.progress import Progress

from tests.cli import assert_one_line_refusal, run_cli_here, toml_text
from tests.tiny import tiny_run
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import RULE_REWEIGHTED, BankScorer
from tilecore.train.config import check_device_name, config_from_dict
from tilecore.train.coreset import approximate_greedy_coreset, greedy_coreset, torch_greedy_coreset
from tilecore.train.data import load_config_category
from tilecore.train.device import Placement, TorchFlatIndex, knn_on_device, resolve_device, resolve_placement
from tilecore.train.ensemble import bank_path, load_bank
from tilecore.train.fit import fit_bank, read_batches, train_run
from tilecore.train.model import create_embedder, load_embedder
from tilecore.train.run_dir import read_metadata

NO_GPU = not torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU visible to torch (torch.cuda.is_available() is False)")
DEVICE_EXPECTED = "expected auto, cpu, cuda or cuda:N"


def tiny_config(root: Path, device: str, **train: object):
    """tests/tiny.py's tiny setup (random-init resnet18 at 64 px, 2 x 2 tiles) on `device`."""
    member = {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False}
    return config_from_dict(
        {
            "data": {"root": str(root / "data"), "image_size": 64, "val_fraction": 0.25},
            "members": [{**member, "pretrain_embed_dimension": 32, "target_embed_dimension": 16}],
            "tiling": {"tile_size": [32], "stride": [32]},
            "train": {"device": device, **train},
        }
    )


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny synthetic dataset (data/) tests/tiny.py trains on."""
    root = tmp_path_factory.mktemp("device")
    tiny_run(root)
    shutil.rmtree(root / "run")
    return root


def clustered(n_clusters: int = 12, per_cluster: int = 40, dim: int = 256, seed: int = 0) -> torch.Tensor:
    """Well-separated clusters: no two candidate distances of the greedy steps are within float32 rounding."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 30.0
    sizes = rng.integers(per_cluster // 2, per_cluster, size=n_clusters)
    points = np.concatenate([c + rng.normal(size=(s, dim)) for c, s in zip(centres, sizes, strict=True)])
    return torch.from_numpy(points).float()


# --- names and refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_understood(name: str) -> None:
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cuda:1x", "CUDA", "cpu:0", "cuda:١", "", "mps"])
def test_malformed_device_names_refused(name: str) -> None:
    with pytest.raises(TilecoreError, match=f"train.device {name!r}: {DEVICE_EXPECTED}"):
        check_device_name(name)
    with pytest.raises(TilecoreError, match=f"config: train.device {name!r}: {DEVICE_EXPECTED}"):
        config_from_dict({"train": {"device": name}})


def test_auto_resolves_to_what_torch_sees() -> None:
    expected = torch.device("cpu") if NO_GPU else torch.device("cuda", 0)
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(TilecoreError, match=f"train.device {name!r}: torch .* sees no GPU; expected auto or cpu"):
            resolve_device(name)


def test_gpu_index_beyond_the_count_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(TilecoreError, match=r"'cuda:2': torch sees 2 CUDA GPU\(s\); expected cuda:0..cuda:1"):
        resolve_device("cuda:2")


def test_amp_modes_and_refusals() -> None:
    assert resolve_placement("cpu", "off").autocast is None
    assert resolve_placement("cpu", "bf16").autocast is torch.bfloat16
    with pytest.raises(TilecoreError, match="train.amp 'fp16' on cpu: expected off or bf16"):
        resolve_placement("cpu", "fp16")
    with pytest.raises(TilecoreError, match="train.amp 'fp32': expected one of off, bf16, fp16"):
        resolve_placement("cpu", "fp32")
    with pytest.raises(TilecoreError, match="train.amp = 'fp32'; allowed: 'off', 'bf16', 'fp16'"):
        config_from_dict({"train": {"amp": "fp32"}})


def test_cli_refuses_bad_device_and_amp_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    assert_one_line_refusal(
        run_cli_here("train", "--out", out, "--device", "gpu"), f"--device 'gpu': {DEVICE_EXPECTED}"
    )
    assert_one_line_refusal(run_cli_here("train", "--out", out, "--amp", "fp8"), "--amp 'fp8': expected one of off")
    proc = run_cli_here("train", "--out", out, "--device", "cpu", "--amp", "fp16")
    assert_one_line_refusal(proc, "train.amp 'fp16' on cpu: expected off or bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_refusal(run_cli_here("train", "--out", out, "--device", "cuda:0"), "'cuda:0': torch .* sees no GPU")
    assert not out.exists()  # refused before the run folder is made


def test_cli_flag_wins_over_the_config(tiny_data: Path, tmp_path: Path) -> None:
    raw = tiny_config(tiny_data, "cuda:7").to_dict()  # a GPU this machine lacks (8 of them: unlikely)
    config = tmp_path / "gpu.toml"
    config.write_text(
        toml_text(
            {
                "data": raw["data"],
                "members": raw["members"],
                "tiling": {"tile_size": [32]},
                "train": {"device": "cuda:7"},
            }
        )
    )
    assert_one_line_refusal(run_cli_here("train", config, "--out", tmp_path / "refused"), "train.device 'cuda:7'")
    proc = run_cli_here("train", config, "--out", tmp_path / "run", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "device: cpu" in proc.stdout + proc.stderr
    assert read_metadata(tmp_path / "run")["train_device"]["device"] == "cpu"


# --- the CPU path is today's path -----------------------------------------------------------------------------


def bank_digest(bank: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(bank, dtype=np.float32).tobytes()).hexdigest() + str(bank.shape)


def test_cpu_bank_is_byte_for_byte_the_path_without_a_device(tiny_data: Path, tmp_path: Path) -> None:
    """A run trained with device "cpu" holds the bank today's code computes: each batch embedded as fit_bank reads
    it, then approximate_greedy_coreset (the NumPy function, called directly) with the bank's seed."""
    config = tiny_config(tiny_data, "cpu")
    metadata = train_run(config, tmp_path / "run")
    assert metadata["train_device"] == {"device": "cpu", "amp": "off", "knn": "faiss cpu"}
    embedder = load_embedder(config, tmp_path / "run", 0)
    data = load_config_category(config, "gravel")
    for location, suffix in enumerate(["t0_0", "t0_1", "t1_0", "t1_1"]):
        chunks = [embedder.embed(images, [location]) for _, images in read_batches(data.train, 8, [])]
        features = np.concatenate([c.reshape(-1, c.shape[-1]) for c in chunks])  # [N, D]
        indices = approximate_greedy_coreset(torch.from_numpy(features), 0.1, seed=location)  # seed 0 + 0 + location
        expected = features[np.sort(indices)]
        stored = load_bank(bank_path(tmp_path / "run", "gravel", 0, suffix))
        assert bank_digest(stored) == bank_digest(expected)
        # and fit_bank's entry point with the embedder on the CPU, called directly
        fitted = fit_bank(config, 0, embedder, data.train, [location], [], Progress(disable=True), suffix)
        assert bank_digest(fitted) == bank_digest(expected)


def test_greedy_coreset_on_cpu_is_the_numpy_function() -> None:
    features = torch.randn(3000, 200, generator=torch.Generator().manual_seed(4))
    expected = approximate_greedy_coreset(features, 0.02, seed=5)
    assert np.array_equal(greedy_coreset(features, 0.02, seed=5, device="cpu"), expected)
    assert np.array_equal(greedy_coreset(features, 0.02, seed=5), expected)


# --- the torch coreset ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [16, 256])  # below and above projection_dim
def test_torch_coreset_picks_the_numpy_points_on_separated_input(dim: int) -> None:
    """Same projection, start and argmax rule: on well-separated clusters the same indices in the same order."""
    features = clustered(dim=dim)
    ratio = 30 / len(features)
    expected = approximate_greedy_coreset(features, ratio, seed=3)
    forced = greedy_coreset(features, ratio, seed=3, device="cpu", force_torch=True)
    assert forced.tolist() == expected.tolist()
    chunked = torch_greedy_coreset(features, ratio, seed=3, rows_per_chunk=37)  # projection chunk by chunk
    assert chunked.tolist() == expected.tolist()


def test_torch_coreset_on_random_input_within_rounding() -> None:
    """On unstructured Gaussian data two BLAS can order near-equal distances differently, so the stated tolerance
    is: the same starting point and first 20 picks, 95% of the selected set shared, and a covering radius (largest
    distance of a point to its nearest pick, in the projection) within 1%."""
    features = torch.randn(6000, 384, generator=torch.Generator().manual_seed(6))
    numpy_picks = approximate_greedy_coreset(features, 0.02, seed=1)
    torch_picks = torch_greedy_coreset(features, 0.02, seed=1)
    assert numpy_picks[:20].tolist() == torch_picks[:20].tolist()
    assert len(set(numpy_picks.tolist()) & set(torch_picks.tolist())) >= 0.95 * len(numpy_picks)
    projection = torch.randn(384, 128, generator=torch.Generator().manual_seed(1)) / np.sqrt(128)
    points = (features @ projection).numpy()

    def radius(picks: np.ndarray) -> float:
        return float(np.sqrt(((points[:, None] - points[picks][None]) ** 2).sum(-1)).min(axis=1).max())

    assert radius(torch_picks) == pytest.approx(radius(numpy_picks), rel=0.01)


def test_torch_coreset_reports_progress_and_refuses_like_numpy() -> None:
    seen: list[tuple[int, int]] = []
    picks = torch_greedy_coreset(torch.randn(500, 8), 0.1, on_progress=lambda done, total: seen.append((done, total)))
    assert len(set(picks.tolist())) == len(picks) == 50
    assert seen[-1] == (50, 50) and all(total == 50 for _, total in seen)
    assert torch_greedy_coreset(torch.randn(10, 4), 1.0).tolist() == list(range(10))
    with pytest.raises(TilecoreError, match="coreset ratio 0.0"):
        torch_greedy_coreset(torch.randn(10, 4), 0.0)
    with pytest.raises(TilecoreError, match=r"coreset: features of shape \(0, 4\)"):
        torch_greedy_coreset(torch.zeros(0, 4), 0.5)


# --- kNN ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, k", [("nearest", 1), (RULE_REWEIGHTED, 3)])
def test_torch_index_scores_like_faiss(rule: str, k: int) -> None:
    """Exact search both: the same nearest ids, distances within float32 rounding of |q|^2 + |b|^2 - 2 q.b."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(700, 24)).astype(np.float32)
    embeddings = rng.normal(size=(3, 5, 6, 24)).astype(np.float32)  # [B, h, w, D]
    faiss_scorer = BankScorer.from_bank(bank, rule, k)
    torch_scorer = BankScorer.from_bank(bank, rule, k)
    torch_scorer.index = TorchFlatIndex(bank, torch.device("cpu"))
    torch_scorer.index.queries_per_chunk = 7  # several chunks
    squared_f, ids_f = faiss_scorer.index.search(embeddings.reshape(-1, 24), 4)
    squared_t, ids_t = torch_scorer.index.search(embeddings.reshape(-1, 24), 4)
    assert squared_t.dtype == np.float32 and ids_t.dtype == np.int64
    assert np.array_equal(ids_t, ids_f)
    np.testing.assert_allclose(squared_t, squared_f, rtol=1e-5, atol=1e-4)
    for ours, theirs in zip(torch_scorer.score(embeddings), faiss_scorer.score(embeddings), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_cpu_calibration_keeps_the_faiss_indexes() -> None:
    scorer = BankScorer.from_bank(np.eye(4, dtype=np.float32))
    index = scorer.index
    assert knn_on_device([[scorer, scorer]], Placement(torch.device("cpu"))) == "faiss cpu"
    assert scorer.index is index


# --- AMP ------------------------------------------------------------------------------------------------------


def test_bf16_autocast_embeds_in_float32_and_changes_only_the_backbone(tiny_data: Path) -> None:
    config = tiny_config(tiny_data, "cpu", amp="bf16")
    embedder, _ = create_embedder(config, 0)
    images = [np.random.default_rng(i).integers(0, 255, size=(64, 64, 3), dtype=np.uint8) for i in range(2)]
    full = embedder.embed(images)  # [B, T, h, w, D]
    placement = resolve_placement("cpu", "bf16")
    embedder.place(placement.device, placement.autocast)
    reduced = embedder.embed(images)
    assert reduced.dtype == np.float32 and reduced.shape == full.shape
    scale = np.abs(full).max()
    assert 0 < np.abs(reduced - full).max() < 0.02 * scale  # autocast ran (bf16 differs), and stayed close
    maps = embedder.net.backbone_maps(torch.zeros(1, 3, 32, 32))
    assert all(m.dtype == torch.float32 for m in maps)  # the head's input
    data = load_config_category(config, "gravel")
    bank = fit_bank(config, 0, embedder, data.train[:3], [0], [], Progress(disable=True), "amp")
    assert bank.dtype == np.float32


# --- on a real GPU (pytest -m gpu) ----------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_gpu_embeddings_close_to_cpu(tiny_data: Path) -> None:
    """float32 with TF32 off: cuDNN's convolutions against the CPU's within 1e-4 of the embeddings' scale."""
    config = tiny_config(tiny_data, "cuda")
    images = [np.random.default_rng(i).integers(0, 255, size=(64, 64, 3), dtype=np.uint8) for i in range(3)]
    on_cpu, _ = create_embedder(config, 0)
    expected = on_cpu.embed(images)
    placement = resolve_placement("cuda", "off")
    on_gpu = on_cpu.place(placement.device, placement.autocast)
    got = on_gpu.embed(images)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.gpu
@needs_gpu
def test_gpu_coreset_and_knn_match_cpu() -> None:
    features = clustered()
    ratio = 30 / len(features)
    expected = approximate_greedy_coreset(features, ratio, seed=3)
    assert greedy_coreset(features, ratio, seed=3, device="cuda").tolist() == expected.tolist()
    bank = features[:200].numpy()
    queries = features[200:].numpy()
    squared_f, ids_f = BankScorer.from_bank(bank).index.search(queries, 2)
    squared_t, ids_t = TorchFlatIndex(bank, torch.device("cuda", 0)).search(queries, 2)
    assert np.array_equal(ids_t[:, 0], ids_f[:, 0])
    np.testing.assert_allclose(squared_t, squared_f, rtol=1e-4, atol=1e-2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_run_matches_cpu_run(tiny_data: Path, tmp_path: Path) -> None:
    """The tiny run on cuda and on cpu: banks of the same shape within 1e-4 of their scale where the coreset picked
    the same rows, and the same image AUROC up to one of its 6 (good, defect) pairs (1/6) reordered by rounding."""
    from tilecore.train.evaluate import evaluate_run

    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path / device
        metadata = train_run(tiny_config(tiny_data, device), runs[device])
        assert metadata["train_device"]["device"] == ("cpu" if device == "cpu" else "cuda:0")
    assert read_metadata(runs["cuda"])["train_device"]["knn"] in ("faiss cuda:0", "torch cuda:0")
    for suffix in ["t0_0", "t0_1", "t1_0", "t1_1"]:
        cpu_bank, gpu_bank = (load_bank(bank_path(runs[d], "gravel", 0, suffix)) for d in ("cpu", "cuda"))
        assert cpu_bank.shape == gpu_bank.shape
        close = np.abs(cpu_bank - gpu_bank).max(axis=1) <= 1e-4 * np.abs(cpu_bank).max()
        assert close.mean() >= 0.9  # rows picked alike are equal within rounding
    aurocs = [evaluate_run(runs[d])["categories"]["gravel"]["image_auroc"] for d in ("cpu", "cuda")]
    assert abs(aurocs[0] - aurocs[1]) <= 1 / 6 + 1e-9
