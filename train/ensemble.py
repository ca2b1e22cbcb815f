"""A trained ensemble for one category: members' embedders, their banks per tile location, calibration.

Scoring runs the members' embedders in PyTorch and everything after them (kNN, maps, merging,
normalisation, fusion) through tilecore.runtime, the same code the deployed runtime uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilecore.runtime.cascade import Cascade, CascadeOutputs, run_cascade
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import BankScorer
from tilecore.runtime.merge import MemberCalibration, TileOutputs, ensemble_result, score_locations
from tilecore.runtime.tiling import TileGrid
from tilecore.train.config import Config
from tilecore.train.model import Embedder
from tilecore.train.run_dir import BANKS_DIR, CALIBRATION_FILE


def bank_groups(grid: TileGrid, stacked: bool) -> list[tuple[str, list[int]]]:
    """(bank name suffix, tile locations it serves): one per location, or one for all when stacked."""
    if stacked:
        return [("stacked", list(range(grid.count)))]
    return [(f"t{r}_{c}", [i]) for i, (r, c) in enumerate(grid.locations())]


def bank_path(run_dir: Path, category: str, member: int, suffix: str) -> Path:
    return run_dir / category / BANKS_DIR / f"m{member}_{suffix}.safetensors"


def save_bank(path: Path, bank: np.ndarray) -> None:
    from safetensors.numpy import save_file

    from tilecore.runtime.artifacts import atomic_write

    atomic_write(path, lambda tmp: save_file({"bank": bank.astype(np.float32)}, str(tmp)))


def load_bank(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise TilecoreError(f"memory bank {path}: file not found; run `tilecore train` first")
    return load_file(str(path))["bank"]


@dataclass
class CategoryModel:
    config: Config
    grid: TileGrid
    embedders: list[Embedder]
    scorers: list[list[BankScorer]]  # [member][tile location]; stacked banks repeat one scorer
    calibrations: list[MemberCalibration] | None = None
    thresholds: dict | None = None

    def raw_outputs(self, images: list[np.ndarray]) -> list[TileOutputs]:
        """Each member's un-normalised tile outputs for a batch of RGB images."""
        outputs = []
        for embedder, scorers in zip(self.embedders, self.scorers, strict=True):
            normalised = embedder.normalise(images)
            chunk = max(1, embedder.tiles_per_pass // len(images))  # tile locations embedded at a time
            outputs.append(
                score_locations(
                    lambda locations, n=normalised, e=embedder: e.embed_normalised(n, locations),
                    scorers,
                    self.grid,
                    self.config.tiling.blur_sigma,
                    chunk,
                )
            )
        return outputs

    def predict(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """RGB images -> fused, calibrated (image scores [B], anomaly maps [B, S, S])."""
        if self.calibrations is None:
            raise TilecoreError("model: not calibrated yet; run `tilecore train` to finish the category")
        return ensemble_result(self.raw_outputs(images), self.grid, self.config.merge_rule(), self.calibrations)

    def cascade_from(self, raw: list[TileOutputs], cascade: Cascade) -> CascadeOutputs:
        """What `cascade` gives for a batch whose members' raw outputs `raw` are all known (runtime.cascade:
        the staged loop the runtime runs, each stage reading only the outputs of the images that reach it)."""
        if self.calibrations is None or self.thresholds is None:
            raise TilecoreError("model: not calibrated yet; run `tilecore train` to finish the category")

        def member_outputs(m: int, images: list[int]) -> TileOutputs:
            return TileOutputs(raw[m].scores[images], raw[m].maps[images])

        rule = self.config.merge_rule()
        count = len(raw[0].scores)
        return run_cascade(count, member_outputs, cascade, self.grid, rule, self.calibrations, self.thresholds["image"])


def load_category_model(
    config: Config, run_dir: Path, category: str, embedders: list[Embedder], calibrated: bool = True
) -> CategoryModel:
    from tilecore.train.model import grid_for

    grid, _, stacked = grid_for(config)
    scorers = []
    for i, member in enumerate(config.members):
        per_location: list[BankScorer | None] = [None] * grid.count
        for suffix, locations in bank_groups(grid, stacked):
            bank = load_bank(bank_path(run_dir, category, i, suffix))
            scorer = BankScorer.from_bank(bank, member.scoring, member.num_neighbours)
            for location in locations:
                per_location[location] = scorer
        scorers.append(per_location)
    model = CategoryModel(config, grid, embedders, scorers)
    if calibrated:
        path = run_dir / category / CALIBRATION_FILE
        if not path.is_file():
            raise TilecoreError(f"run {run_dir}: {category} is not calibrated; run `tilecore train` to finish it")
        raw = json.loads(path.read_text())
        model.calibrations = [MemberCalibration.from_dict(m) for m in raw["members"]]
        model.thresholds = raw["thresholds"]
    return model
