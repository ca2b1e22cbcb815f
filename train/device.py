"""Where training runs: `--device` / `[train] device`, `--amp` / `[train] amp`, and kNN beside the embedder.

The backbone, the PatchCore head, the greedy coreset and calibration's kNN run on the chosen device; banks,
statistics and everything written to the run folder stay float32 NumPy. On the CPU nothing changes: the same
NumPy coreset and FAISS CPU index as without a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import BankScorer
from tilecore.train.config import check_device_name

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KNN_CHUNK_BYTES = 256 * 1024 * 1024  # one query chunk's [c, n] distance matrix on the device


@dataclass(frozen=True)
class Placement:
    """The device training runs on and the backbone's autocast dtype (None: float32 throughout)."""

    device: torch.device
    amp: str = "off"

    @property
    def autocast(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]

    def to_dict(self) -> dict[str, str | bool]:
        """What run metadata records (`train_device`); on CUDA also that TF32 was off (resolve_placement)."""
        recorded: dict[str, str | bool] = {"device": str(self.device), "amp": self.amp}
        return {**recorded, "tf32": False} if self.device.type == "cuda" else recorded


def resolve_device(name: str, where: str = "train.device") -> torch.device:
    """auto -> cuda:0 when torch sees a GPU, else cpu; cpu; cuda[:N] only when that GPU is there."""
    check_device_name(name, where)
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = int(name.partition(":")[2] or 0)
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise TilecoreError(f"{where} {name!r}: torch {torch.__version__} ({built}) sees no GPU; expected auto or cpu")
    count = torch.cuda.device_count()
    if index >= count:
        raise TilecoreError(f"{where} {name!r}: torch sees {count} CUDA GPU(s); expected cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_placement(device: str, amp: str) -> Placement:
    """The checked placement for `[train] device` and `[train] amp` (fp16 autocast needs a CUDA device)."""
    resolved = resolve_device(device)
    if amp not in AMP_DTYPES:
        raise TilecoreError(f"train.amp {amp!r}: expected one of {', '.join(AMP_DTYPES)}")
    if amp == "fp16" and resolved.type == "cpu":
        raise TilecoreError(f"train.amp 'fp16' on {resolved}: expected off or bf16 (fp16 autocast needs a CUDA device)")
    if amp == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TilecoreError(f"train.amp 'bf16' on {resolved}: this GPU has no bf16; expected off or fp16")
    if resolved.type == "cuda":
        # float32 means float32: cuDNN would otherwise run the backbone's convolutions in TF32 on Ampere and
        # later, ~1e-3 relative off the CPU's banks. Process-wide; training is one process.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return Placement(resolved, amp)


class TorchFlatIndex:
    """Exact L2 search over a bank held on a torch device, with FAISS's `search` contract: queries [m, D] ->
    (squared L2 distances [m, k] float32, bank ids [m, k] int64), |q|^2 + |b|^2 - 2 q.b like FAISS's BLAS path.
    Queries go in chunks so one chunk's distance matrix stays under KNN_CHUNK_BYTES."""

    def __init__(self, bank: np.ndarray, device: torch.device) -> None:
        self.bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)).to(device)  # [n, D]
        self.bank_norms = (self.bank * self.bank).sum(dim=1)  # [n]
        self.ntotal, self.d = self.bank.shape
        self.device = device
        self.queries_per_chunk = max(1, KNN_CHUNK_BYTES // (4 * self.ntotal))

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.ntotal)
        on_device = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)  # [m, D]
        squared, ids = [], []
        for chunk in on_device.split(self.queries_per_chunk):
            norms = (chunk * chunk).sum(dim=1, keepdim=True)  # [c, 1]
            distances = torch.addmm(norms + self.bank_norms, chunk, self.bank.T, alpha=-2.0)  # [c, n]
            values, indices = torch.topk(distances, k, dim=1, largest=False)  # [c, k], nearest first
            squared.append(values.cpu())
            ids.append(indices.cpu())
        return torch.cat(squared).numpy(), torch.cat(ids).numpy()


def knn_on_device(scorers: list[list[BankScorer]], placement: Placement) -> str:
    """Move calibration's kNN to the training device: FAISS GPU indexes where faiss-gpu is installed, else exact
    chunked torch distances (TorchFlatIndex). On the CPU the FAISS CPU indexes stay. Returns where kNN runs."""
    device = placement.device
    if device.type == "cpu":
        return "faiss cpu"
    flat = [scorer for per_location in scorers for scorer in per_location]
    from tilecore.runtime.knn_gpu import place_on_device

    where = place_on_device(flat, "cuda", device.index or 0)
    if where != "cpu":
        return f"faiss {where}"
    moved: dict[int, TorchFlatIndex] = {}
    for scorer in {id(s): s for s in flat}.values():  # stacked banks repeat one scorer
        if id(scorer.index) not in moved:
            moved[id(scorer.index)] = TorchFlatIndex(scorer.index.reconstruct_n(0, scorer.index.ntotal), device)
        scorer.index = moved[id(scorer.index)]
    return f"torch {device}"
