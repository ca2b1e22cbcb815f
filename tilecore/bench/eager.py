"""The PyTorch eager model behind a bundle, for the benchmark's `pytorch` backend (needs the train extra)."""

from __future__ import annotations

from pathlib import Path

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import read_manifest


def load_eager_model(bundle: Path, run: str, threads: int):
    """The CategoryModel of the run the bundle was exported from (`run`, else the manifest's source_run)."""
    manifest = read_manifest(bundle)
    run_dir = Path(run or manifest.source_run)
    if not (run_dir / "config.json").is_file():
        raise TilecoreError(f"--device pytorch: run {run_dir} of bundle {bundle} is not here; pass --run RUN")
    try:
        import torch
    except ImportError:
        raise TilecoreError("--device pytorch: torch is not installed (pip install 'tilecore[train]')") from None
    from tilecore.train.ensemble import load_category_model
    from tilecore.train.model import load_embedder
    from tilecore.train.run_dir import load_run_config

    if threads:
        torch.set_num_threads(threads)
    config = load_run_config(run_dir)
    embedders = [load_embedder(config, run_dir, i) for i in range(len(config.members))]
    return load_category_model(config, run_dir, manifest.category, embedders)
