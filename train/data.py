"""Dataset layouts, detected from the folder (`data.format = "auto"`), and the held-out splits.

The layouts, their trees and how detection picks one are in docs/datasets.md:

mvtec       <root>/<category>/train/good, test/<good|defect>, ground_truth/<defect>/<stem>_mask.png
mvtec_ad2   <root>/<category>/train/good, validation/good, test_public/{good,bad},
            test_public/ground_truth/bad/<stem>_mask.png
visa        <root>/split_csv/1cls.csv with columns object, split, label, image, mask (paths relative to root)
visa_folders <root>/<category>/Data/Images/{Normal,Anomaly}, Data/Masks/Anomaly/<stem>.png
plain       <root>/<category>/{good,bad}, optional masks/<stem>.png; or one category at <root>/{good,bad}

Layouts without a split of their own (visa_folders, plain) divide the good images by `split_normals`.
Every image folder is listed recursively (`list_images`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import IMAGE_SUFFIXES

AUTO = "auto"
FORMATS = ("mvtec", "mvtec_ad2", "visa", "visa_folders", "plain")
LAYOUT_HINT = (
    "expected one of: mvtec (<category>/train/good), mvtec_ad2 (<category>/train/good + test_public), "
    "visa (split_csv/1cls.csv), visa_folders (<category>/Data/Images/Normal), "
    "plain (<category>/good + <category>/bad, or good + bad); see docs/datasets.md"
)


@dataclass(frozen=True)
class Sample:
    image: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images
    mask: Path | None = None  # ground truth of an anomalous image
    bit_depth: str | int = "auto"  # how the file's pixels become 8-bit (data.bit_depth; runtime.image_io.to_uint8)


@dataclass(frozen=True)
class CategoryData:
    name: str
    train: list[Sample]  # normal images that feed the memory bank
    validation: list[Sample]  # held-out normal images, for calibration only
    test: list[Sample]


def list_images(folder: Path) -> list[Path]:
    """Every entry under `folder` named like an image, recursively, sorted by path. Broken links and
    folders with image names are listed too (not descended into): reading them fails, and training logs
    them and records them as skipped, never drops them. Other folders are descended into."""
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix.lower() in IMAGE_SUFFIXES:
            found.append(entry)
        elif entry.is_dir() and not entry.is_symlink():
            found.extend(list_images(entry))
    return found


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


def split_normals(normals: list[Sample], test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training normals, test normals) for layouts whose good images have no test split of their own:
    round(test_fraction * n) of the good images (at least one when test_fraction > 0), picked by a
    permutation seeded with `seed + 1`, go to the test split; `split_validation` then holds out the
    validation images from the rest. Both keep path order."""
    if not 0.0 <= test_fraction < 1.0:
        raise TilecoreError(f"test_fraction {test_fraction}: expected 0 <= test_fraction < 1")
    n_test = 0 if test_fraction == 0 else max(1, int(round(test_fraction * len(normals))))
    if n_test >= len(normals):
        raise TilecoreError(f"test split: {len(normals)} good images cannot spare {n_test} for the test split")
    order = np.random.default_rng(seed + 1).permutation(len(normals))
    held_out = set(order[:n_test].tolist())
    train = [s for i, s in enumerate(normals) if i not in held_out]
    test = [s for i, s in enumerate(normals) if i in held_out]
    return train, test


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def detect_format(root: Path) -> str:
    """The layout of the dataset at `root` (see docs/datasets.md for the order of the checks)."""
    root = Path(root)
    if not root.is_dir():
        raise TilecoreError(f"dataset {root}: folder not found")
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    subfolders = _subfolders(root)
    if any((p / "Data" / "Images" / "Normal").is_dir() for p in subfolders):
        return "visa_folders"
    with_train = [p for p in subfolders if (p / "train" / "good").is_dir()]
    if any((p / "test_public").is_dir() or (p / "validation" / "good").is_dir() for p in with_train):
        return "mvtec_ad2"
    if with_train:
        return "mvtec"
    if (root / "good").is_dir() or any((p / "good").is_dir() for p in subfolders):
        return "plain"
    raise TilecoreError(f"dataset {root}: no known layout; {LAYOUT_HINT}")


def resolve_format(root: Path, fmt: str) -> str:
    """`fmt`, or the detected layout when it is "auto"; refuses an unknown name or a missing folder."""
    if fmt != AUTO and fmt not in FORMATS:
        raise TilecoreError(f"dataset format {fmt!r}: expected one of {[AUTO, *FORMATS]}")
    if not Path(root).is_dir():
        raise TilecoreError(f"dataset {root}: folder not found")
    return detect_format(root) if fmt == AUTO else fmt


def _single_category(root: Path) -> bool:
    """A plain dataset holding one category directly: <root>/good (its category is the root's name)."""
    return (root / "good").is_dir()


def list_categories(root: Path, fmt: str) -> list[str]:
    root = Path(root)
    fmt = resolve_format(root, fmt)
    if fmt == "visa":
        return sorted({row["object"] for row in read_visa_rows(root)})
    if fmt == "visa_folders":
        return [p.name for p in _subfolders(root) if (p / "Data" / "Images" / "Normal").is_dir()]
    if fmt == "plain":
        if _single_category(root):
            return [root.resolve().name]
        return [p.name for p in _subfolders(root) if (p / "good").is_dir()]
    return [p.name for p in _subfolders(root) if (p / "train" / "good").is_dir()]


def config_categories(config) -> list[str]:
    """The categories a config covers: its own list, or every category of its dataset when it names none."""
    root = Path(config.data.root)
    categories = config.data.categories or list_categories(root, config.data.format)
    if not categories:
        raise TilecoreError(f"dataset {root}: no categories found; {LAYOUT_HINT}")
    return categories


def load_config_category(config, category: str) -> CategoryData:
    """`load_category` with the dataset options of a run's config."""
    d = config.data
    return load_category(Path(d.root), category, d.format, d.val_fraction, d.split_seed, d.test_fraction, d.bit_depth)


def load_category(
    root: Path,
    category: str,
    fmt: str,
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.2,
    bit_depth: str | int = "auto",
) -> CategoryData:
    """The category's train, validation and test samples, each to be read with `bit_depth`."""
    data = _load_category(Path(root), category, fmt, val_fraction, seed, test_fraction)
    if bit_depth == "auto":
        return data
    with_depth = lambda samples: [replace(s, bit_depth=bit_depth) for s in samples]  # noqa: E731
    return CategoryData(data.name, with_depth(data.train), with_depth(data.validation), with_depth(data.test))


def _load_category(
    root: Path, category: str, fmt: str, val_fraction: float, seed: int, test_fraction: float
) -> CategoryData:
    fmt = resolve_format(root, fmt)
    validation: list[Sample] | None = None  # a layout's own validation split, when it has one
    if fmt == "visa":
        normals, test = load_visa(root, category)
    elif fmt == "mvtec_ad2":
        normals, validation, test = load_mvtec_ad2(root, category)
    elif fmt == "visa_folders":
        normals, test = load_visa_folders(root, category, test_fraction, seed)
    elif fmt == "plain":
        normals, test = load_plain(root, category, test_fraction, seed)
    else:
        normals, test = load_mvtec(root, category)
    if not normals:
        raise TilecoreError(f"dataset {root} category {category}: no normal training images found")
    if validation:
        return CategoryData(category, normals, validation, test)
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
        for defect_dir in _subfolders(test_dir):
            defect = defect_dir.name
            for image in list_images(defect_dir):
                if defect == "good":
                    test.append(Sample(image, 0, "good"))
                    continue
                mask = base / "ground_truth" / defect / image.relative_to(defect_dir).parent / f"{image.stem}_mask.png"
                test.append(Sample(image, 1, defect, mask if mask.is_file() else None))
    return normals, test


def load_mvtec_ad2(root: Path, category: str) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train normals, the layout's own validation normals (may be empty), test_public samples)."""
    base = root / category
    train_dir = base / "train" / "good"
    if not train_dir.is_dir():
        raise TilecoreError(f"dataset {base}: missing train/good folder (expected the MVTec AD 2 layout)")
    normals = [Sample(p, 0, "good") for p in list_images(train_dir)]
    val_dir = base / "validation" / "good"
    validation = [Sample(p, 0, "good") for p in list_images(val_dir)] if val_dir.is_dir() else []
    test: list[Sample] = []
    test_dir = base / "test_public"
    if (test_dir / "good").is_dir():
        test += [Sample(p, 0, "good") for p in list_images(test_dir / "good")]
    if (test_dir / "bad").is_dir():
        for image in list_images(test_dir / "bad"):
            relative = image.relative_to(test_dir / "bad").parent
            mask = test_dir / "ground_truth" / "bad" / relative / f"{image.stem}_mask.png"
            test.append(Sample(image, 1, "bad", mask if mask.is_file() else None))
    return normals, validation, test


def load_good_bad(
    good: list[Path], bad: list[Path], mask_for, test_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Good images split by `split_normals`; every bad image is a test image, with mask_for(path) if it exists."""
    normals, test_normals = split_normals([Sample(p, 0, "good") for p in good], test_fraction, seed)
    anomalous = []
    for image in bad:
        mask = mask_for(image)
        anomalous.append(Sample(image, 1, "bad", mask if mask.is_file() else None))
    return normals, test_normals + anomalous


def load_plain(root: Path, category: str, test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    base = root if _single_category(root) and category == root.resolve().name else root / category
    if not (base / "good").is_dir():
        raise TilecoreError(f"dataset {base}: missing good folder (expected the plain layout, good + bad)")
    bad_dir, masks = base / "bad", base / "masks"
    bad = list_images(bad_dir) if bad_dir.is_dir() else []
    return load_good_bad(
        list_images(base / "good"),
        bad,
        lambda image: masks / image.relative_to(bad_dir).parent / f"{image.stem}.png",
        test_fraction,
        seed,
    )


def load_visa_folders(root: Path, category: str, test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    data = root / category / "Data"
    if not (data / "Images" / "Normal").is_dir():
        raise TilecoreError(f"dataset {root / category}: missing Data/Images/Normal (expected VisA's own layout)")
    anomaly_dir, masks = data / "Images" / "Anomaly", data / "Masks" / "Anomaly"
    bad = list_images(anomaly_dir) if anomaly_dir.is_dir() else []
    return load_good_bad(
        list_images(data / "Images" / "Normal"),
        bad,
        lambda image: masks / image.relative_to(anomaly_dir).parent / f"{image.stem}.png",
        test_fraction,
        seed,
    )


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
