"""`Predictor(bundle).predict(image)`: the deployed model, with no torch anywhere.

Image -> tiles (runtime preprocessing) -> each member's engine -> kNN per tile location (FAISS) ->
maps, merging, seam smoothing, normalisation and fusion (runtime.merge) -> threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from tilecore.runtime.engine import Engine
from tilecore.runtime.knn import BankScorer
from tilecore.runtime.manifest import read_manifest
from tilecore.runtime.merge import MemberCalibration, MergeRule, ensemble_result, score_locations
from tilecore.runtime.preprocess import Preprocess, normalise_rgb, tiles_at
from tilecore.runtime.tiling import TileGrid


@dataclass
class Result:
    score: float  # fused, normalised image score
    label: bool  # score >= the calibrated image threshold
    anomaly_map: np.ndarray  # [H, W] float32 at the bundle's image size
    mask: np.ndarray  # [H, W] bool: anomaly_map >= the calibrated pixel threshold
    timings_ms: dict[str, float] = field(default_factory=dict)


def grid_from_manifest(tiling: dict) -> TileGrid:
    (h, w), (th, tw), (sh, sw) = tiling["image"], tiling["tile"], tiling["stride"]
    return TileGrid(h, w, th, tw, sh, sw)


def preprocess_from_manifest(raw: dict) -> Preprocess:
    return Preprocess(raw["height"], raw["width"], tuple(raw["mean"]), tuple(raw["std"]))


def move_indexes_to_gpu(scorers: list[BankScorer], device: str, gpu_id: int) -> str:
    """Put every index on one GPU through one shared FAISS resource object, when faiss-gpu sees a GPU."""
    if device == "cpu" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= gpu_id:
        return "cpu"
    resources = faiss.StandardGpuResources()  # one for all indexes: a resource object per index exhausts memory
    resources.setTempMemory(256 * 1024 * 1024)
    moved: dict[int, faiss.Index] = {}
    for scorer in scorers:  # stacked banks share one scorer; move each index once
        if id(scorer.index) not in moved:
            moved[id(scorer.index)] = faiss.index_cpu_to_gpu(resources, gpu_id, scorer.index)
        scorer.index = moved[id(scorer.index)]
    return f"cuda:{gpu_id}"


class Predictor:
    def __init__(
        self, bundle: str | Path, device: str = "auto", threads: int = 0, max_batch: int = 4, gpu_id: int = 0
    ) -> None:
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle)
        if threads:
            faiss.omp_set_num_threads(threads)
        m = self.manifest
        self.grid = grid_from_manifest(m["tiling"])
        self.input_hw = tuple(m["tiling"]["backbone_input"])
        rule_fields = ("image_score", "normalisation", "fusion", "blur_sigma", "seam_band", "seam_sigma")
        self.rule = MergeRule(**{k: m["postprocess"][k] for k in rule_fields})
        self.calibrations = [MemberCalibration.from_dict(c) for c in m["calibration"]["members"]]
        self.thresholds = m["thresholds"]
        self.engines = {
            name: Engine(self.bundle / name, device, threads, max_batch) for name in {x["engine"] for x in m["members"]}
        }
        indexes = {name: faiss.read_index(str(self.bundle / name)) for x in m["members"] for name in set(x["banks"])}
        self.members = []
        for member in m["members"]:
            scorers = {
                name: BankScorer.from_index(indexes[name], member["scoring"], member["num_neighbours"])
                for name in set(member["banks"])
            }
            self.members.append((member, [scorers[name] for name in member["banks"]]))
        self.knn_device = move_indexes_to_gpu([s for _, scorers in self.members for s in scorers], device, gpu_id)

    @property
    def providers(self) -> list[str]:
        return sorted({engine.provider for engine in self.engines.values()})

    def predict_batch(self, images: list[np.ndarray]) -> list[Result]:
        """RGB uint8 images [H, W, 3] -> one Result each."""
        timings: dict[str, float] = {}
        raw = []
        for index, (member, scorers) in enumerate(self.members):
            started = time.perf_counter()
            spec = preprocess_from_manifest(member["preprocess"])
            normalised = [normalise_rgb(image, spec) for image in images]  # [3, S, S] each
            timings[f"preprocess_m{index}"] = time.perf_counter() - started
            engine = self.engines[member["engine"]]
            stage = {"engine": 0.0}

            def embed(locations: list[int], normalised=normalised, engine=engine, stage=stage) -> np.ndarray:
                tiles = np.stack([tiles_at(image, self.grid, locations, self.input_hw) for image in normalised])
                b, t = tiles.shape[:2]  # [B, T', 3, in_h, in_w]
                started = time.perf_counter()
                embeddings = engine.run(tiles.reshape(b * t, *tiles.shape[2:]))  # [B*T', h, w, D]
                stage["engine"] += time.perf_counter() - started
                return embeddings.reshape(b, t, *embeddings.shape[1:])

            started = time.perf_counter()
            chunk = max(1, engine.max_batch // len(images))
            raw.append(score_locations(embed, scorers, self.grid, self.rule.blur_sigma, chunk))
            timings[f"engine_m{index}"] = stage["engine"]
            timings[f"tiles_knn_maps_m{index}"] = time.perf_counter() - started - stage["engine"]
        started = time.perf_counter()
        scores, maps = ensemble_result(raw, self.grid, self.rule, self.calibrations)
        timings["merge"] = time.perf_counter() - started
        per_image_ms = {k: round(1000 * v / len(images), 3) for k, v in timings.items()}
        return [
            Result(
                float(score),
                bool(score >= self.thresholds["image"]),
                anomaly_map,
                anomaly_map >= self.thresholds["pixel"],
                dict(per_image_ms),
            )
            for score, anomaly_map in zip(scores, maps, strict=True)
        ]

    def predict(self, image: np.ndarray) -> Result:
        return self.predict_batch([image])[0]
