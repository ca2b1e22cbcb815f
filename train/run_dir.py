"""The run directory: config, metadata and one folder per category, all written atomically."""

from __future__ import annotations

import json
import platform
import resource
from pathlib import Path
from typing import Any

from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.errors import TilecoreError
from tilecore.train.config import Config, config_from_dict

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"


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


def prepare_run_dir(run_dir: Path, config: Config) -> bool:
    """Create `run_dir` for `config`; returns True when resuming a run with the same config."""
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        if read_json(config_path) != config.to_dict():
            raise TilecoreError(
                f"run {run_dir}: holds a run with a different config; choose another --out or delete it"
            )
        for leftover in run_dir.rglob(".*.tmp"):  # half-written files of a killed run
            leftover.unlink()
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
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


def read_metadata(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METADATA_FILE
    return read_json(path) if path.is_file() else {}


def update_metadata(run_dir: Path, **entries: Any) -> dict[str, Any]:
    path = run_dir / METADATA_FILE
    metadata = read_metadata(run_dir)
    metadata.update(entries)
    atomic_write_json(path, metadata)
    return metadata
