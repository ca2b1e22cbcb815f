"""The run directory: config, metadata and one folder per category, all written atomically."""

from __future__ import annotations

import json
import logging
import platform
import resource
import shutil
from pathlib import Path
from typing import Any

from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.errors import TilecoreError
from tilecore.train.config import (
    EXECUTION_SECTIONS,
    GEOMETRY_KEYS,
    Config,
    config_from_dict,
    is_postprocessing,
    tiling_geometry,
)

log = logging.getLogger("tilecore")

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"
MEMBERS_DIR = "members"  # each member's embedder weights (train.model.embedder_path)
SPLIT_FILE = "split.json"  # per category: the dataset paths of its train, validation and test images
BANKS_DIR = "banks"  # per category: one memory bank per (member, tile location)
CALIBRATION_FILE = "calibration.json"  # per category, written last
KEPT_DIR = "kept"  # per category: the images export needs (train.run_images)
KEPT_FILE = "kept.json"
TEST_SCORES_FILE = "test_scores.json"  # per category, written by `tilecore eval` (train.evaluate)
CATEGORY_ENTRIES = (SPLIT_FILE, BANKS_DIR, CALIBRATION_FILE, KEPT_DIR, KEPT_FILE)


def library_versions() -> dict[str, str]:
    import faiss
    import numpy
    import timm
    import torch

    import tilecore

    return {
        "tilecore": tilecore.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "faiss": faiss.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TilecoreError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise TilecoreError(f"{path}: not valid JSON ({exc})") from None


def finished_banks(run_dir: Path) -> list[Path]:
    """The memory banks a run holds (written atomically: a name without the temporary suffix is complete)."""
    return sorted(run_dir.glob(f"*/{BANKS_DIR}/*.safetensors"))


def stored_config(config_path: Path) -> Config | None:
    """The config a run folder holds, or None where that file is not a tilecore run config."""
    try:
        # read back through the schema, so a run written before a newer table (with its defaults) resumes
        return config_from_dict(read_json(config_path), str(config_path))
    except TilecoreError:
        return None


def changed_keys(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(bank-defining, post-processing) keys whose values differ between two configs, as dotted names
    (`members[1].layers`); train.config.POSTPROCESSING_KEYS says which is which."""
    banks: list[str] = []
    post: list[str] = []
    geometry: list[str] = []
    a, b = old.to_dict(), new.to_dict()
    for section in (s for s in a if s not in EXECUTION_SECTIONS):
        if section == "members":
            if len(a[section]) != len(b[section]):
                banks.append("members (their number)")
            pairs = [(f"members[{i}]", x, y) for i, (x, y) in enumerate(zip(a[section], b[section], strict=False))]
        else:
            pairs = [(section, a[section], b[section])]
        for name, x, y in pairs:
            for key in (k for k in x if x[k] != y[k]):
                if section == "tiling" and key in GEOMETRY_KEYS:
                    geometry.append(f"{name}.{key}")
                else:
                    (post if is_postprocessing(section, key) else banks).append(f"{name}.{key}")
    same_tiles = tiling_geometry(old) == tiling_geometry(new)  # e.g. ENS9 -> ENS9N, or a preset spelled out
    (post if same_tiles else banks).extend(geometry)
    return banks, post


def clear_calibrations(run_dir: Path) -> None:
    """Remove each category's calibration and evaluation, and the run's metrics: what post-processing changes."""
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    for folder in (p for p in run_dir.iterdir() if p.is_dir() and (p / SPLIT_FILE).is_file()):  # categories
        for name in (CALIBRATION_FILE, TEST_SCORES_FILE):
            (folder / name).unlink(missing_ok=True)


def clear_unfinished_run(run_dir: Path) -> None:
    """Remove what tilecore wrote into a run folder that holds no finished bank, and nothing else."""
    for name in (CONFIG_FILE, METADATA_FILE, METRICS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    members = run_dir / MEMBERS_DIR
    if members.is_dir():
        for weights in members.glob("m*.safetensors"):  # train.model.embedder_path
            weights.unlink()
        if not any(members.iterdir()):
            members.rmdir()
    for folder in (p for p in run_dir.iterdir() if p.is_dir() and (p / SPLIT_FILE).is_file()):  # categories
        for name in CATEGORY_ENTRIES:
            entry = folder / name
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    for leftover in run_dir.glob(".*.tmp"):
        leftover.unlink()


def remove_leftovers(run_dir: Path) -> None:
    for leftover in run_dir.rglob(".*.tmp"):  # half-written files of a killed run
        leftover.unlink()


def prepare_run_dir(run_dir: Path, config: Config) -> bool:
    """Create `run_dir` for `config`; returns True when resuming a run (same banks).

    A folder that holds a run whose config differs in post-processing keys alone (train.config
    POSTPROCESSING_KEYS) keeps its banks: the calibrations are removed (train_run redoes them) and the new
    config is written. A change to a bank-defining key is refused once that run has a finished bank; before
    that (a run that failed in its first steps, e.g. on weights or data) the run is replaced, so that a
    corrected config can take the same --out.
    """
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        stored = stored_config(config_path)
        if stored is None:  # someone else's config.json: nothing here is tilecore's to replace
            raise TilecoreError(f"run {run_dir}: folder exists and is not a tilecore run; choose another --out")
        if stored.to_dict() == config.to_dict():
            remove_leftovers(run_dir)
            return True
        bank_keys, post_keys = changed_keys(stored, config)
        banks = finished_banks(run_dir)
        if not bank_keys and not post_keys:  # execution keys alone ([ray]): same run, new resources
            remove_leftovers(run_dir)
            atomic_write_json(config_path, config.to_dict())
            return True
        if not bank_keys:
            remove_leftovers(run_dir)
            log.info(
                "run %s: post-processing keys changed (%s); reusing its %d bank(s) and recalibrating",
                run_dir, ", ".join(post_keys), len(banks),
            )  # fmt: skip
            clear_calibrations(run_dir)
            atomic_write_json(config_path, config.to_dict())
            return True
        if banks:
            raise TilecoreError(
                f"run {run_dir}: holds a run with a different config and {len(banks)} finished bank(s) "
                f"(bank-defining keys changed: {', '.join(bank_keys)}); choose another --out or delete it"
            )
        log.info("run %s: replacing an unfinished run (no bank written) with a different config", run_dir)
        clear_unfinished_run(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise TilecoreError(f"run {run_dir}: folder exists and is not a tilecore run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, config.to_dict())
    return False


def load_run_config(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        raise TilecoreError(f"run {run_dir}: folder not found")
    if not (run_dir / CONFIG_FILE).is_file():
        raise TilecoreError(f"run {run_dir}: not a tilecore run (no {CONFIG_FILE}); run `tilecore train` first")
    return config_from_dict(read_json(run_dir / CONFIG_FILE), f"run config {run_dir / CONFIG_FILE}")


def run_categories(run_dir: Path, config: Config) -> list[str]:
    """The categories a run covers, from the run folder alone: the config's list, else the list the run
    recorded when it started (metadata `category_names`), else (runs from before that record) the category
    folders it has begun."""
    names = config.data.categories or read_metadata(run_dir).get("category_names")
    if not names:
        names = sorted(p.parent.name for p in run_dir.glob(f"*/{SPLIT_FILE}"))
    if not names:
        raise TilecoreError(f"run {run_dir}: no trained categories; run `tilecore train` first")
    return list(names)


def read_metadata(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METADATA_FILE
    return read_json(path) if path.is_file() else {}


def update_metadata(run_dir: Path, **entries: Any) -> dict[str, Any]:
    path = run_dir / METADATA_FILE
    metadata = read_metadata(run_dir)
    metadata.update(entries)
    atomic_write_json(path, metadata)
    return metadata
