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


def neighbourhood_locations(grid: TileGrid, radius: int) -> list[list[int]]:
    """For each tile location (r, c), in grid order, the locations (r', c') with max(|r - r'|, |c - c'|) <=
    radius, in grid order: 0 gives each location alone, radius >= the grid's size gives every location."""
    cells = grid.locations()
    return [
        [j for j, (r2, c2) in enumerate(cells) if max(abs(r - r2), abs(c - c2)) <= radius] for r, c in cells
    ]


def union_name(grid: TileGrid, locations: list[int]) -> str:
    """The bank name suffix of the union of a neighbourhood's banks: the rectangle of locations it covers."""
    rows = [j // grid.cols for j in locations]
    cols = [j % grid.cols for j in locations]
    return f"r{min(rows)}-{max(rows)}_c{min(cols)}-{max(cols)}"


def search_banks(config: Config, run_dir: Path, category: str, member: int) -> list[tuple[str, list[int], np.ndarray]]:
    """(name suffix, tile locations it serves, bank [n, D]) for each bank member `member`'s tile locations are
    scored against: the stored banks (bank_groups) as they are, or with tiling.neighbourhood > 0 for each
    location the row concatenation, in location order, of its neighbourhood's stored banks. Locations whose
    neighbourhoods are the same share one union. PyTorch scoring, calibration and export all read banks here."""
    from tilecore.train.model import grid_for

    grid, _, stacked = grid_for(config)
    groups = bank_groups(grid, stacked)
    stored = [load_bank(bank_path(run_dir, category, member, suffix)) for suffix, _ in groups]  # each [n_i, D]
    radius = config.tiling.neighbourhood
    if radius == 0 or stacked or grid.count == 1:  # stacked: config validation refuses a neighbourhood
        return [(suffix, locations, bank) for (suffix, locations), bank in zip(groups, stored, strict=True)]
    served: dict[tuple[int, ...], list[int]] = {}  # neighbourhood -> the locations whose neighbourhood it is
    for location, neighbours in enumerate(neighbourhood_locations(grid, radius)):
        served.setdefault(tuple(neighbours), []).append(location)
    return [
        (union_name(grid, list(neighbours)), locations, np.concatenate([stored[j] for j in neighbours]))  # [sum n_j, D]
        for neighbours, locations in served.items()
    ]


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
    scorers: list[list[BankScorer]]  # [member][tile location]; a stacked bank or a shared union repeats one scorer
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

    grid, _, _ = grid_for(config)
    scorers = []
    for i, member in enumerate(config.members):
        per_location: list[BankScorer | None] = [None] * grid.count
        for _, locations, bank in search_banks(config, run_dir, category, i):
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
