"""`Predictor(bundle).predict(image)`: the deployed model, with no torch anywhere.

Image -> tiles (runtime preprocessing) -> each member's engine -> kNN per tile location (FAISS) ->
maps, merging, seam smoothing, normalisation and fusion (runtime.merge) -> threshold.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tilecore.runtime import check_single_stack
from tilecore.runtime.cascade import run_cascade
from tilecore.runtime.engines.base import BundleGraph, Engine, EngineOptions
from tilecore.runtime.engines.opener import open_engine
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import BankScorer, read_bank_index, set_knn_threads
from tilecore.runtime.knn_gpu import place_beside_engines
from tilecore.runtime.manifest import Manifest, Thresholds, read_checked, read_manifest
from tilecore.runtime.merge import TileOutputs, ensemble_result, score_locations, tile_outputs
from tilecore.runtime.preprocess import normalise_rgb, tiles_at
from tilecore.runtime.spatial import (
    coarse_tile_maxima,
    coarse_zmaps,
    run_spatial,
    spatial_member_outputs,
    tile_selection,
)
from tilecore.runtime.stage_timer import StageTimer


@dataclass
class Result:
    score: float  # fused, normalised image score
    label: bool  # score >= the calibrated image threshold
    anomaly_map: np.ndarray  # [H, W] float32 at the bundle's image size
    mask: np.ndarray  # [H, W] bool: anomaly_map >= the calibrated pixel threshold
    timings_ms: dict[str, float] = field(default_factory=dict)
    rechecked: bool = False  # scored again in fp32 because the reduced-precision score was near the threshold
    threshold: float | None = None  # the image threshold `label` was decided with (Predictor.thresholds.image)
    exit_stage: int | None = None  # with the bundle's cascade: the 1-based stage the image left at
    tiles_run: int | None = None  # with the bundle's coarse stage: the fine tile locations this image ran


def check_embedding_shapes(engines: dict[str, Engine], manifest: Manifest, where: str) -> None:
    """Run one zero tile through each engine: its embeddings [1, h, w, D] must be what every member using it
    records (feature_grid, embedding_dim), so an engine and its banks can never disagree silently."""
    tile = np.zeros((1, 3, *manifest.tiling.backbone_input), dtype=np.float32)  # [1, 3, in_h, in_w]
    shapes = {name: tuple(engine.run(tile).shape) for name, engine in engines.items()}
    for member in manifest.members:
        member.check_embeddings(shapes[member.engine], where)


@dataclass
class CalibrationPass:
    """Predictor.calibration_pass: the full ensemble's results and what cascades and gates are refit on."""

    results: list[Result]
    member_scores: np.ndarray  # [M, B] each member's normalised image scores (what a cascade stage fuses)
    tile_scores: np.ndarray  # [M, B, T] each member's raw tile scores
    coarse_maxima: np.ndarray | None  # [B, T] the coarse stage's z-map maxima per fine tile, if the bundle has one


def recheck_margin(manifest: Manifest, precision: str, recheck: float | str | None) -> float | None:
    """The cascade's margin: a score distance, or "auto": the largest score change the exporter measured
    for `precision` on the validation images (manifest `reduced_precision`)."""
    if recheck is None:
        return None
    if precision == "fp32":
        raise TilecoreError(f"--recheck {recheck}: only with a reduced --precision (int8, bf16)")
    if recheck == "auto":
        reduced = manifest.reduced_precision
        checks = reduced.checks(precision) if reduced is not None else []
        if not checks:
            raise TilecoreError(f"--recheck auto: the bundle records no {precision} check on validation images")
        return max(check.max_score_diff for check in checks)
    try:
        margin = float(recheck)
    except ValueError:
        margin = 0.0
    if not margin > 0:
        raise TilecoreError(f"--recheck {recheck}: expected a score distance > 0 or auto")
    return margin


@dataclass(frozen=True)
class RunThresholds:
    """The thresholds a run decides with, where each came from ("bundle" or "run"), and the bundle's own."""

    image: float
    pixel: float
    image_rule: str
    pixel_rule: str
    image_source: str
    pixel_source: str
    bundle: Thresholds

    def to_dict(self) -> dict:
        """What summary.json records."""
        raw = {
            "image": self.image,
            "image_rule": self.image_rule,
            "image_source": self.image_source,
            "pixel": self.pixel,
            "pixel_rule": self.pixel_rule,
            "pixel_source": self.pixel_source,
            "bundle_image": self.bundle.image,
            "bundle_pixel": self.bundle.pixel,
        }
        if self.bundle.recalibrated is not None:
            raw["recalibrated"] = self.bundle.recalibrated.to_dict()
        return raw


def run_thresholds(bundle: Thresholds, image: float | None, pixel: float | None) -> RunThresholds:
    """The bundle's thresholds with a run's overrides (`tilecore run --threshold / --pixel-threshold`)."""
    for flag, value in (("--threshold", image), ("--pixel-threshold", pixel)):
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            raise TilecoreError(f"{flag} {value}: expected a finite number")
    return RunThresholds(
        image=bundle.image if image is None else float(image),
        pixel=bundle.pixel if pixel is None else float(pixel),
        image_rule=bundle.image_rule if image is None else f"set for this run (bundle: {bundle.image:.6g})",
        pixel_rule=bundle.pixel_rule if pixel is None else f"set for this run (bundle: {bundle.pixel:.6g})",
        image_source="bundle" if image is None else "run",
        pixel_source="bundle" if pixel is None else "run",
        bundle=bundle,
    )


class Predictor:
    """A loaded bundle: engines, FAISS indexes, calibration and thresholds, ready to score images.

    Every file is read once and loaded from the bytes that passed its sha256 (manifest.read_checked), so a
    file swapped after the check is never what runs. Files this run does not use are not read at all: the
    int8 graphs at fp32, the TensorRT plans of other GPUs (or all of them off tensorrt-native), a graph
    whose compiled model comes from OpenVINO's verified cache.
    """

    def __init__(
        self,
        bundle: str | Path,
        device: str = "auto",
        threads: int = 0,
        max_batch: int = 4,
        gpu_id: int = 0,
        precision: str = "fp32",
        recheck: float | str | None = None,
        engines: dict[str, Engine] | None = None,
        streams: int = 1,
        trust: str | Path | None = None,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        cascade: bool = True,
    ) -> None:
        """`recheck` (with a reduced `precision`): images whose score lies within this distance of the image
        threshold are scored again with the fp32 engines, which decide their score and label (a cascade:
        the reduced precision is trusted where it is far from the threshold); "auto": recheck_margin.
        `engines`: engines already opened for `precision`, by fp32 graph name, instead of the bundle's (how
        the exporter and the measurement tools run an emulated bf16 engine on a CPU without bf16).
        `streams`: OpenVINO's parallel inference streams (EngineOptions.streams).
        `trust`: an Ed25519 public key file; the bundle must carry a valid signature by it (runtime.signing),
        checked before anything is loaded.
        `threshold`, `pixel_threshold`: replace the bundle's image / pixel threshold for this run
        (`thresholds`, a RunThresholds, records which came from where).
        `cascade`: run the bundle's early-exit cascade where it has one (runtime.cascade: members cheapest
        first, an image leaves at the first stage that is sure of its label) and its coarse stage
        (runtime.spatial: a single-tile model picks the tiles the fine members run); False runs everything."""
        check_single_stack()  # CPU and GPU wheels side by side: one line, before any engine or index loads
        self.bundle = Path(bundle)
        # signature and digest now; each file's sha256 as it is read, below (read_checked)
        self.manifest = read_manifest(self.bundle, verify=False, trust=trust)
        if threads:
            set_knn_threads(threads)
        m = self.manifest
        where = f"bundle {self.bundle}"
        self.grid = m.tiling.tile_grid()
        self.input_hw = m.tiling.backbone_input
        self.rule = m.postprocess.rule
        self.bit_depth = m.members[0].preprocess.bit_depth  # how image files are read (runtime.image_io.to_uint8)
        self.calibrations = list(m.calibration.members)
        self.bundle_thresholds = m.thresholds  # Thresholds: .image, .pixel, as calibrated
        self.thresholds = run_thresholds(m.thresholds, threshold, pixel_threshold)  # what this run decides with
        self.recheck = recheck_margin(m, precision, recheck)
        self.cascade = m.cascade if cascade else None  # runtime.cascade.Cascade or None
        graphs = m.graphs
        options = EngineOptions(device, threads, max_batch, precision, gpu_id, streams=streams)
        if engines is None:
            engines = {name: self.open_graph(name, options) for name in graphs}  # each backend's int8 graph: opener
        elif set(engines) != graphs:
            raise TilecoreError(f"engines for {sorted(engines)}: the bundle's members use {sorted(graphs)}")
        check_embedding_shapes(engines, m, where)
        self.engines = engines
        self.fp32_engines = {}  # the cascade's second stage: same device, full precision, same indexes
        if self.recheck is not None:
            fp32 = replace(options, precision="fp32")
            self.fp32_engines = {name: self.open_graph(name, fp32) for name in graphs}
            check_embedding_shapes(self.fp32_engines, m, where)
        records = {r.file: r for x in m.members for r in x.indexes}  # each file once, however many members use it
        indexes = {  # each refused unless its sha256, then its rows and dimension, are what the manifest records
            name: read_bank_index(read_checked(self.bundle, m, name), name, r.rows, r.dim, where)
            for name, r in records.items()
        }
        self.members = []  # (Member, the scorer of each tile location)
        for member in m.members:
            scorers = {
                name: BankScorer.from_index(indexes[name], member.scoring, member.num_neighbours, name)
                for name in set(member.banks)
            }
            self.members.append((member, [scorers[name] for name in member.banks]))
        self.coarse_stage = m.coarse  # manifest.Coarse or None: loaded whenever the bundle has one
        self.coarse = m.coarse if cascade else None  # the coarse stage gating the tiles, or None
        all_scorers = [s for _, scorers in self.members for s in scorers]
        if self.coarse_stage is not None:
            self.coarse_scorer = self.load_coarse(options, engines, where)
            all_scorers.append(self.coarse_scorer)
        self.knn_device = place_beside_engines(all_scorers, self.engines.values())  # where an engine computes

    def load_coarse(self, options: EngineOptions, engines: dict[str, Engine], where: str) -> BankScorer:
        """The coarse stage's fp32 engine (a fine member's when it is the same graph) and its index's scorer."""
        member = self.coarse_stage.member
        if member.engine in engines and options.precision == "fp32":
            self.coarse_engine = engines[member.engine]
        else:
            self.coarse_engine = self.open_graph(member.engine, replace(options, precision="fp32"))
        tile = np.zeros((1, 3, *self.coarse_stage.tiling.backbone_input), dtype=np.float32)
        member.check_embeddings(tuple(self.coarse_engine.run(tile).shape), where)
        record = member.indexes[0]
        index = read_bank_index(read_checked(self.bundle, self.manifest, record.file), record.file, record.rows,
                                record.dim, where)  # fmt: skip
        return BankScorer.from_index(index, member.scoring, member.num_neighbours, record.file)

    def open_graph(self, name: str, options: EngineOptions) -> Engine:
        """The engine of bundle graph `name`, loaded from its checked bytes (or native TensorRT's checked plan)."""
        return open_engine(self.bundle / name, options, BundleGraph(self.bundle, self.manifest, name))

    @property
    def providers(self) -> list[str]:
        return sorted({engine.provider for engine in self.engines.values()})

    @property
    def manifest_sha256(self) -> str:
        """Identity of the loaded bundle: sha256 of its manifest's canonical JSON (which lists every file's)."""
        text = json.dumps(self.manifest.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def predict_batch(self, images: list[np.ndarray], timer: StageTimer | None = None) -> list[Result]:
        """RGB uint8 images [H, W, 3] -> one Result each.

        Stage times (per image, ms) go into each Result: preprocess, tiling, "engine <file>",
        "knn <bank file>", maps (tile maps: upsampling + blur) and merge (untiling, seams, normalisation,
        fusion, thresholds); with `recheck`, the fp32 pass over the images near the threshold as
        "recheck" (per image of the batch). A caller's timer also receives them, summed over calls.
        """
        own = StageTimer()  # this call's stages; added to the caller's timer at the end
        results = self.score(images, self.engines, own)
        if self.recheck is not None:
            near = [i for i, r in enumerate(results) if abs(r.score - self.thresholds.image) < self.recheck]
            if near:
                with own("recheck"):
                    again = self.score([images[i] for i in near], self.fp32_engines, StageTimer())
                for i, result in zip(near, again, strict=True):
                    results[i] = replace(result, rechecked=True)
        if timer is not None:
            timer.add(own)
        per_image_ms = own.per_image_ms(len(images))
        return [replace(r, timings_ms=dict(per_image_ms)) for r in results]

    def calibration_pass(self, images: list[np.ndarray]) -> CalibrationPass:
        """Every member on every tile (no cascade, no gate), with what tilecore calibrate refits a bundle's
        cascade windows and tile gate on. Needs a Predictor made with cascade=False and without recheck."""
        if self.cascade is not None or self.coarse is not None or self.recheck is not None:
            raise TilecoreError("a calibration pass needs a Predictor with cascade=False and no --recheck")
        own = StageTimer()
        raw = [self.member_outputs(i, images, self.engines, own) for i in range(len(self.members))]
        member_scores: list[np.ndarray] = []
        scores, maps = ensemble_result(raw, self.grid, self.rule, self.calibrations, member_scores)
        maxima = None
        if self.coarse_stage is not None:
            maxima = coarse_tile_maxima(self.coarse_maps(images), self.grid)  # [B, T]
        return CalibrationPass(
            results=self.results_of(scores, maps, [None] * len(images), [None] * len(images)),
            member_scores=member_scores[0],
            tile_scores=np.stack([o.scores for o in raw]),  # [M, B, T] raw tile scores
            coarse_maxima=maxima,
        )

    def member_outputs(self, index: int, images: list[np.ndarray], engines: dict, own: StageTimer) -> TileOutputs:
        """Member `index`'s raw tile outputs for `images`, through its engine in `engines` and its indexes."""
        member, scorers = self.members[index]
        with own("preprocess"):
            normalised = [normalise_rgb(image, member.preprocess) for image in images]  # [3, S, S] each
        engine = engines[member.engine]

        def embed(locations: list[int]) -> np.ndarray:
            with own("tiling"):
                tiles = np.stack([tiles_at(image, self.grid, locations, self.input_hw) for image in normalised])
            b, t = tiles.shape[:2]  # [B, T', 3, in_h, in_w]
            with own(f"engine {member.engine}"):
                embeddings = engine.run(tiles.reshape(b * t, *tiles.shape[2:]))  # [B*T', h, w, D]
            return embeddings.reshape(b, t, *embeddings.shape[1:])

        chunk = max(1, engine.max_batch // len(images))
        return score_locations(embed, scorers, self.grid, self.rule.blur_sigma, chunk, own)

    def score(self, images: list[np.ndarray], engines: dict, own: StageTimer) -> list[Result]:
        """predict_batch's single pass with `engines` (one per graph), timing into `own`: every member, or
        the cascade's stages (runtime.cascade.run_cascade) where the bundle has one and it is on."""
        exit_stage, tiles_run = [None] * len(images), [None] * len(images)
        if self.coarse is not None:
            scores, maps, exit_stage, tiles_run = self.spatial_score(images, engines, own)
        elif self.cascade is None:
            raw = [self.member_outputs(i, images, engines, own) for i in range(len(self.members))]
            with own("merge"):
                scores, maps = ensemble_result(raw, self.grid, self.rule, self.calibrations)
        else:

            def outputs(index: int, positions: list[int]) -> TileOutputs:
                return self.member_outputs(index, [images[p] for p in positions], engines, own)

            args = (self.grid, self.rule, self.calibrations, self.thresholds.image, own)
            staged = run_cascade(len(images), outputs, self.cascade, *args)
            scores, maps, exit_stage = staged.scores, staged.maps, [int(s) for s in staged.exit_stage]
        with own("merge"):
            return self.results_of(scores, maps, exit_stage, tiles_run)

    def results_of(self, scores: np.ndarray, maps: np.ndarray, exit_stage: list, tiles_run: list) -> list[Result]:
        """Fused scores [B] and maps [B, H, W] -> one Result each, labelled and masked at the thresholds."""
        labels = scores >= self.thresholds.image
        masks = maps >= self.thresholds.pixel
        image = self.thresholds.image
        return [
            Result(float(score), bool(label), anomaly_map, mask, threshold=image, exit_stage=stage, tiles_run=ran)
            for score, label, anomaly_map, mask, stage, ran in zip(
                scores, labels, maps, masks, exit_stage, tiles_run, strict=True
            )
        ]

    def coarse_maps(self, images: list[np.ndarray]) -> np.ndarray:
        """The coarse member's z-maps [B, H, W]: the whole image as one tile through its engine and index."""
        coarse = self.coarse_stage
        member, grid = coarse.member, coarse.tiling.tile_grid()
        inputs = [tiles_at(normalise_rgb(image, member.preprocess), grid, [0], coarse.tiling.backbone_input)
                  for image in images]  # fmt: skip
        embeddings = self.coarse_engine.run(np.concatenate(inputs))  # [B, h, w, D]
        patches, scores = self.coarse_scorer.score(embeddings)  # [B, h, w], [B]
        maps = tile_outputs(patches[:, None], scores[:, None], grid, coarse.blur_sigma).maps[:, 0]  # [B, H, W]
        return coarse_zmaps(maps, coarse.calibration.image)

    def fine_outputs(self, images: list[np.ndarray], engines: dict, own: StageTimer):
        """runtime.spatial's fine_outputs(member, location, positions) over this batch: the selected images'
        tiles at one location through the member's engine and that location's index; each image is
        normalised once per member."""
        normalised: dict[tuple[int, int], np.ndarray] = {}  # (member, batch position) -> [3, S, S]

        def outputs(index: int, location: int, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
            member, scorers = self.members[index]
            with own("preprocess"):
                for p in positions:
                    if (index, p) not in normalised:
                        normalised[index, p] = normalise_rgb(images[p], member.preprocess)
            with own("tiling"):
                tiles = np.concatenate([tiles_at(normalised[index, p], self.grid, [location], self.input_hw)
                                        for p in positions])  # fmt: skip
            with own(f"engine {member.engine}"):
                embeddings = engines[member.engine].run(tiles)  # [n, h, w, D]
            with own(f"knn {scorers[location].name}"):
                patches, scores = scorers[location].score(embeddings)  # [n, h, w], [n]
            with own("maps"):
                out = tile_outputs(patches[:, None], scores[:, None], self.grid, self.rule.blur_sigma)
            return out.scores[:, 0], out.maps[:, 0]

        return outputs

    def spatial_score(self, images: list[np.ndarray], engines: dict, own: StageTimer) -> tuple:
        """score() with the coarse stage: (scores [B], maps [B, H, W], exit stages, tiles run). With the
        member cascade too, its stages ask each member for outputs on the selected tiles only."""
        with own("coarse"):
            z_maps = self.coarse_maps(images)  # [B, H, W]
            selection = tile_selection(coarse_tile_maxima(z_maps, self.grid), self.coarse.gate.tile_threshold)
        fine = self.fine_outputs(images, engines, own)
        tiles_run = [int(n) for n in selection.sum(axis=1)]
        if self.cascade is None:
            scores, maps, _ = run_spatial(len(images), z_maps, fine, selection, self.grid, self.rule,
                                          self.calibrations, own)  # fmt: skip
            return scores, maps, [None] * len(images), tiles_run

        def outputs(index: int, positions: list[int]) -> TileOutputs:
            calibration = self.calibrations[index]
            return spatial_member_outputs(index, positions, z_maps, selection, self.grid, calibration, fine)

        args = (self.grid, self.rule, self.calibrations, self.thresholds.image, own)
        staged = run_cascade(len(images), outputs, self.cascade, *args)
        return staged.scores, staged.maps, [int(s) for s in staged.exit_stage], tiles_run

    def predict(self, image: np.ndarray | str | Path) -> Result:
        """One image: a file path (str or Path, read as the bundle's preprocessing says) or an RGB uint8
        array [H, W, 3] of any size; anything else is refused in one line."""
        return self.predict_batch([input_rgb(image, self.bit_depth)])[0]


def input_rgb(image: object, bit_depth: str | int = "auto") -> np.ndarray:
    """`Predictor.predict`'s input as RGB uint8 [H, W, 3]: a path is read (runtime.image_io), an array checked."""
    if isinstance(image, str | Path):
        from tilecore.runtime.image_io import read_rgb

        return read_rgb(image, bit_depth=bit_depth)  # missing or unreadable: TilecoreError naming the file
    if not isinstance(image, np.ndarray):
        raise TilecoreError(f"predict: expected an image path or an RGB uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise TilecoreError(
            f"predict: expected an RGB uint8 array [H, W, 3], got {image.dtype} {list(image.shape)} "
            "(read files with a path, or convert with runtime.image_io.to_rgb)"
        )
    return image
