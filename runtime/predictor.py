"""`Predictor(bundle).predict(image)`: the deployed model, with no torch anywhere.

Image -> tiles (runtime preprocessing) -> each member's engine -> kNN per tile location (FAISS) ->
maps, merging, seam smoothing, normalisation and fusion (runtime.merge) -> threshold.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from tilecore.runtime.engine import BundleGraph, Engine, EngineOptions, open_engine
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import BankScorer, read_bank_index
from tilecore.runtime.manifest import Manifest, read_checked, read_manifest
from tilecore.runtime.merge import ensemble_result, score_locations
from tilecore.runtime.preprocess import normalise_rgb, tiles_at
from tilecore.runtime.stage_timer import StageTimer


@dataclass
class Result:
    score: float  # fused, normalised image score
    label: bool  # score >= the calibrated image threshold
    anomaly_map: np.ndarray  # [H, W] float32 at the bundle's image size
    mask: np.ndarray  # [H, W] bool: anomaly_map >= the calibrated pixel threshold
    timings_ms: dict[str, float] = field(default_factory=dict)
    rechecked: bool = False  # scored again in fp32 because the reduced-precision score was near the threshold


class SerialGpuIndex:
    """A FAISS GPU index searched by one thread at a time. FAISS's GPU indexes, and the resource object
    they share, are not thread-safe even for search (its CPU indexes are), so all share one lock."""

    def __init__(self, index: faiss.Index, lock: threading.Lock) -> None:
        self.index, self.lock = index, lock

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            return self.index.search(queries, k)

    def __getattr__(self, name: str) -> object:
        return getattr(self.index, name)


def move_indexes_to_gpu(scorers: list[BankScorer], device: str, gpu_id: int) -> str:
    """Put every index on one GPU through one shared FAISS resource object, when faiss-gpu sees a GPU."""
    if device == "cpu" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() <= gpu_id:
        return "cpu"
    resources = faiss.StandardGpuResources()  # one for all indexes: a resource object per index exhausts memory
    resources.setTempMemory(256 * 1024 * 1024)
    lock = threading.Lock()  # the resources' one user at a time (SerialGpuIndex)
    moved: dict[int, faiss.Index] = {}
    for scorer in {id(s): s for s in scorers}.values():  # stacked banks repeat one scorer: visit it once
        if id(scorer.index) not in moved:  # and scorers sharing an index move it once
            try:
                moved[id(scorer.index)] = SerialGpuIndex(faiss.index_cpu_to_gpu(resources, gpu_id, scorer.index), lock)
            except RuntimeError:  # FAISS has no GPU version of this index kind (HNSW): it stays on the CPU
                moved[id(scorer.index)] = scorer.index
        scorer.index = moved[id(scorer.index)]
    return f"cuda:{gpu_id}"


def engine_file(manifest: Manifest, engine: str, precision: str) -> str:
    """The graph a member's engine runs at `precision`: the fp32 ONNX, or the bundle's int8 graph of it."""
    if precision != "int8":
        return engine
    graphs = manifest.reduced_precision.int8 if manifest.reduced_precision is not None else {}
    if engine not in graphs:
        raise TilecoreError(
            f"--precision int8: bundle has no int8 graph of {engine}; export with `tilecore export --precision int8`"
        )
    return graphs[engine].file


def check_embedding_shapes(engines: dict[str, Engine], manifest: Manifest, where: str) -> None:
    """Run one zero tile through each engine: its embeddings [1, h, w, D] must be what every member using it
    records (feature_grid, embedding_dim), so an engine and its banks can never disagree silently."""
    tile = np.zeros((1, 3, *manifest.tiling.backbone_input), dtype=np.float32)  # [1, 3, in_h, in_w]
    shapes = {name: tuple(engine.run(tile).shape) for name, engine in engines.items()}
    for member in manifest.members:
        member.check_embeddings(shapes[member.engine], where)


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
    ) -> None:
        """`recheck` (with a reduced `precision`): images whose score lies within this distance of the image
        threshold are scored again with the fp32 engines, which decide their score and label (a cascade:
        the reduced precision is trusted where it is far from the threshold); "auto": recheck_margin.
        `engines`: engines already opened for `precision`, by fp32 graph name, instead of the bundle's (how
        the exporter and the measurement tools run an emulated bf16 engine on a CPU without bf16).
        `streams`: OpenVINO's parallel inference streams (EngineOptions.streams).
        `trust`: an Ed25519 public key file; the bundle must carry a valid signature by it (runtime.signing),
        checked before anything is loaded."""
        self.bundle = Path(bundle)
        # signature and digest now; each file's sha256 as it is read, below (read_checked)
        self.manifest = read_manifest(self.bundle, verify=False, trust=trust)
        if threads:
            faiss.omp_set_num_threads(threads)
        m = self.manifest
        where = f"bundle {self.bundle}"
        self.grid = m.tiling.tile_grid()
        self.input_hw = m.tiling.backbone_input
        self.rule = m.postprocess.rule
        self.calibrations = list(m.calibration.members)
        self.thresholds = m.thresholds  # Thresholds: .image, .pixel
        self.recheck = recheck_margin(m, precision, recheck)
        graphs = m.graphs
        options = EngineOptions(device, threads, max_batch, precision, gpu_id, streams=streams)
        if engines is None:
            engines = {name: self.open_graph(engine_file(m, name, precision), options) for name in graphs}
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
        self.knn_device = move_indexes_to_gpu([s for _, scorers in self.members for s in scorers], device, gpu_id)

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

    def score(self, images: list[np.ndarray], engines: dict, own: StageTimer) -> list[Result]:
        """predict_batch's single pass with `engines` (one per graph), timing into `own`."""
        raw = []
        for member, scorers in self.members:
            with own("preprocess"):
                normalised = [normalise_rgb(image, member.preprocess) for image in images]  # [3, S, S] each
            engine = engines[member.engine]

            def embed(locations: list[int], normalised=normalised, engine=engine, name=member.engine) -> np.ndarray:
                with own("tiling"):
                    tiles = np.stack([tiles_at(image, self.grid, locations, self.input_hw) for image in normalised])
                b, t = tiles.shape[:2]  # [B, T', 3, in_h, in_w]
                with own(f"engine {name}"):
                    embeddings = engine.run(tiles.reshape(b * t, *tiles.shape[2:]))  # [B*T', h, w, D]
                return embeddings.reshape(b, t, *embeddings.shape[1:])

            chunk = max(1, engine.max_batch // len(images))
            raw.append(score_locations(embed, scorers, self.grid, self.rule.blur_sigma, chunk, own))
        with own("merge"):
            scores, maps = ensemble_result(raw, self.grid, self.rule, self.calibrations)
            labels = scores >= self.thresholds.image
            masks = maps >= self.thresholds.pixel
        return [
            Result(float(score), bool(label), anomaly_map, mask)
            for score, label, anomaly_map, mask in zip(scores, labels, maps, masks, strict=True)
        ]

    def predict(self, image: np.ndarray) -> Result:
        return self.predict_batch([image])[0]
