"""Datasets in the MVTec AD and VisA layouts, and the held-out validation split.

MVTec AD:  <root>/<category>/train/good/*.png
           <root>/<category>/test/<good|defect>/*.png
           <root>/<category>/ground_truth/<defect>/<stem>_mask.png
VisA:      <root>/split_csv/1cls.csv with columns object, split, label, image, mask (paths relative to root)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import IMAGE_SUFFIXES

FORMATS = ("mvtec", "visa")


@dataclass(frozen=True)
class Sample:
    image: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images
    mask: Path | None = None  # ground truth of an anomalous image


@dataclass(frozen=True)
class CategoryData:
    name: str
    train: list[Sample]  # normal images that feed the memory bank
    validation: list[Sample]  # held-out normal images, for calibration only
    test: list[Sample]


def list_images(folder: Path) -> list[Path]:
    """Every entry of `folder` named like an image, sorted. Broken links and folders with image names are
    listed too: reading them fails, and training logs them and records them as skipped, never drops them."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def split_validation(normals: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out round(fraction * n) normal images (at least one when fraction > 0), chosen by `seed`."""
    if not 0.0 <= fraction < 1.0:
        raise TilecoreError(f"val_fraction {fraction}: expected 0 <= val_fraction < 1")
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * len(normals))))
    if n_val >= len(normals):
        raise TilecoreError(
            f"validation split: {len(normals)} normal training images cannot spare {n_val} for validation"
        )
    order = np.random.default_rng(seed).permutation(len(normals))
    held_out = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(normals) if i not in held_out]
    validation = [s for i, s in enumerate(normals) if i in held_out]
    return train, validation


def list_categories(root: Path, fmt: str) -> list[str]:
    root = Path(root)
    check_root(root, fmt)
    if fmt == "visa":
        return sorted({row["object"] for row in read_visa_rows(root)})
    return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())


def config_categories(config) -> list[str]:
    """The categories a config covers: its own list, or every category of its dataset when it names none."""
    root = Path(config.data.root)
    categories = config.data.categories or list_categories(root, config.data.format)
    if not categories:
        raise TilecoreError(f"dataset {root}: no categories found (expected <category>/train/good folders)")
    return categories


def check_root(root: Path, fmt: str) -> None:
    if fmt not in FORMATS:
        raise TilecoreError(f"dataset format {fmt!r}: expected one of {list(FORMATS)}")
    if not root.is_dir():
        raise TilecoreError(f"dataset {root}: folder not found")


def load_category(root: Path, category: str, fmt: str, val_fraction: float, seed: int) -> CategoryData:
    root = Path(root)
    check_root(root, fmt)
    normals, test = load_visa(root, category) if fmt == "visa" else load_mvtec(root, category)
    if not normals:
        raise TilecoreError(f"dataset {root} category {category}: no normal training images found")
    train, validation = split_validation(normals, val_fraction, seed)
    return CategoryData(category, train, validation, test)


def load_mvtec(root: Path, category: str) -> tuple[list[Sample], list[Sample]]:
    base = root / category
    train_dir = base / "train" / "good"
    if not train_dir.is_dir():
        raise TilecoreError(f"dataset {base}: missing train/good folder (expected the MVTec AD layout)")
    normals = [Sample(p, 0, "good") for p in list_images(train_dir)]
    test: list[Sample] = []
    test_dir = base / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image in list_images(defect_dir):
                if defect == "good":
                    test.append(Sample(image, 0, "good"))
                    continue
                mask = base / "ground_truth" / defect / f"{image.stem}_mask.png"
                test.append(Sample(image, 1, defect, mask if mask.is_file() else None))
    return normals, test


def read_visa_rows(root: Path) -> list[dict[str, str]]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise TilecoreError(f"dataset {root}: missing split_csv/1cls.csv (expected the VisA layout)")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise TilecoreError(f"{csv_path}: expected columns {sorted(needed)}")
    return rows


def load_visa(root: Path, category: str) -> tuple[list[Sample], list[Sample]]:
    normals: list[Sample] = []
    test: list[Sample] = []
    for row in read_visa_rows(root):
        if row["object"] != category:
            continue
        anomalous = row["label"].strip().lower() == "anomaly"
        mask = root / row["mask"] if anomalous and row["mask"].strip() else None
        sample = Sample(root / row["image"], int(anomalous), "anomaly" if anomalous else "good", mask)
        if row["split"].strip().lower() == "train":
            if not anomalous:
                normals.append(sample)
        else:
            test.append(sample)
    return normals, test
