"""`tilecore train`: one PatchCore memory bank per dataset category, resumable category by category."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from tilecore.runtime.anomaly_map import MAP_RULE, batch_to_maps
from tilecore.runtime.artifacts import atomic_write, atomic_write_json
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.knn import BankScorer
from tilecore.train.backbones import resolve_out_indices
from tilecore.train.config import Config
from tilecore.train.coreset import approximate_greedy_coreset
from tilecore.train.data import CategoryData, Sample, list_categories, load_category
from tilecore.train.model import EMBEDDER_FILE, Embedder, create_embedder, load_embedder, save_embedder
from tilecore.train.run_dir import (
    BANK_FILE,
    library_versions,
    peak_rss_mb,
    prepare_run_dir,
    update_metadata,
)

log = logging.getLogger("tilecore")


def read_batches(
    samples: list[Sample], batch_size: int, skipped: list[str]
) -> Iterator[tuple[list[Sample], list[np.ndarray]]]:
    """Read images batch by batch; unreadable ones are logged, appended to `skipped` and left out."""
    batch: list[tuple[Sample, np.ndarray]] = []
    for sample in samples:
        try:
            batch.append((sample, read_rgb(sample.image)))
        except TilecoreError as exc:
            log.warning("skipped: %s", exc)
            skipped.append(str(sample.image))
            continue
        if len(batch) == batch_size:
            yield [s for s, _ in batch], [im for _, im in batch]
            batch = []
    if batch:
        yield [s for s, _ in batch], [im for _, im in batch]


def embed_samples(
    embedder: Embedder, samples: list[Sample], batch_size: int, skipped: list[str], progress: Progress, label: str
) -> tuple[list[Sample], np.ndarray]:
    """Embed every readable sample: (the samples kept, embeddings [N, h, w, D])."""
    task = progress.add_task(label, total=len(samples))
    kept, chunks = [], []
    for batch_samples, images in read_batches(samples, batch_size, skipped):
        chunks.append(embedder.embed(images))  # [b, h, w, D]
        kept.extend(batch_samples)
        progress.advance(task, len(batch_samples))
    progress.update(task, completed=len(samples))
    if not chunks:
        return kept, np.zeros((0,), dtype=np.float32)
    return kept, np.concatenate(chunks)


def fit_bank(
    config: Config, embedder: Embedder, data: CategoryData, skipped: list[str], progress: Progress
) -> np.ndarray:
    """Memory bank [n, D] of one category: embeddings of its training normals, coreset-subsampled."""
    kept, embeddings = embed_samples(
        embedder, data.train, config.train.batch_size, skipped, progress, f"{data.name}: features"
    )
    if not kept:
        raise TilecoreError(f"category {data.name}: no readable training images")
    features = torch.from_numpy(embeddings.reshape(-1, embeddings.shape[-1]))  # [N*h*w, D]
    task = progress.add_task(f"{data.name}: coreset", total=1)
    indices = approximate_greedy_coreset(
        features,
        config.model.coreset_ratio,
        config.train.seed,
        on_progress=lambda done, total: progress.update(task, completed=done, total=total),
    )
    return np.ascontiguousarray(features.numpy()[np.sort(indices)])


def validation_summary(
    config: Config,
    embedder: Embedder,
    data: CategoryData,
    bank: np.ndarray,
    skipped: list[str],
    progress: Progress,
) -> dict:
    """Scores of the held-out normal images: the statistics later calibration reads."""
    if not data.validation:
        return {"count": 0}
    kept, embeddings = embed_samples(
        embedder, data.validation, config.train.batch_size, skipped, progress, f"{data.name}: validation"
    )
    if not kept:
        return {"count": 0}
    scorer = BankScorer.from_bank(bank, config.model.scoring, config.model.num_neighbours)
    patch_scores, image_scores = scorer.score(embeddings)
    size = config.data.image_size
    maps = batch_to_maps(patch_scores, size, size, config.model.blur_sigma)
    return {
        "count": len(kept),
        "images": [str(s.image) for s in kept],
        "image_scores": image_scores.tolist(),
        "image_score_mean": float(image_scores.mean()),
        "image_score_std": float(image_scores.std()),
        "pixel_score_mean": float(maps.mean()),
        "pixel_score_std": float(maps.std()),
        "pixel_score_max": float(maps.max()),
    }


def save_bank(path: Path, bank: np.ndarray) -> None:
    from safetensors.numpy import save_file

    atomic_write(path, lambda tmp: save_file({"bank": bank.astype(np.float32)}, str(tmp)))


def load_bank(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise TilecoreError(f"memory bank {path}: file not found; run `tilecore train` first")
    return load_file(str(path))["bank"]


def train_run(config: Config, run_dir: Path, progress: Progress | None = None) -> dict:
    """Train every category of the config's dataset into `run_dir`; returns the run's metadata."""
    progress = progress or Progress(disable=True)
    root = Path(config.data.root)
    categories = config.data.categories or list_categories(root, config.data.format)
    if not categories:
        raise TilecoreError(f"dataset {root}: no categories found (expected <category>/train/good folders)")
    datasets = [  # load every split first: bad paths fail before any work starts
        load_category(root, c, config.data.format, config.data.val_fraction, config.data.split_seed) for c in categories
    ]
    resolve_out_indices(config.model.backbone, config.model.layers)  # a bad backbone or layer fails here
    resuming = prepare_run_dir(run_dir, config)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if (run_dir / EMBEDDER_FILE).is_file():
        embedder = load_embedder(config, run_dir)
    else:
        embedder, source = create_embedder(config)
        save_embedder(embedder, run_dir)
        update_metadata(
            run_dir,
            weights_source=source,
            random_init=source == "random",
            seed=config.train.seed,
            versions=library_versions(),
            preprocess=embedder.preprocess.to_dict(),
            map_rule=MAP_RULE,
        )
    metadata = update_metadata(run_dir, resumed=resuming)
    fit_stats = dict(metadata.get("categories", {}))
    for data in datasets:
        category_dir = run_dir / data.name
        if (category_dir / BANK_FILE).is_file() and data.name in fit_stats:
            log.info("%s: bank already trained, skipping", data.name)
            continue
        skipped: list[str] = []
        started = time.perf_counter()
        atomic_write_json(
            category_dir / "split.json",
            {
                "train": [str(s.image) for s in data.train],
                "validation": [str(s.image) for s in data.validation],
                "test": [str(s.image) for s in data.test],
            },
        )
        bank = fit_bank(config, embedder, data, skipped, progress)
        fit_seconds = time.perf_counter() - started
        validation = validation_summary(config, embedder, data, bank, skipped, progress)
        atomic_write_json(category_dir / "validation.json", validation)
        save_bank(category_dir / BANK_FILE, bank)  # written last: its presence marks the category done
        fit_stats[data.name] = {
            "train_images": len(data.train) - len([p for p in skipped if p in {str(s.image) for s in data.train}]),
            "validation_images": validation["count"],
            "bank_size": int(bank.shape[0]),
            "embedding_dim": int(bank.shape[1]),
            "fit_seconds": round(fit_seconds, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "skipped_images": skipped,
        }
        metadata = update_metadata(run_dir, categories=fit_stats)
    return metadata
