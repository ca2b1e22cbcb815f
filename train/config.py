"""Run configuration: dataclasses with defaults, loaded from TOML and validated key by key.

The defaults are the embedded main job: the synthetic brick/grass/gravel dataset at 256 px and
tf_efficientnet_lite0 with its real ImageNet weights.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import RULE_NEAREST, RULE_REWEIGHTED

CHOICES = {
    ("data", "format"): ("mvtec", "visa"),
    ("model", "scoring"): (RULE_NEAREST, RULE_REWEIGHTED),
}


@dataclass
class DataConfig:
    root: str = "data/synth256"
    format: str = "mvtec"
    categories: list[str] = field(default_factory=list)  # empty: every category under root
    image_size: int = 256  # images are resized to image_size x image_size
    val_fraction: float = 0.1  # normal training images held out for calibration
    split_seed: int = 0


@dataclass
class ModelConfig:
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
    blur_sigma: float = 4.0
    mean: list[float] = field(default_factory=list)  # empty: the backbone weights' own normalisation
    std: list[float] = field(default_factory=list)


@dataclass
class TrainConfig:
    batch_size: int = 8
    seed: int = 0
    threads: int = 0  # 0: torch's default


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}.get(
        type(value), type(value).__name__
    )


def check_value(where: str, default: Any, value: Any) -> Any:
    """Check `value` against the type of the field's default; returns it (ints widen to floats)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise TilecoreError(f"{where}: got {type_name(value)} {value!r}, expected {type_name(default)}")
    return value


def config_from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise TilecoreError(f"{origin}: unknown section [{unknown[0]}]; allowed: {sorted(SECTIONS)}")
    built = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise TilecoreError(f"{origin}: [{section}] must be a table")
        defaults = cls()
        allowed = [f.name for f in fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in allowed:
                raise TilecoreError(f"{origin}: unknown key {section}.{key}; allowed: {', '.join(allowed)}")
            kwargs[key] = check_value(f"{origin}: {section}.{key}", getattr(defaults, key), value)
            choices = CHOICES.get((section, key))
            if choices and value not in choices:
                raise TilecoreError(f"{origin}: {section}.{key} = {value!r}; allowed: {', '.join(choices)}")
        built[section] = cls(**kwargs)
    config = Config(**built)
    validate(config, origin)
    return config


def validate(config: Config, origin: str = "config") -> None:
    """Range checks that need no files or models (those come when the run starts)."""
    d, m, t = config.data, config.model, config.train
    checks = [
        (d.image_size >= 32, "data.image_size", d.image_size, "an integer >= 32"),
        (0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "0 <= value < 1"),
        (m.patch_size >= 1 and m.patch_size % 2 == 1, "model.patch_size", m.patch_size, "an odd integer >= 1"),
        (m.pretrain_embed_dimension >= 1, "model.pretrain_embed_dimension", m.pretrain_embed_dimension, ">= 1"),
        (m.target_embed_dimension >= 1, "model.target_embed_dimension", m.target_embed_dimension, ">= 1"),
        (0.0 < m.coreset_ratio <= 1.0, "model.coreset_ratio", m.coreset_ratio, "0 < value <= 1"),
        (m.num_neighbours >= 1, "model.num_neighbours", m.num_neighbours, "an integer >= 1"),
        (m.blur_sigma >= 0.0, "model.blur_sigma", m.blur_sigma, ">= 0"),
        (len(m.mean) in (0, 3), "model.mean", m.mean, "empty or three numbers"),
        (len(m.std) in (0, 3) and all(s > 0 for s in m.std), "model.std", m.std, "empty or three numbers > 0"),
        (bool(m.layers), "model.layers", m.layers, "one or more layer names"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1"),
        (t.threads >= 0, "train.threads", t.threads, "an integer >= 0"),
    ]
    for ok, key, value, expected in checks:
        if not ok:
            raise TilecoreError(f"{origin}: {key} = {value!r}; expected {expected}")


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
