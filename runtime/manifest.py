"""The bundle manifest: one typed schema for what a bundle holds and how to run it, checked on load.

A bundle is a folder with manifest.json, one ONNX graph per distinct backbone and one FAISS index per
(member, tile location). This module is the only code that knows the manifest's keys: `Manifest` and its
parts are dataclasses, `Manifest.from_dict` checks every field's type and range (and that the parts agree
with each other) and names the field in one line, `to_dict` writes it back.

Integrity. `write_manifest` writes manifest.json as canonical JSON and, beside it, DIGEST_FILE: the
sha256 of manifest.json in `sha256sum` format. `read_manifest` checks that digest before it parses
anything, then the schema, then (with `verify`) the sha256 of every file the manifest lists in `files`.
Every file name the manifest uses (engines, banks, int8 graphs, TensorRT engines) must be a plain name
inside the bundle and listed in `files`, so nothing the runtime loads goes unchecked. Each bank records
its row count and dimension, which the runtime compares with the FAISS index it loads.
The digest catches any edit or corruption made without rewriting the digest; only a signature
(SIGNATURE_FILE, required with --trust) stops someone who rewrites both. Neither file is in `files`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tilecore.runtime.anomaly_map import MAP_RULE
from tilecore.runtime.artifacts import atomic_write_bytes, sha256_file
from tilecore.runtime.bundle_files import DIGEST_FILE, MANIFEST_FILE, NOT_IN_FILES, SIGNATURE_FILE  # noqa: F401
from tilecore.runtime.calibration import FUSION_RULES, MIN_CALIBRATION_IMAGES, NormalStats
from tilecore.runtime.cascade import ORDER_RULES, Cascade, CascadeStage
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import INDEX_KINDS, RULE_NEAREST, RULE_REWEIGHTED
from tilecore.runtime.merge import IMAGE_SCORE_RULES, NORMALISATION_LEVELS, MemberCalibration, MergeRule
from tilecore.runtime.preprocess import RESIZE_RULE, Preprocess
from tilecore.runtime.spatial import GateScores, TileGate
from tilecore.runtime.tiling import TileGrid, tile_grid

FORMAT = "tilecore-bundle"
FORMAT_VERSION = 5  # 3: `identity` (name, version, created, fingerprints); 4: `cascade`, `coarse`;
# 5: the cascade's `order_rule` and `calibration_scores`, the gate's `gate_scores` (tilecore calibrate refits them)
TENSORRT_PRECISIONS = ("fp32", "fp16", "int8", "int8+fp16")
DISTANCES = ("euclidean",)
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- reading one JSON object field by field ------------------------------------------------------------


def plain_name_problem(name: str) -> str | None:
    """Why `name` is not a plain file name inside the bundle, or None when it is."""
    if not name:
        return "an empty name"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    if "/" in name or "\\" in name:
        return "a path (a '/' or '\\' in the name)"
    if ".." in name:
        return "'..' in the name"
    if not name.isprintable():
        return "a control or unprintable character (NUL, newline, ...) in the name"
    if name in (".", *NOT_IN_FILES):
        return "a reserved name"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """One JSON object of a manifest, read key by key; a refusal names the key's path in one line."""

    def __init__(self, raw: Any, path: str, where: str) -> None:
        self.path, self.where = path, where
        if not isinstance(raw, dict):
            self.fail("", "an object", raw)
        self.raw: dict = raw
        self.read: set[str] = set()

    def at(self, key: str) -> str:
        """The field's path, e.g. members[0].embedding_dim (a key's control characters escaped: one line)."""
        key = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)
        return f"{self.path}.{key}" if self.path and key else self.path or key or "(top level)"

    def fail(self, key: str, expected: str, value: Any) -> None:
        raise TilecoreError(f"{self.where}: {MANIFEST_FILE} {self.at(key)}: expected {expected}, got {_shown(value)}")

    def refuse(self, key: str, message: str) -> None:
        raise TilecoreError(f"{self.where}: {MANIFEST_FILE} {self.at(key)}: {message}")

    def has(self, key: str) -> bool:
        """Whether an optional key is present (and not null)."""
        self.read.add(key)
        return self.raw.get(key) is not None

    def value(self, key: str, expected: str) -> Any:
        self.read.add(key)
        if key not in self.raw:
            self.refuse(key, f"missing (expected {expected})")
        return self.raw[key]

    def string(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        expected = "a string" if choices is None else f"one of {', '.join(repr(c) for c in choices)}"
        value = self.value(key, expected)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            self.fail(key, expected, value)
        return value

    def name(self, key: str) -> str:
        """A plain file name inside the bundle."""
        value = self.string(key)
        if (problem := plain_name_problem(value)) is not None:
            self.fail(key, f"a plain file name inside the bundle, not {problem}", value)
        return value

    def integer(self, key: str, low: int | None = None) -> int:
        expected = "an integer" + (f" >= {low}" if low is not None else "")
        value = self.value(key, expected)
        if not _is_int(value) or (low is not None and value < low):
            self.fail(key, expected, value)
        return value

    def number(self, key: str, low: float | None = None, high: float | None = None, above: bool = False) -> float:
        bounds = [f"{'>' if above else '>='} {low}"] if low is not None else []
        bounds += [f"<= {high}"] if high is not None else []
        expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        value = self.value(key, expected)
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if above else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            self.fail(key, expected, value)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.value(key, "true or false")
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def integers(self, key: str, length: int, low: int = 1) -> tuple[int, ...]:
        expected = f"a list of {length} integers >= {low}"
        value = self.value(key, expected)
        if not isinstance(value, list) or len(value) != length or not all(_is_int(v) and v >= low for v in value):
            self.fail(key, expected, value)
        return tuple(value)

    def numbers(self, key: str, length: int, above: float | None = None) -> tuple[float, ...]:
        expected = f"a list of {length} finite numbers" + (f" > {above}" if above is not None else "")
        value = self.value(key, expected)
        ok = isinstance(value, list) and len(value) == length and all(_is_number(v) for v in value)
        if not ok or (above is not None and not all(v > above for v in value)):
            self.fail(key, expected, value)
        return tuple(float(v) for v in value)

    def strings(self, key: str, names: bool = False, at_least: int = 0) -> tuple[str, ...]:
        expected = ("a list of plain file names" if names else "a list of strings") + (
            f" (at least {at_least})" if at_least else ""
        )
        value = self.value(key, expected)
        if not isinstance(value, list) or len(value) < at_least or not all(isinstance(v, str) for v in value):
            self.fail(key, expected, value)
        for i, item in enumerate(value):
            if names and (problem := plain_name_problem(item)) is not None:
                self.fail(f"{key}[{i}]", f"a plain file name inside the bundle, not {problem}", item)
        return tuple(value)

    def object(self, key: str) -> Fields:
        return Fields(self.value(key, "an object"), self.at(key), self.where)

    def objects(self, key: str, at_least: int = 0) -> list[Fields]:
        expected = "a list of objects" + (f" (at least {at_least})" if at_least else "")
        value = self.value(key, expected)
        if not isinstance(value, list) or len(value) < at_least:
            self.fail(key, expected, value)
        return [Fields(item, f"{self.at(key)}[{i}]", self.where) for i, item in enumerate(value)]

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.value(key, "an object")
        if not isinstance(value, dict):
            self.fail(key, "an object", value)
        return value

    def end(self) -> None:
        """Refuse keys this format does not define (a typo, or a newer tilecore's field)."""
        for key in self.raw:
            if key not in self.read:
                self.refuse(key, f"unexpected field (not part of format version {FORMAT_VERSION})")


def _optional(f: Fields, key: str, read: Any) -> Any:
    """read(the object at `key`), or None when the key is absent or null."""
    return read(f.object(key)) if f.has(key) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


# --- the parts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """The tile grid over the working image, and the backbone input each tile is resized to."""

    image: tuple[int, int]
    tile: tuple[int, int]
    stride: tuple[int, int]
    grid: tuple[int, int]  # rows, cols
    backbone_input: tuple[int, int]
    stacked: bool  # tile locations share one bank per member (stacked ensemble)

    @classmethod
    def of(cls, grid: TileGrid, backbone_input: tuple[int, int], stacked: bool) -> Tiling:
        shape = (grid.image_h, grid.image_w), (grid.tile_h, grid.tile_w), (grid.stride_h, grid.stride_w)
        return cls(*shape, (grid.rows, grid.cols), tuple(backbone_input), stacked)

    def tile_grid(self) -> TileGrid:
        (h, w), (th, tw), (sh, sw) = self.image, self.tile, self.stride
        return TileGrid(h, w, th, tw, sh, sw)

    def to_dict(self) -> dict[str, Any]:
        return {**self.tile_grid().to_dict(), "backbone_input": list(self.backbone_input), "stacked": self.stacked}

    @classmethod
    def read(cls, f: Fields) -> Tiling:
        image, tile, stride = (f.integers(key, 2) for key in ("image", "tile", "stride"))
        try:
            grid = tile_grid(image, tile, stride)
        except TilecoreError as exc:
            f.refuse("", str(exc))
        rows_cols = f.integers("grid", 2)
        if rows_cols != (grid.rows, grid.cols):
            f.fail("grid", f"[{grid.rows}, {grid.cols}] for these image, tile and stride sizes", list(rows_cols))
        described = grid.to_dict()
        for key in ("padding", "merge"):
            f.string(key, (described[key],))
        tiling = cls(image, tile, stride, rows_cols, f.integers("backbone_input", 2), f.boolean("stacked"))
        f.end()
        return tiling


@dataclass(frozen=True)
class IndexRecord:
    """One FAISS index file of a member: its bank's shape, and for approximate kinds its measured recall."""

    file: str
    rows: int  # bank entries (the index's ntotal)
    dim: int  # embedding dimension (the index's d)
    recall_at_1: float | None = None  # approximate indexes: recall@1 against the exact index on validation

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "rows": self.rows, "dim": self.dim, "recall_at_1": self.recall_at_1}

    @classmethod
    def read(cls, f: Fields) -> IndexRecord:
        recall = f.number("recall_at_1", 0.0, 1.0) if f.has("recall_at_1") else None
        record = cls(f.name("file"), f.integer("rows", 1), f.integer("dim", 1), recall)
        f.end()
        return record


def _read_preprocess(f: Fields) -> Preprocess:
    from tilecore.runtime.image_io import BIT_DEPTHS

    depth = f.value("bit_depth", "a bit depth") if f.has("bit_depth") else 8  # older bundles: 8-bit files only
    if depth not in BIT_DEPTHS or isinstance(depth, bool | float):
        f.fail("bit_depth", f"one of {list(BIT_DEPTHS)}", depth)
    size_and_stats = (f.integer("height", 1), f.integer("width", 1), f.numbers("mean", 3), f.numbers("std", 3, 0.0))
    spec = Preprocess(*size_and_stats, bit_depth=depth)
    f.string("resize", (RESIZE_RULE,))
    f.string("channel_order", ("RGB",))
    f.string("layout", ("NCHW",))
    f.end()
    return spec


@dataclass(frozen=True)
class Member:
    """One ensemble member: its backbone engine, preprocessing, scoring rule and one index per tile location."""

    backbone: str
    layers: tuple[str, ...]
    weights_source: str
    preprocess: Preprocess
    engine: str  # the fp32 ONNX graph (shared by members with identical backbones)
    feature_grid: tuple[int, int]  # h, w of the engine's patch grid for one tile
    embedding_dim: int  # D of the engine's embeddings [N, h, w, D], and of every bank
    scoring: str
    num_neighbours: int
    banks: tuple[str, ...]  # the index file serving each tile location, in grid order
    index_kind: str
    indexes: tuple[IndexRecord, ...]  # one per distinct file in `banks`
    distance: str = "euclidean"

    def index(self, file: str) -> IndexRecord:
        return next(record for record in self.indexes if record.file == file)

    def to_dict(self) -> dict[str, Any]:
        spec = self.preprocess
        return {
            "backbone": self.backbone,
            "layers": list(self.layers),
            "weights_source": self.weights_source,
            "preprocess": {**spec.to_dict(), "mean": list(spec.mean), "std": list(spec.std)},
            "engine": self.engine,
            "feature_grid": list(self.feature_grid),
            "embedding_dim": self.embedding_dim,
            "distance": self.distance,
            "scoring": self.scoring,
            "num_neighbours": self.num_neighbours,
            "banks": list(self.banks),
            "index_kind": self.index_kind,
            "indexes": [record.to_dict() for record in self.indexes],
        }

    @classmethod
    def read(cls, f: Fields) -> Member:
        member = cls(
            backbone=f.string("backbone"),
            layers=f.strings("layers", at_least=1),
            weights_source=f.string("weights_source"),
            preprocess=_read_preprocess(f.object("preprocess")),
            engine=f.name("engine"),
            feature_grid=f.integers("feature_grid", 2),
            embedding_dim=f.integer("embedding_dim", 1),
            distance=f.string("distance", DISTANCES),
            scoring=f.string("scoring", (RULE_NEAREST, RULE_REWEIGHTED)),
            num_neighbours=f.integer("num_neighbours", 1),
            banks=f.strings("banks", names=True, at_least=1),
            index_kind=f.string("index_kind", INDEX_KINDS),
            indexes=tuple(IndexRecord.read(g) for g in f.objects("indexes", at_least=1)),
        )
        files = [record.file for record in member.indexes]
        if len(set(files)) != len(files) or set(files) != set(member.banks):
            f.fail("indexes", f"one record per distinct bank file {sorted(set(member.banks))}", files)
        for i, record in enumerate(member.indexes):
            if record.dim != member.embedding_dim:
                f.refuse(f"indexes[{i}].dim", f"{record.dim} differs from embedding_dim {member.embedding_dim}")
        f.end()
        return member

    def check_embeddings(self, shape: tuple[int, ...], where: str) -> None:
        """Refuse an engine whose one-tile output [1, h, w, D] disagrees with feature_grid and embedding_dim."""
        expected = (1, *self.feature_grid, self.embedding_dim)
        if tuple(shape) != expected:
            raise TilecoreError(
                f"{where}: engine {self.engine} gives embeddings {list(shape)} for one tile, the manifest says "
                f"{list(expected)} (feature_grid, embedding_dim)"
            )


@dataclass(frozen=True)
class Postprocess:
    """How tile maps and scores become the image's: the merge rule (runtime.merge) and the map rule."""

    rule: MergeRule

    def to_dict(self) -> dict[str, Any]:
        return {**self.rule.to_dict(), "map_rule": dict(MAP_RULE)}

    @classmethod
    def read(cls, f: Fields) -> Postprocess:
        rule = MergeRule(
            image_score=f.string("image_score", IMAGE_SCORE_RULES),
            normalisation=f.string("normalisation", NORMALISATION_LEVELS),
            fusion=f.string("fusion", FUSION_RULES),
            blur_sigma=f.number("blur_sigma", 0.0),
            seam_band=f.number("seam_band", 0.0, 0.5),
            seam_sigma=f.number("seam_sigma", 0.0),
        )
        if f.value("map_rule", "an object") != MAP_RULE:
            f.fail("map_rule", f"{MAP_RULE} (the only map rule this runtime computes)", f.raw["map_rule"])
        f.end()
        return cls(rule)


def _read_stats(f: Fields) -> NormalStats:
    stats = NormalStats(
        f.number("image_mean"), f.number("image_std", 0.0), f.number("pixel_mean"), f.number("pixel_std", 0.0)
    )
    f.end()
    return stats


def _read_member_calibration(f: Fields) -> MemberCalibration:
    per_location = [_read_stats(g) for g in f.objects("per_location", at_least=1)]
    calibration = MemberCalibration(per_location, _read_stats(f.object("image")))
    f.end()
    return calibration


@dataclass(frozen=True)
class Calibration:
    """Each member's normal statistics, measured on the held-out validation images."""

    members: tuple[MemberCalibration, ...]
    validation_images: int

    def to_dict(self) -> dict[str, Any]:
        return {"members": [c.to_dict() for c in self.members], "validation_images": self.validation_images}

    @classmethod
    def read(cls, f: Fields) -> Calibration:
        members = tuple(_read_member_calibration(g) for g in f.objects("members", at_least=1))
        calibration = cls(members, f.integer("validation_images", MIN_CALIBRATION_IMAGES))
        f.end()
        return calibration


@dataclass(frozen=True)
class Recalibration:
    """How `tilecore calibrate` re-derived a bundle's thresholds from known-good images (runtime.recalibrate)."""

    images: int  # good images scored
    images_sha256: str  # fingerprint of those images: sha256 over the sorted sha256s of their decoded pixels
    target_fpr: float  # at most this fraction of them flagged
    fpr: float  # the fraction flagged at the new image threshold
    pixel_quantile: float  # the new pixel threshold: this quantile of their anomaly-map pixels
    created: str  # UTC time, ISO 8601
    previous: Thresholds  # the thresholds it replaced (without their own record)
    source: str = "calibrate"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "images": self.images,
            "images_sha256": self.images_sha256,
            "target_fpr": self.target_fpr,
            "fpr": self.fpr,
            "pixel_quantile": self.pixel_quantile,
            "created": self.created,
            "previous": self.previous.to_dict(),
        }

    @classmethod
    def read(cls, f: Fields) -> Recalibration:
        record = cls(
            images=f.integer("images", 1),
            images_sha256=f.string("images_sha256"),
            target_fpr=f.number("target_fpr", 0.0, 1.0, above=True),
            fpr=f.number("fpr", 0.0, 1.0),
            pixel_quantile=f.number("pixel_quantile", 0.0, 1.0, above=True),
            created=f.string("created"),
            previous=Thresholds.read(f.object("previous")),
            source=f.string("source", ("calibrate",)),
        )
        if not _SHA256.fullmatch(record.images_sha256):
            f.fail("images_sha256", "a sha256 (64 lowercase hex digits)", record.images_sha256)
        f.end()
        return record


@dataclass(frozen=True)
class Thresholds:
    """The calibrated image-score and pixel thresholds, and how each was chosen; `recalibrated` when
    `tilecore calibrate` set them on good images from the line (absent: the training run's)."""

    image: float
    pixel: float
    image_rule: str = ""
    pixel_rule: str = ""
    recalibrated: Recalibration | None = None

    def to_dict(self) -> dict[str, Any]:
        raw = {"image": self.image, "image_rule": self.image_rule, "pixel": self.pixel, "pixel_rule": self.pixel_rule}
        if self.recalibrated is not None:
            raw["recalibrated"] = self.recalibrated.to_dict()
        return raw

    @classmethod
    def read(cls, f: Fields) -> Thresholds:
        thresholds = cls(
            f.number("image"),
            f.number("pixel"),
            f.string("image_rule"),
            f.string("pixel_rule"),
            _optional(f, "recalibrated", Recalibration.read),
        )
        f.end()
        return thresholds


@dataclass(frozen=True)
class Profile:
    """A TensorRT optimization profile over the batch axis: input shapes [batch, 3, h, w] at min / opt / max."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def max_batch(self) -> int:
        return self.max[0]

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input_name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest", path: str = "profile") -> Profile:
        return cls.read(Fields(raw, path, where))

    @classmethod
    def read(cls, f: Fields) -> Profile:
        profile = cls(f.string("input"), f.integers("min", 4), f.integers("opt", 4), f.integers("max", 4))
        if not profile.min[1:] == profile.opt[1:] == profile.max[1:]:
            f.refuse("", "min, opt and max differ outside the batch axis")
        if not profile.min[0] <= profile.opt[0] <= profile.max[0]:
            f.refuse("", "expected batch sizes min <= opt <= max")
        f.end()
        return profile


@dataclass(frozen=True)
class QdqCalibration:
    """How a TensorRT INT8 engine's Q/DQ scales were found, and the embedding error they cost."""

    method: str
    tiles: int
    qdq_relative_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "tiles": self.tiles, "qdq_relative_error": self.qdq_relative_error}

    @classmethod
    def read(cls, f: Fields) -> QdqCalibration:
        record = cls(f.string("method"), f.integer("tiles", 1), f.number("qdq_relative_error", 0.0))
        f.end()
        return record


@dataclass(frozen=True)
class EngineRecord:
    """One serialized TensorRT engine and what it needs to run (runtime.tensorrt_compat checks it)."""

    onnx: str  # the ONNX graph it was built from (the runtime's fallback)
    engine: str  # file name inside the bundle
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor"
    precision: str  # one of TENSORRT_PRECISIONS
    profile: Profile
    output_name: str
    workspace_gb: float
    int8_calibration: QdqCalibration | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx,
            "engine": self.engine,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "precision": self.precision,
            "profile": self.profile.to_dict(),
            "output_name": self.output_name,
            "workspace_gb": self.workspace_gb,
            "int8_calibration": None if self.int8_calibration is None else self.int8_calibration.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest", path: str = "tensorrt[0]") -> EngineRecord:
        return cls.read(Fields(raw, path, where))

    @classmethod
    def read(cls, f: Fields) -> EngineRecord:
        record = cls(
            onnx=f.name("onnx"),
            engine=f.name("engine"),
            tensorrt_version=f.string("tensorrt_version"),
            gpu_name=f.string("gpu_name"),
            compute_capability=f.string("compute_capability"),
            precision=f.string("precision", TENSORRT_PRECISIONS),
            profile=Profile.read(f.object("profile")),
            output_name=f.string("output_name"),
            workspace_gb=f.number("workspace_gb", 0.0, above=True),
            int8_calibration=QdqCalibration.read(f.object("int8_calibration")) if f.has("int8_calibration") else None,
        )
        if not re.fullmatch(r"\d+\.\d+", record.compute_capability):
            f.fail("compute_capability", "'major.minor', e.g. '8.6'", record.compute_capability)
        f.end()
        return record


@dataclass(frozen=True)
class PrecisionCheck:
    """What a reduced precision changed on the validation images, against fp32 (export.reduced_precision)."""

    backend: str
    images: int
    max_score_diff: float
    p99_score_diff: float
    label_agreement: float
    flipped_labels: int
    nearest_to_threshold: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, f: Fields) -> PrecisionCheck:
        check = cls(
            backend=f.string("backend"),
            images=f.integer("images", 1),
            max_score_diff=f.number("max_score_diff", 0.0),
            p99_score_diff=f.number("p99_score_diff", 0.0),
            label_agreement=f.number("label_agreement", 0.0, 1.0),
            flipped_labels=f.integer("flipped_labels", 0),
            nearest_to_threshold=f.number("nearest_to_threshold", 0.0),
        )
        f.end()
        return check


@dataclass(frozen=True)
class Int8Graph:
    """The int8 graph quantized from one fp32 graph, and (once measured) its check on validation images."""

    file: str
    method: str
    embedding_error: float  # mean relative error of its embeddings on validation tiles
    validation: PrecisionCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        validation = None if self.validation is None else self.validation.to_dict()
        return {"file": self.file, "method": self.method, "embedding_error": self.embedding_error} | {
            "validation": validation
        }

    @classmethod
    def read(cls, f: Fields) -> Int8Graph:
        validation = PrecisionCheck.read(f.object("validation")) if f.has("validation") else None
        graph = cls(f.name("file"), f.string("method"), f.number("embedding_error", 0.0), validation)
        f.end()
        return graph


@dataclass(frozen=True)
class ReducedPrecision:
    """The reduced precisions a bundle offers CPUs: int8 graphs (by fp32 graph name) and bf16 (a load hint)."""

    floor: float  # the label agreement with fp32 each precision had to reach
    int8: dict[str, Int8Graph] = field(default_factory=dict)
    bf16: PrecisionCheck | None = None

    def checks(self, precision: str) -> list[PrecisionCheck]:
        """Every validation check recorded for `precision` (one per int8 graph, one for bf16)."""
        if precision == "bf16":
            return [self.bf16] if self.bf16 is not None else []
        if precision == "int8":
            return [graph.validation for graph in self.int8.values() if graph.validation is not None]
        return []

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"floor": self.floor}
        if self.int8:
            raw["int8"] = {name: graph.to_dict() for name, graph in self.int8.items()}
        if self.bf16 is not None:
            raw["bf16"] = {"validation": self.bf16.to_dict()}
        return raw

    @classmethod
    def read(cls, f: Fields) -> ReducedPrecision:
        floor = f.number("floor", 0.0)
        int8 = {}
        if f.has("int8"):
            graphs = f.object("int8")
            for name in graphs.raw:
                if (problem := plain_name_problem(name)) is not None:
                    graphs.fail(name, f"an fp32 graph's plain file name, not {problem}", name)
                int8[name] = Int8Graph.read(graphs.object(name))
        bf16 = None
        if f.has("bf16"):
            block = f.object("bf16")
            bf16 = PrecisionCheck.read(block.object("validation"))
            block.end()
        f.end()
        return cls(floor, int8, bf16)


def _read_cascade_stage(f: Fields, last: bool) -> CascadeStage:
    members = f.value("members", "a list of member indices")
    if not isinstance(members, list) or not members or not all(_is_int(m) and m >= 0 for m in members):
        f.fail("members", "a non-empty list of member indices", members)
    window = None
    if last:
        if f.has("window"):
            f.refuse("window", "the last stage has no window (every image it sees ends there)")
    else:
        window = f.numbers("window", 2)
        if window[0] > window[1]:
            f.fail("window", "[low, high] with low <= high", list(window))
    stage = CascadeStage(tuple(members), window, f.number("gflops", 0.0), f.number("exit_share", 0.0, 1.0))
    f.end()
    return stage


def _read_cascade(f: Fields) -> Cascade:
    stages = f.objects("stages", at_least=2)
    cascade = Cascade(
        stages=tuple(_read_cascade_stage(g, i == len(stages) - 1) for i, g in enumerate(stages)),
        target_agreement=f.number("target_agreement", 0.0, 1.0, above=True),
        margin=f.number("margin", 0.0),
        agreement=f.number("agreement", 0.0, 1.0),
        calibration_images=f.integer("calibration_images", 1),
        order_rule=f.string("order_rule", ORDER_RULES),
        calibration_scores=_read_score_rows(f, "calibration_scores"),
    )
    f.end()
    return cascade


def _read_score_rows(f: Fields, key: str) -> tuple[tuple[float, ...], ...]:
    """A list of equally long lists of finite numbers (one per member), or [] (none recorded)."""
    rows = f.value(key, "a list of per-member score lists")
    if not isinstance(rows, list) or not all(isinstance(r, list) and all(_is_number(v) for v in r) for r in rows):
        f.fail(key, "a list of per-member lists of finite numbers", "..." if isinstance(rows, list) else rows)
    if rows and (len({len(r) for r in rows}) != 1 or not rows[0]):
        f.fail(key, "per-member lists of one non-zero length", [len(r) for r in rows])
    return tuple(tuple(float(v) for v in r) for r in rows)


@dataclass(frozen=True)
class Coarse:
    """The spatial cascade's coarse stage (runtime.spatial): one member over the whole image as one tile,
    its calibration, the blur its maps were calibrated with, and the gate deciding which fine tiles run."""

    member: Member  # one bank; its engine is deduplicated with the fine members' like any graph
    tiling: Tiling  # one tile: the whole image, resized to backbone_input
    calibration: MemberCalibration  # the coarse run's (calibration.json); its image stats make the z-map
    blur_sigma: float  # the coarse run's tile-map blur
    gate: TileGate
    source_run: str  # informational: the coarse run

    def to_dict(self) -> dict[str, Any]:
        return {
            "member": self.member.to_dict(),
            "tiling": self.tiling.to_dict(),
            "calibration": self.calibration.to_dict(),
            "blur_sigma": self.blur_sigma,
            "source_run": self.source_run,
            **self.gate.to_dict(),
        }


def _number_rows(f: Fields, key: str, value: Any) -> tuple[tuple[float, ...], ...]:
    """A list of equally long, non-empty lists of finite numbers."""
    if not (isinstance(value, list) and value and all(isinstance(r, list) and r and all(_is_number(v) for v in r)
                                                      for r in value)):  # fmt: skip
        f.fail(key, "a non-empty list of non-empty lists of finite numbers", "...")
    if len({len(r) for r in value}) != 1:
        f.fail(key, "lists of one length", sorted({len(r) for r in value}))
    return tuple(tuple(float(v) for v in r) for r in value)


def _read_gate_scores(f: Fields) -> GateScores:
    """The gate's calibration images (runtime.spatial.GateScores); shapes are checked against the bundle in
    Manifest.check_coarse."""
    maxima = _number_rows(f, "maxima", f.value("maxima", "a list of per-image lists"))
    normal = f.value("normal", "a list of booleans")
    if not isinstance(normal, list) or not all(isinstance(v, bool) for v in normal) or len(normal) != len(maxima):
        f.fail("normal", f"{len(maxima)} booleans (one per image of maxima)", "...")
    members = f.value("tile_scores", "a list of per-member lists")
    if not isinstance(members, list) or not members:
        f.fail("tile_scores", "a non-empty list of per-member lists", "...")
    tiles = tuple(_number_rows(f, f"tile_scores[{m}]", rows) for m, rows in enumerate(members))
    if any(len(t) != len(maxima) or len(t[0]) != len(maxima[0]) for t in tiles):
        f.fail("tile_scores", f"per member, the shape of maxima ({len(maxima)} x {len(maxima[0])})", "...")
    f.end()
    return GateScores(maxima, tuple(normal), tiles)


def _read_coarse(f: Fields) -> Coarse:
    threshold = f.value("tile_threshold", "a finite number, or null (every tile runs)")
    if threshold is not None and not _is_number(threshold):
        f.fail("tile_threshold", "a finite number, or null (every tile runs)", threshold)
    gate = TileGate(
        tile_threshold=-math.inf if threshold is None else float(threshold),
        target_agreement=f.number("target_agreement", 0.0, 1.0, above=True),
        margin=f.number("margin", 0.0),
        agreement=f.number("agreement", 0.0, 1.0),
        tile_share=f.number("tile_share", 0.0, 1.0),
        calibration_images=f.integer("calibration_images", 1),
        scores=_read_gate_scores(f.object("gate_scores")) if f.has("gate_scores") else None,
    )
    coarse = Coarse(
        member=Member.read(f.object("member")),
        tiling=Tiling.read(f.object("tiling")),
        calibration=_read_member_calibration(f.object("calibration")),
        blur_sigma=f.number("blur_sigma", 0.0),
        gate=gate,
        source_run=f.string("source_run"),
    )
    f.end()
    return coarse


# --- the bundle's identity ---------------------------------------------------------------------------

_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


@dataclass(frozen=True)
class Identity:
    """Which model a bundle is (export/identity.py): a name and version the user gives, when it was made, and
    fingerprints of what made it. `training_data_sha256`: sha256 over the sorted relative names and bytes of
    the run's training and validation images (None: a run trained before tilecore recorded it);
    `config_sha256`: sha256 of the run config's canonical JSON."""

    name: str
    version: str
    created: str  # UTC time, ISO 8601 with a Z, e.g. 2026-12-02T12:00:00Z
    training_data_sha256: str | None
    training_images: int  # how many images that fingerprint covers (0 when it is None)
    config_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "training_data_sha256": self.training_data_sha256,
            "training_images": self.training_images,
            "config_sha256": self.config_sha256,
        }

    @classmethod
    def read(cls, f: Fields) -> Identity:
        data = f.string("training_data_sha256") if f.has("training_data_sha256") else None
        identity = cls(
            f.string("name"),
            f.string("version"),
            f.string("created"),
            data,
            f.integer("training_images", 0),
            f.string("config_sha256"),
        )
        for key in ("name", "version"):
            value = getattr(identity, key)
            if not value or not value.isprintable() or value != value.strip():
                f.fail(key, "a non-empty printable string without surrounding spaces", value)
        if not _CREATED.fullmatch(identity.created):
            f.fail("created", "a UTC time like 2026-12-02T12:00:00Z", identity.created)
        for key in ("training_data_sha256", "config_sha256"):
            value = getattr(identity, key)
            if value is not None and not _SHA256.fullmatch(value):
                f.fail(key, "a sha256 (64 lowercase hex digits)", value)
        f.end()
        return identity


# --- the manifest -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """Everything a bundle says about itself; `files` holds the sha256 of every file but the manifest's own."""

    tilecore_version: str
    category: str
    source_run: str  # informational: where `tilecore bench` finds the PyTorch model
    created_with: dict[str, str | int]  # library versions (and the ONNX opset) the bundle was made with
    image_size: tuple[int, int]
    tiling: Tiling
    members: tuple[Member, ...]
    postprocess: Postprocess
    calibration: Calibration
    thresholds: Thresholds
    files: dict[str, str]  # plain file name -> sha256
    tensorrt: tuple[EngineRecord, ...] = ()  # engines tied to a GPU model + TensorRT version
    reduced_precision: ReducedPrecision | None = None
    identity: Identity | None = None  # name, version, created, fingerprints; every bundle read or written has one
    cascade: Cascade | None = None  # early-exit stages over the members (runtime.cascade), set at export
    coarse: Coarse | None = None  # the spatial cascade's coarse stage (runtime.spatial), set at export

    @property
    def graphs(self) -> set[str]:
        """The fp32 ONNX graphs the members run (one per distinct backbone)."""
        return {member.engine for member in self.members}

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tilecore_version": self.tilecore_version,
            "category": self.category,
            **({"identity": self.identity.to_dict()} if self.identity is not None else {}),
            "source_run": self.source_run,
            "created_with": dict(self.created_with),
            "image_size": list(self.image_size),
            "tiling": self.tiling.to_dict(),
            "members": [member.to_dict() for member in self.members],
            "postprocess": self.postprocess.to_dict(),
            "calibration": self.calibration.to_dict(),
            "thresholds": self.thresholds.to_dict(),
        }
        if self.tensorrt:
            raw["tensorrt"] = [record.to_dict() for record in self.tensorrt]
        if self.reduced_precision is not None:
            raw["reduced_precision"] = self.reduced_precision.to_dict()
        if self.cascade is not None:
            raw["cascade"] = self.cascade.to_dict()
        if self.coarse is not None:
            raw["coarse"] = self.coarse.to_dict()
        raw["files"] = dict(sorted(self.files.items()))
        return raw

    @classmethod
    def from_dict(cls, raw: Any, where: str = "manifest") -> Manifest:
        """Check every field of a parsed manifest.json; `where` ("bundle PATH") starts every refusal."""
        f = Fields(raw, "", where)
        f.string("format", (FORMAT,))
        version = f.value("format_version", f"format version {FORMAT_VERSION}")
        if version != FORMAT_VERSION:
            raise TilecoreError(version_refusal(where, version))
        created = f.mapping("created_with")
        for key, value in created.items():
            if not (isinstance(value, str) or _is_int(value)):
                f.fail(f"created_with.{key}", "a version string or integer", value)
        files = f.mapping("files")
        for name, digest in files.items():
            if (problem := plain_name_problem(name)) is not None:
                f.fail(f"files.{name}", f"a plain file name inside the bundle, not {problem}", name)
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                f.fail(f"files.{name}", "a sha256 (64 lowercase hex digits)", digest)
        manifest = cls(
            tilecore_version=f.string("tilecore_version"),
            category=f.string("category"),
            source_run=f.string("source_run"),
            created_with=dict(created),
            image_size=f.integers("image_size", 2),
            tiling=Tiling.read(f.object("tiling")),
            members=tuple(Member.read(g) for g in f.objects("members", at_least=1)),
            postprocess=Postprocess.read(f.object("postprocess")),
            calibration=Calibration.read(f.object("calibration")),
            thresholds=Thresholds.read(f.object("thresholds")),
            files=dict(files),
            tensorrt=tuple(EngineRecord.read(g) for g in f.objects("tensorrt")) if f.has("tensorrt") else (),
            reduced_precision=_optional(f, "reduced_precision", ReducedPrecision.read),
            identity=Identity.read(f.object("identity")),
            cascade=_optional(f, "cascade", _read_cascade),
            coarse=_optional(f, "coarse", _read_coarse),
        )
        f.end()
        manifest.check_consistent(f)
        return manifest

    def check_consistent(self, f: Fields) -> None:
        """The parts agree with each other, and every file named anywhere is listed in `files`."""
        count = self.tiling.grid[0] * self.tiling.grid[1]
        if self.tiling.image != self.image_size:
            f.fail("tiling.image", f"the image_size {list(self.image_size)}", list(self.tiling.image))
        named: list[tuple[str, str]] = []  # (field path, file name)
        for i, member in enumerate(self.members):
            at = f"members[{i}]"
            if (member.preprocess.height, member.preprocess.width) != self.image_size:
                size = [member.preprocess.height, member.preprocess.width]
                f.fail(f"{at}.preprocess", f"height, width = image_size {list(self.image_size)}", size)
            if len(member.banks) != count:
                f.fail(f"{at}.banks", f"{count} file names (one per tile location)", len(member.banks))
            named.append((f"{at}.engine", member.engine))
            named += [(f"{at}.indexes[{j}].file", r.file) for j, r in enumerate(member.indexes)]
        if len(self.calibration.members) != len(self.members):
            expected = f"{len(self.members)} entries (one per member)"
            f.fail("calibration.members", expected, len(self.calibration.members))
        for i, calibration in enumerate(self.calibration.members):
            if len(calibration.per_location) != count:
                f.fail(f"calibration.members[{i}].per_location", f"{count} entries (one per tile location)",
                       len(calibration.per_location))  # fmt: skip
        for i, record in enumerate(self.tensorrt):
            if record.onnx not in self.graphs:
                f.fail(f"tensorrt[{i}].onnx", f"one of the members' engines {sorted(self.graphs)}", record.onnx)
            named.append((f"tensorrt[{i}].engine", record.engine))
        if self.reduced_precision is not None:
            for name, graph in self.reduced_precision.int8.items():
                if name not in self.graphs:
                    f.fail(f"reduced_precision.int8.{name}", f"one of the members' engines {sorted(self.graphs)}", name)
                named.append((f"reduced_precision.int8.{name}.file", graph.file))
        if self.cascade is not None:
            self.check_cascade(f)
        if self.coarse is not None:
            named += self.check_coarse(f, count)
        for path, name in named:
            if name not in self.files:
                f.refuse(path, f"{name!r} is not listed in files (every file a bundle uses needs its sha256 there)")

    def check_cascade(self, f: Fields) -> None:
        """Every member runs in exactly one stage, and every window contains the image threshold."""
        order = sorted(self.cascade.order)
        if order != list(range(len(self.members))):
            f.fail("cascade.stages", f"each member index 0..{len(self.members) - 1} in exactly one stage", order)
        rows = len(self.cascade.calibration_scores)
        if rows not in (0, len(self.members)):
            f.fail("cascade.calibration_scores", f"one score list per member ({len(self.members)})", rows)
        for i, stage in enumerate(self.cascade.stages):
            if stage.window is not None and not stage.window[0] <= self.thresholds.image <= stage.window[1]:
                f.fail(f"cascade.stages[{i}].window", f"a window containing the image threshold "
                       f"{self.thresholds.image:.6g}", list(stage.window))  # fmt: skip

    def check_coarse(self, f: Fields, count: int) -> list[tuple[str, str]]:
        """The coarse stage covers the bundle's image as one tile of a tiled bundle; returns its files."""
        c = self.coarse
        if count < 2:
            f.refuse("coarse", "a coarse stage gates the tiles of a tiled bundle; this one has one tile")
        if c.tiling.grid != (1, 1) or c.tiling.image != self.image_size:
            f.fail("coarse.tiling", f"one tile over the image_size {list(self.image_size)}",
                   {"image": list(c.tiling.image), "grid": list(c.tiling.grid)})  # fmt: skip
        if (c.member.preprocess.height, c.member.preprocess.width) != self.image_size:
            size = [c.member.preprocess.height, c.member.preprocess.width]
            f.fail("coarse.member.preprocess", f"height, width = image_size {list(self.image_size)}", size)
        if len(c.member.banks) != 1:
            f.fail("coarse.member.banks", "1 file name (one tile location)", len(c.member.banks))
        if len(c.calibration.per_location) != 1:
            f.fail("coarse.calibration.per_location", "1 entry (one tile location)", len(c.calibration.per_location))
        if c.gate.scores is not None:
            shape = (len(c.gate.scores.tile_scores), len(c.gate.scores.maxima[0]))
            if shape != (len(self.members), count):
                f.fail("coarse.gate_scores", f"{len(self.members)} member(s) x {count} tile locations",
                       list(shape))  # fmt: skip
        named = [("coarse.member.engine", c.member.engine)]
        return named + [(f"coarse.member.indexes[{j}].file", r.file) for j, r in enumerate(c.member.indexes)]


def version_refusal(where: str, version: Any) -> str:
    return (
        f"{where}: {MANIFEST_FILE} has format version {_shown(version)}, this tilecore reads version "
        f"{FORMAT_VERSION}; re-export the bundle with this tilecore"
    )


# --- reading and writing ------------------------------------------------------------------------------


def canonical_json(raw: dict[str, Any]) -> bytes:
    """The one byte form of a manifest: sorted keys, two-space indent, ASCII, no NaN, final newline."""
    return (json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def digest_line(manifest_bytes: bytes) -> str:
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST_FILE}\n"


def write_manifest(folder: str | Path, manifest: Manifest) -> None:
    """Write manifest.json (canonical JSON, checked against the schema first) and its digest, each atomically.

    The digest is written second: a crash between the two leaves a bundle that is refused, never one that
    loads an unchecked manifest."""
    folder = Path(folder)
    data = canonical_json(manifest.to_dict())
    Manifest.from_dict(json.loads(data), f"bundle {folder}")  # never write a manifest the runtime would refuse
    atomic_write_bytes(folder / MANIFEST_FILE, data)
    atomic_write_bytes(folder / DIGEST_FILE, digest_line(data).encode("ascii"))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _parse(data: bytes, where: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: also 5000-digit integers
        raise TilecoreError(f"{where}: {MANIFEST_FILE} is not valid JSON ({exc})") from None


def check_digest(bundle: Path, data: bytes) -> None:
    """Refuse manifest bytes that do not match the bundle's DIGEST_FILE (or a bundle without one)."""
    where = f"bundle {bundle}"
    path = bundle / DIGEST_FILE
    if not path.is_file():
        raw = _parse(data, where)
        if isinstance(raw, dict) and raw.get("format") == FORMAT and raw.get("format_version") != FORMAT_VERSION:
            raise TilecoreError(version_refusal(where, raw.get("format_version")))
        raise TilecoreError(f"{where}: no {DIGEST_FILE} beside {MANIFEST_FILE}, so the manifest is unchecked; "
                            "re-export the bundle with this tilecore")  # fmt: skip
    with open(path, "rb") as f:
        words = f.read(256).split()  # a digest line is 80 bytes; never read a link to /dev/zero whole
    if not words or not _SHA256.fullmatch(words[0].decode("ascii", "replace")):
        raise TilecoreError(f"{where}: {DIGEST_FILE} does not hold a sha256 digest; re-export the bundle")
    if words[0].decode("ascii") != hashlib.sha256(data).hexdigest():
        raise TilecoreError(
            f"{where}: {MANIFEST_FILE} does not match {DIGEST_FILE} (edited or corrupted after export); "
            "re-export the bundle"
        )


def read_manifest(bundle: str | Path, verify: bool = True, trust: str | Path | Any = None) -> Manifest:
    """Load and check a bundle's manifest: its digest, every field, and with `verify` every file's sha256.

    `trust` (a public key file, runtime.signing): the bundle's signature must verify over the very bytes
    that are then parsed, so the manifest cannot change between the check and the use.
    """
    bundle = Path(bundle)
    where = f"bundle {bundle}"
    path = bundle / MANIFEST_FILE
    if not bundle.is_dir():
        raise TilecoreError(f"{where}: folder not found")
    if not path.is_file():
        raise TilecoreError(f"{where}: no {MANIFEST_FILE} (not a bundle, or an unfinished export)")
    try:
        data = path.read_bytes()  # hashed, signature-checked and parsed from these same bytes
    except OSError as exc:
        raise TilecoreError(f"{where}: cannot read {MANIFEST_FILE} ({exc.strerror})") from None
    if trust is not None:
        from tilecore.runtime.signing import verify_manifest_bytes  # cryptography loads only when asked

        verify_manifest_bytes(bundle, data, trust)
    try:
        check_digest(bundle, data)
    except OSError as exc:
        raise TilecoreError(f"{where}: cannot read {DIGEST_FILE} ({exc.strerror})") from None
    raw = _parse(data, where)
    if isinstance(raw, dict) and raw.get("format") == FORMAT and raw.get("format_version") != FORMAT_VERSION:
        raise TilecoreError(version_refusal(where, raw.get("format_version")))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise TilecoreError(f"{where}: {MANIFEST_FILE} is not a {FORMAT} manifest")
    manifest = Manifest.from_dict(raw, where)
    if verify:
        for name, expected in manifest.files.items():
            file = bundle / name
            if file.is_symlink():  # its bytes may be checked, but the file would live outside the bundle
                raise TilecoreError(f"{where}: {name!r} is a symbolic link; a bundle holds its files itself")
            if not file.is_file():
                raise TilecoreError(f"{where}: {name} is missing")
            if sha256_file(file) != expected:
                raise TilecoreError(f"{where}: {name} is corrupt or altered (sha256 mismatch)")
    return manifest


def read_checked(bundle: str | Path, manifest: Manifest, name: str) -> bytes:
    """The bytes of bundle file `name`, read once and returned only if they match its sha256 in `manifest`,
    so what the caller loads is exactly what was checked (a file swapped afterwards changes nothing).

    Refused in one line: a name the manifest does not list, a symbolic link (opened with O_NOFOLLOW, so
    no link can be swapped in between a check and the open), anything but a regular file, a mismatch."""
    bundle = Path(bundle)
    where = f"bundle {bundle}"
    expected = manifest.files.get(name)
    if expected is None:
        raise TilecoreError(f"{where}: {name!r} is not listed in the manifest's files, so it cannot be checked")
    try:
        fd = os.open(bundle / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise TilecoreError(f"{where}: {name} is missing") from None
    except OSError as exc:
        if (bundle / name).is_symlink():  # O_NOFOLLOW refused it (ELOOP)
            raise TilecoreError(f"{where}: {name!r} is a symbolic link; a bundle holds its files itself") from None
        raise TilecoreError(f"{where}: cannot read {name} ({exc.strerror})") from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a FIFO or a device would never end
            raise TilecoreError(f"{where}: {name} is not a regular file")
        try:
            data = f.read()
        except OSError as exc:
            raise TilecoreError(f"{where}: cannot read {name} ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise TilecoreError(f"{where}: {name} is corrupt or altered (sha256 mismatch)")
    return data


def verify_bundle(folder: str | Path, public_key: str | Path | Any, check_files: bool = True) -> Any:
    """Refuse, in one line, a bundle that is unsigned, signed by another key, or changed after signing;
    returns its runtime.signing.Signature. `public_key`: a key file or a signing.TrustedKey.

    The signature covers manifest.json; with `check_files` (read_manifest) every file it lists is also
    checked against its sha256. Here, not in runtime.signing, so that signing never imports the manifest.
    """
    from tilecore.runtime.signing import read_manifest_bytes, read_signature, verify_manifest_bytes

    folder = Path(folder)
    if check_files:
        read_manifest(folder, trust=public_key)  # verifies the signature over the very bytes it parses
        return read_signature(folder)
    return verify_manifest_bytes(folder, read_manifest_bytes(folder), public_key)
