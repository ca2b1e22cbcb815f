"""Run configuration: dataclasses with defaults, loaded from TOML and validated key by key.

The defaults are the embedded main job: the synthetic brick/grass/gravel dataset at 256 px, one untiled
tf_efficientnet_lite0 member with its real ImageNet weights. A config names its ensemble members as a
TOML array of tables (`[[members]]`) and its tile grid in `[tiling]`, directly or through a preset.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from tilecore.runtime.calibration import FUSION_RULES, THRESHOLD_RULES
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import RULE_NEAREST, RULE_REWEIGHTED
from tilecore.runtime.merge import IMAGE_SCORE_RULES, NORMALISATION_LEVELS, MergeRule


@dataclass(frozen=True)
class Preset:
    """A tile setup relative to the image size S (tile, stride and backbone input as fractions of S), and the
    tiling.neighbourhood it implies unless the config sets that key itself."""

    tile: float
    stride: float
    input: float
    stacked: bool  # one bank shared by all tile locations
    neighbourhood: int = 0  # each tile location searches the banks of the locations this many steps around


# The paper's setups (Rolih et al., Table 1 at 512 px), relative to the image size S so that they scale
# to 1024 and 2048. For a non-square image_size [h, w], S is the shorter side: tiles stay square and the
# grid grows along the longer side.
PRESETS = {
    "SM256": Preset(1.0, 1.0, 0.5, False),  # single model on the image downscaled by 2
    "SM512": Preset(1.0, 1.0, 1.0, False),  # single model at full resolution
    "ST4": Preset(0.5, 0.5, 0.5, True),  # 2 x 2 tiles, one bank shared by all tiles
    "ST9": Preset(0.5, 0.25, 0.5, True),  # 3 x 3 overlapping tiles, one shared bank
    "ENS4": Preset(0.5, 0.5, 0.5, False),  # 2 x 2 tiles, one bank per tile location
    "ENS9": Preset(0.5, 0.25, 0.5, False),  # 3 x 3 overlapping tiles, one bank per tile location
    "ENS9N": Preset(0.5, 0.25, 0.5, False, 1),  # ENS9's banks, each location searching its 3 x 3 neighbours'
}

CASCADE_MODES = ("auto", "off")  # export --cascade and [cascade] mode
AMP_MODES = ("off", "bf16", "fp16")  # [train] amp: autocast dtype of the backbone (train.device)
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"  # [train] device and `train --device` (train.device resolves them)
CHOICES = {
    ("data", "format"): ("auto", "mvtec", "mvtec_ad2", "visa", "visa_folders", "plain"),
    ("data", "bit_depth"): ("auto", 8, 10, 12, 14, 16),
    ("members", "scoring"): (RULE_NEAREST, RULE_REWEIGHTED),
    ("tiling", "preset"): ("", *PRESETS),
    ("tiling", "image_score"): IMAGE_SCORE_RULES,
    ("tiling", "normalisation"): NORMALISATION_LEVELS,
    ("fusion", "rule"): FUSION_RULES,
    ("fusion", "threshold"): THRESHOLD_RULES,
    ("cascade", "mode"): CASCADE_MODES,
    ("train", "amp"): AMP_MODES,
}


@dataclass
class DataConfig:
    root: str = "data/synth256"
    format: str = "auto"  # auto: detected from the folder (docs/datasets.md)
    categories: list[str] = field(default_factory=list)  # empty: every category under root
    image_size: int | list[int] = 256  # S (square) or [h, w]: images are resized to it; maps and metrics live here
    val_fraction: float = 0.1  # normal training images held out for calibration
    test_fraction: float = 0.2  # good images held out for testing, in layouts with no test split of their own
    split_seed: int = 0
    bit_depth: str | int = "auto"  # significant bits of the pixels (runtime.image_io.to_uint8); auto: the container's


@dataclass
class MemberConfig:
    backbone: str = "tf_efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    pretrained: bool = True
    weights: str = ""  # explicit weight file; empty: offline package, then the timm hub
    patch_size: int = 3
    pretrain_embed_dimension: int = 1024
    target_embed_dimension: int = 384
    coreset_ratio: float = 0.1
    scoring: str = RULE_NEAREST
    num_neighbours: int = 1
    mean: list[float] = field(default_factory=list)  # empty: the backbone weights' own normalisation
    std: list[float] = field(default_factory=list)


@dataclass
class TilingConfig:
    preset: str = ""  # one of PRESETS; sets tile_size, stride, input_size and stacked from image_size
    # tile location (r, c) is scored against the union of the banks of every location (r', c') with
    # max(|r - r'|, |c - c'|) <= neighbourhood (train.ensemble.neighbourhood_locations); 0: its own bank only.
    # A preset's value applies when the config leaves this key out (config_from_dict).
    neighbourhood: int = 0
    tile_size: list[int] = field(default_factory=list)  # [h, w]; empty: the whole image is one tile
    stride: list[int] = field(default_factory=list)  # [h, w]; empty: equal to tile_size
    input_size: list[int] = field(default_factory=list)  # [h, w] the backbone sees; empty: tile_size
    stacked: bool = False  # one bank for all tile locations (the paper's ST setups)
    image_score: str = "mean"  # tile scores -> image score
    normalisation: str = "image"
    seam_band: float = 0.1  # seam smoothing band on each side, fraction of the tile size
    seam_sigma: float = 4.0
    blur_sigma: float = 4.0  # Gaussian blur of each tile's map (PatchCore's sigma 4)


@dataclass
class FusionConfig:
    rule: str = "mean"  # how members' normalised scores and maps combine
    threshold: str = "auto"  # auto: F1 on anomalous validation images, else on synthetic defects painted into them
    quantile: float = 0.99
    pixel_quantile: float = 0.999


@dataclass
class CascadeConfig:
    mode: str = "auto"  # auto: an ensemble's bundle runs its members cheapest first with exit windows; off
    agreement: float = 0.995  # share of calibration images that must keep the full ensemble's label
    margin: float = 1.0  # window widening, in standard deviations of (full - stage score) on calibration images
    order: list[int] = field(default_factory=list)  # member order; empty: cheapest first (backbone GFLOPs)
    search_order: bool = False  # try every member order, keep the one spending the fewest GFLOPs on calibration images


@dataclass
class TrainConfig:
    batch_size: int = 8  # images read and scored together
    pixels_per_pass: int = 262144  # backbone batch budget in input pixels (4 tiles of 256 x 256)
    seed: int = 0
    threads: int = 0  # 0: torch's default
    device: str = "auto"  # auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N; `train --device` wins
    amp: str = "off"  # off, bf16 or fp16 (CUDA only): autocast of the backbone; embeddings are stored float32


@dataclass
class RayConfig:
    """Resources of each Ray task (`--ray`); execution keys: a change never touches the banks or a resume."""

    num_cpus: float = 1.0  # CPUs each task holds (its torch threads, unless train.threads says otherwise)
    num_gpus: float = 0.0  # GPUs each task holds; 1 with train.device cuda, fractions share a GPU
    max_retries: int = 3  # reruns of a task whose worker died (a killed process, a lost node)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    members: list[MemberConfig] = field(default_factory=lambda: [MemberConfig()])
    tiling: TilingConfig = field(default_factory=TilingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge_rule(self) -> MergeRule:
        t = self.tiling
        return MergeRule(t.image_score, t.normalisation, self.fusion.rule, t.blur_sigma, t.seam_band, t.seam_sigma)


TABLES = {
    "data": DataConfig,
    "tiling": TilingConfig,
    "fusion": FusionConfig,
    "train": TrainConfig,
    "cascade": CascadeConfig,
    "ray": RayConfig,
}


# Which keys define the memory banks. The post-processing keys change only what happens after the banks: which
# banks a tile location searches, kNN scoring, maps, merging, normalisation, fusion, thresholds, cascades. A run
# folder whose config differs from a new one in post-processing keys alone keeps its banks and is recalibrated
# (train.run_dir.prepare_run_dir); every other key defines the banks, and a change to it is refused. The tiling's
# GEOMETRY_KEYS count by the tile geometry they resolve to (tiling_geometry): ENS9 and ENS9N, or a preset and
# the same sizes spelled out, share banks.
ALL_KEYS = "*"
POSTPROCESSING_KEYS: dict[str, tuple[str, ...] | str] = {
    "tiling": ("neighbourhood", "image_score", "normalisation", "seam_band", "seam_sigma", "blur_sigma"),
    "members": ("scoring", "num_neighbours"),  # how a bank is searched, not what it holds
    "fusion": ALL_KEYS,
    "cascade": ALL_KEYS,
}
EXECUTION_SECTIONS = ("ray",)  # where the work runs: a change neither refuses nor recalibrates a run
GEOMETRY_KEYS = ("preset", "tile_size", "stride", "input_size", "stacked")  # [tiling]


def is_postprocessing(section: str, key: str) -> bool:
    keys = POSTPROCESSING_KEYS.get(section, ())
    return keys == ALL_KEYS or key in keys


TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}


def type_name(value: Any) -> str:
    return TYPE_NAMES.get(type(value), type(value).__name__)


def matches(expected: type, value: Any) -> bool:
    """Whether `value` is of the scalar type `expected` (TOML integers count as numbers, booleans only as booleans)."""
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def element_type(cls: type, key: str) -> type | None:
    """The element type of a list-typed field (`list[str]` -> str), None for other fields."""
    hint = get_type_hints(cls)[key]
    return get_args(hint)[0] if get_origin(hint) is list else None


# Keys whose value may be of more than one type: (section, key) -> what is expected, checked by `check_mixed`.
MIXED = {
    ("data", "image_size"): "integer >= 32 or [height, width]",
    ("data", "bit_depth"): '"auto" or one of 8, 10, 12, 14, 16',
}


def check_mixed(where: str, key: tuple[str, str], value: Any) -> Any:
    if key == ("data", "image_size"):
        if isinstance(value, list) and len(value) == 2 and all(matches(int, v) for v in value):
            return list(value)
        if matches(int, value):
            return value
    elif value in CHOICES[key] and type(value) in (str, int):
        return value
    raise TilecoreError(f"{where}: got {type_name(value)} {value!r}, expected {MIXED[key]}")


def check_value(where: str, default: Any, value: Any, element: type | None = None) -> Any:
    """Check `value` against the type of the field's default, and each element of a list against `element`;
    returns it (ints widen to floats)."""
    if not matches(type(default), value):
        raise TilecoreError(f"{where}: got {type_name(value)} {value!r}, expected {type_name(default)}")
    if isinstance(default, float):
        return float(value)
    if element is None:
        return value
    for j, item in enumerate(value):
        if not matches(element, item):
            shown = f"{TYPE_NAMES[element]}s" if element is not float else "numbers"
            raise TilecoreError(f"{where}[{j}]: got {type_name(item)} {item!r}, expected a list of {shown}")
    return [float(item) for item in value] if element is float else value


def build_table(cls: type, values: Any, section: str, origin: str) -> Any:
    if not isinstance(values, dict):
        raise TilecoreError(f"{origin}: [{section}] must be a table")
    defaults = cls()
    allowed = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise TilecoreError(f"{origin}: unknown key {section}.{key}; allowed: {', '.join(allowed)}")
        where = f"{origin}: {section}.{key}"
        if (section, key) in MIXED:
            kwargs[key] = check_mixed(where, (section, key), value)
            continue
        kwargs[key] = check_value(where, getattr(defaults, key), value, element_type(cls, key))
        choices = CHOICES.get((section, key))
        if choices and value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise TilecoreError(f"{origin}: {section}.{key} = {value!r}; allowed: {shown}")
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
    allowed = sorted([*TABLES, "members"])
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        hint = " (members are [[members]] tables)" if unknown[0] == "model" else ""
        raise TilecoreError(f"{origin}: unknown section [{unknown[0]}]{hint}; allowed: {', '.join(allowed)}")
    built = {name: build_table(cls, raw.get(name, {}), name, origin) for name, cls in TABLES.items()}
    tiling = built["tiling"]
    if tiling.preset and "neighbourhood" not in raw.get("tiling", {}):  # a key the config sets wins
        tiling.neighbourhood = PRESETS[tiling.preset].neighbourhood
    members_raw = raw.get("members", [{}])
    if not isinstance(members_raw, list) or not members_raw:
        raise TilecoreError(f"{origin}: members must be one or more [[members]] tables")
    members = [build_table(MemberConfig, m, "members", f"{origin} member {i}") for i, m in enumerate(members_raw)]
    config = Config(members=members, **built)
    validate(config, origin)
    return config


def pair(values: list[int], key: str, origin: str) -> tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2 and all(isinstance(v, int) for v in values):
        return values[0], values[1]
    raise TilecoreError(f"{origin}: tiling.{key} = {values!r}; expected [size] or [height, width] in pixels")


def image_hw(config: Config) -> tuple[int, int]:
    """The working image size (height, width) from data.image_size (an integer S means S x S)."""
    size = config.data.image_size
    return (size[0], size[1]) if isinstance(size, list) else (size, size)


def tiling_geometry(config: Config) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], bool]:
    """(tile, stride, backbone input, stacked) in pixels, from the preset or the explicit fields."""
    hw = image_hw(config)
    s = min(hw)  # presets scale with the shorter side, so their tiles stay square
    t = config.tiling
    if t.preset:
        p = PRESETS[t.preset]
        return (round(p.tile * s),) * 2, (round(p.stride * s),) * 2, (round(p.input * s),) * 2, p.stacked
    tile = pair(t.tile_size, "tile_size", "config") if t.tile_size else hw
    stride = pair(t.stride, "stride", "config") if t.stride else tile
    model_input = pair(t.input_size, "input_size", "config") if t.input_size else tile
    return tile, stride, model_input, t.stacked


def check_device_name(value: str, where: str = "train.device") -> str:
    """`value` if it is a device name training understands (its GPU is checked when the run starts)."""
    kind, colon, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit() and index.isascii()):
        return value
    raise TilecoreError(f"{where} {value!r}: expected {DEVICE_FORMS}")


def validate(config: Config, origin: str = "config") -> None:
    """Range checks that need no files or models (those come when the run starts)."""
    d, t, f, tr, c = config.data, config.tiling, config.fusion, config.train, config.cascade
    checks = [
        (min(image_hw(config)) >= 32, "data.image_size", d.image_size, "an integer >= 32 or [height, width] >= 32"),
        (
            all(c not in ("", ".", "..") and "/" not in c and "\\" not in c for c in d.categories)
            and len(set(d.categories)) == len(d.categories),
            "data.categories",
            d.categories,
            "distinct folder names under data.root",
        ),
        (0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "0 <= value < 1"),
        (0.0 <= d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "0 <= value < 1"),
        (0.0 <= t.seam_band <= 0.5, "tiling.seam_band", t.seam_band, "0 <= value <= 0.5"),
        (t.seam_sigma >= 0.0, "tiling.seam_sigma", t.seam_sigma, ">= 0"),
        (t.blur_sigma >= 0.0, "tiling.blur_sigma", t.blur_sigma, ">= 0"),
        (t.neighbourhood >= 0, "tiling.neighbourhood", t.neighbourhood, "an integer >= 0"),
        (0.0 < f.quantile <= 1.0, "fusion.quantile", f.quantile, "0 < value <= 1"),
        (0.0 < f.pixel_quantile <= 1.0, "fusion.pixel_quantile", f.pixel_quantile, "0 < value <= 1"),
        (tr.batch_size >= 1, "train.batch_size", tr.batch_size, "an integer >= 1"),
        (tr.pixels_per_pass >= 1, "train.pixels_per_pass", tr.pixels_per_pass, "an integer >= 1"),
        (tr.threads >= 0, "train.threads", tr.threads, "an integer >= 0"),
        (config.ray.num_cpus > 0, "ray.num_cpus", config.ray.num_cpus, "> 0"),
        (config.ray.num_gpus >= 0, "ray.num_gpus", config.ray.num_gpus, ">= 0"),
        (config.ray.max_retries >= 0, "ray.max_retries", config.ray.max_retries, "an integer >= 0"),
        (0.0 < c.agreement <= 1.0, "cascade.agreement", c.agreement, "0 < value <= 1"),
        (c.margin >= 0.0, "cascade.margin", c.margin, ">= 0"),
        (
            not c.order or sorted(c.order) == list(range(len(config.members))),
            "cascade.order",
            c.order,
            f"empty or each member index 0..{len(config.members) - 1} once",
        ),
        (not (c.order and c.search_order), "cascade.order", c.order, "empty when cascade.search_order is true"),
        (
            not (t.preset and (t.tile_size or t.stride or t.input_size or t.stacked)),
            "tiling.preset",
            t.preset,
            "either a preset or tile_size/stride/input_size/stacked, not both",
        ),
    ]
    for i, m in enumerate(config.members):
        checks += [
            (m.patch_size >= 1 and m.patch_size % 2 == 1, f"member {i} patch_size", m.patch_size, "an odd integer"),
            (
                m.pretrain_embed_dimension >= 1,
                f"member {i} pretrain_embed_dimension",
                m.pretrain_embed_dimension,
                ">= 1",
            ),
            (m.target_embed_dimension >= 1, f"member {i} target_embed_dimension", m.target_embed_dimension, ">= 1"),
            (0.0 < m.coreset_ratio <= 1.0, f"member {i} coreset_ratio", m.coreset_ratio, "0 < value <= 1"),
            (m.num_neighbours >= 1, f"member {i} num_neighbours", m.num_neighbours, "an integer >= 1"),
            (len(m.mean) in (0, 3), f"member {i} mean", m.mean, "empty or three numbers"),
            (
                len(m.std) in (0, 3) and all(s > 0 for s in m.std),
                f"member {i} std",
                m.std,
                "empty or three numbers > 0",
            ),
            (bool(m.layers), f"member {i} layers", m.layers, "one or more layer names"),
        ]
    for ok, key, value, expected in checks:
        if not ok:
            raise TilecoreError(f"{origin}: {key} = {value!r}; expected {expected}")
    check_device_name(tr.device, f"{origin}: train.device")
    tile, stride, model_input, stacked = tiling_geometry(config)
    if stacked and t.neighbourhood > 0:
        raise TilecoreError(
            f"{origin}: tiling.neighbourhood = {t.neighbourhood} with stacked tiles; expected 0 (one stacked bank "
            "already serves every tile location)"
        )
    if min(model_input) < 32:
        raise TilecoreError(f"{origin}: tiling input size {model_input}; expected at least 32 pixels")
    from tilecore.runtime.tiling import tile_grid

    tile_grid(image_hw(config), tile, stride)  # a tile larger than the image or a bad stride fails here


def load_config(path: str | Path | None) -> Config:
    """The defaults, overridden by a TOML file when one is given."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise TilecoreError(f"config {path}: file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TilecoreError(f"config {path}: not valid TOML ({exc})") from None
    return config_from_dict(raw, f"config {path}")
