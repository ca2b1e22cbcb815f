"""Synthetic anomaly-detection dataset in the MVTec-AD layout, built from real texture photographs.

The sources are the CC0 texture photographs bundled with scikit-image (``brick``, ``grass``,
``gravel``; 512x512 grayscale). Every image is generated natively at the requested size: the texture
is mirror-padded into a large enough canvas and a random ``size x size`` window is cropped, flipped,
jittered in brightness/contrast and given mild sensor noise. Defective test images are a normal image
plus exactly one hard-edged synthetic defect (scratch, spot, foreign texture, hole, colour blotch)
whose ground-truth mask is pixel-exact: the defect changes every mask pixel visibly and nothing
outside it.

Every image draws from its own generator seeded by (seed, category, split, index), so a build is
byte-for-byte reproducible and a category's images do not depend on which other categories are built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import write_png

CATEGORIES = ("brick", "grass", "gravel")
SIZES = (256, 512, 1024, 2048)
DEFECT_TYPES = ("scratch", "spot", "foreign", "hole", "blotch")
SPLITS = ("train", "test_good", "test_defect")

AREA_FRACTION_RANGE = (2e-4, 2e-2)  # defect area, log-uniform, as a fraction of the image area
AREA_TOLERANCE = (0.6, 1.4)  # accepted drawn area, relative to the target area
MIN_PIXEL_DELTA = 12  # every defect pixel differs from the normal image by at least this (grey levels)
MIN_MEAN_DELTA = 25  # ... and the mean change over the mask is at least this
MAX_ATTEMPTS = 100
SUBPIXEL_BITS = 4  # fixed-point precision of the vertices handed to cv2 drawing calls

Shape = tuple[np.ndarray, int]  # (polygon or polyline vertices [N, 2] in local xy, thickness; 0 = filled)
DefectResult = tuple[np.ndarray, np.ndarray] | None  # (defective image, bool mask), None: try again


# --- normal images ----------------------------------------------------------------------------------


@cache
def _canvas(category: str, size: int) -> np.ndarray:
    """The source texture, mirror-padded just enough that a crop offset has size/4 of play on each axis.

    At 256 px no padding is needed (no mirror seams); at 1024 px the canvas is 1280 px square.
    """
    import skimage.data

    texture = getattr(skimage.data, category)().astype(np.float32)
    pad = max(0, (size + size // 4 - texture.shape[0]) // 2)
    return np.pad(texture, pad, mode="symmetric")


def _random_window(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """A randomly placed and flipped ``size x size`` crop of the category's canvas (float32 gray)."""
    canvas = _canvas(category, size)
    limit = canvas.shape[0] - size + 1
    y, x = (int(v) for v in rng.integers(0, limit, size=2))
    crop = canvas[y : y + size, x : x + size]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    return crop


def _normal_image(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """One defect-free image: crop, flips, +-5% contrast and brightness, noise sigma 2; RGB uint8."""
    crop = _random_window(rng, category, size)
    contrast, brightness = rng.uniform(0.95, 1.05, size=2)
    mean = float(crop.mean())
    gray = ((crop - mean) * contrast + mean) * brightness
    gray = gray + rng.normal(0.0, 2.0, size=gray.shape)
    gray_u8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray_u8[:, :, None], 3, axis=2)


def _image_rng(seed: int, category: str, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for one image; stream 0 draws the normal image, stream 1 its defect."""
    key = [seed, CATEGORIES.index(category), SPLITS.index(split), index, stream]
    return np.random.default_rng(key)


def _normal_base(category: str, size: int, seed: int, split: str, index: int) -> np.ndarray:
    """The normal image for (split, index); for test_defect, the image before its defect is added.

    ``index`` counts within the split; for test_defect it is the generation order (the order of
    ``dataset.json``'s defect list for that category), not the per-defect-type file number.
    """
    return _normal_image(_image_rng(seed, category, split, index), category, size)


# --- shapes -----------------------------------------------------------------------------------------


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _scaled_to_area(points: np.ndarray, area: float) -> np.ndarray:
    return points * math.sqrt(area / max(_polygon_area(points), 1e-9))


def _ellipse(rng: np.random.Generator, area: float) -> np.ndarray:
    """Vertices of a rotated ellipse (aspect 1-2.5) of the given area."""
    aspect = rng.uniform(1.0, 2.5)
    t = np.linspace(0.0, 2 * math.pi, 96, endpoint=False)
    points = np.stack([math.sqrt(aspect) * np.cos(t), np.sin(t) / math.sqrt(aspect)], axis=1)
    return _rotate(_scaled_to_area(points, area), rng.uniform(0, math.pi))


def _radial_blob(rng: np.random.Generator, area: float, *, jagged: bool) -> np.ndarray:
    """A star-shaped (hence simple) polygon: jagged for holes, smooth and lobed for regions."""
    n = int(rng.integers(7, 14)) if jagged else 48
    t = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * math.pi / n)
    if jagged:
        radius = rng.uniform(0.55, 1.0, n)
    else:
        radius = np.ones(n)
        for harmonic in (2, 3, 4):
            amplitude = rng.uniform(0.0, 0.5 / harmonic)
            radius += amplitude * np.cos(harmonic * t + rng.uniform(0, 2 * math.pi))
    points = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    points[:, 0] *= rng.uniform(1.0, 1.8)
    return _rotate(_scaled_to_area(points, area), rng.uniform(0, math.pi))


def _scratch(rng: np.random.Generator, area: float, size: int) -> tuple[Shape, float]:
    """A gently curving polyline, 1-3 px thick at 256 px (thickness scales with size/256).

    Returns the shape and its target area, which is capped at what a thickest, longest scratch covers.
    """
    scale = max(1, size // 256)
    max_len, min_len = 0.8 * size, 10.0 * scale
    thick_lo = max(1, math.ceil(area / max_len))
    thick_hi = 3 * scale
    if thick_lo > thick_hi:  # longer than fits the image: the scratch is as large as it can be
        thick_lo, area = thick_hi, thick_hi * max_len
    thickness = int(rng.integers(thick_lo, max(thick_lo, min(thick_hi, int(area // min_len))) + 1))
    length = area / thickness
    steps = max(2, min(40, math.ceil(length / 4)))
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(rng.uniform(-0.08, 0.08), 0.08, steps))
    deltas = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / steps)
    points = np.vstack([np.zeros((1, 2)), np.cumsum(deltas, axis=0)])
    return (points - (points.min(axis=0) + points.max(axis=0)) / 2, thickness), area


def _render(shape: Shape, center: np.ndarray, scale: float, size: int) -> np.ndarray:
    """Rasterise a shape with hard edges (LINE_8, no antialiasing) into a bool mask."""
    points, thickness = shape
    fixed = np.rint((points * scale + center) * (1 << SUBPIXEL_BITS)).astype(np.int32)
    mask = np.zeros((size, size), np.uint8)
    if thickness == 0:
        cv2.fillPoly(mask, [fixed], 255, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    else:
        cv2.polylines(mask, [fixed], False, 255, thickness=thickness, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    return mask > 0


def _place(rng: np.random.Generator, shape: Shape, target: float, size: int) -> np.ndarray | None:
    """Put the shape at a random spot inside the image and rescale it until its drawn area is close
    to the target area; None when it does not converge (the caller draws a new shape)."""
    points, thickness = shape
    half = np.abs(points).max(axis=0) * 1.3 + thickness + 2  # room for growing while fitting the area
    room = np.maximum(size - 2 * half, 0.0)
    center = half + rng.uniform(0.0, 1.0, 2) * room if (room > 0).all() else np.full(2, size / 2)
    area_power = 1.0 if thickness else 2.0  # drawn area grows linearly with a line's length
    accept_lo, accept_hi = max(1.0, AREA_TOLERANCE[0] * target), AREA_TOLERANCE[1] * target
    scale = 1.0
    for _ in range(4):
        mask = _render(shape, center, scale, size)
        area = int(mask.sum())
        if accept_lo <= area <= accept_hi:
            return mask
        scale *= 1.5 if area == 0 else (target / area) ** (1 / area_power)
    return None


# --- defects ----------------------------------------------------------------------------------------


def _pick_dark(rng: np.random.Generator, local_mean: float) -> bool:
    """Dark or bright at random, but never towards a limit closer than 100 grey levels to the local mean."""
    dark = bool(rng.random() < 0.5)
    if dark and local_mean < 100:
        return False
    if not dark and local_mean > 155:
        return True
    return dark


def _composite(base: np.ndarray, mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Replace the mask pixels of base with values (float, [H, W] gray or [H, W, 3]); keep the rest."""
    if values.ndim == 2:
        values = values[:, :, None]
    out = base.copy()
    new = np.broadcast_to(np.clip(np.rint(values), 0, 255), base.shape)
    out[mask] = new[mask].astype(np.uint8)
    return out


def _defect_scratch(rng: np.random.Generator, base: np.ndarray, target: float, category: str) -> DefectResult:
    size = base.shape[0]
    shape, target = _scratch(rng, target, size)
    mask = _place(rng, shape, target, size)
    if mask is None:
        return None
    gray = base[:, :, 0].astype(np.float32)
    keep = rng.uniform(0.2, 0.4)
    if _pick_dark(rng, float(gray[mask].mean())):
        values = gray * keep
    else:
        values = 255 - (255 - gray) * keep
    return _composite(base, mask, values), mask


def _defect_spot(rng: np.random.Generator, base: np.ndarray, target: float, category: str) -> DefectResult:
    size = base.shape[0]
    mask = _place(rng, (_ellipse(rng, target), 0), target, size)
    if mask is None:
        return None
    gray = base[:, :, 0].astype(np.float32)
    level = rng.uniform(15, 45) if _pick_dark(rng, float(gray[mask].mean())) else rng.uniform(205, 240)
    keep = rng.uniform(0.15, 0.35)
    return _composite(base, mask, gray * keep + level * (1 - keep)), mask


def _defect_foreign(rng: np.random.Generator, base: np.ndarray, target: float, category: str) -> DefectResult:
    size = base.shape[0]
    mask = _place(rng, (_radial_blob(rng, target, jagged=False), 0), target, size)
    if mask is None:
        return None
    others = [c for c in CATEGORIES if c != category]
    patch = _random_window(rng, others[int(rng.integers(len(others)))], size)
    local_mean = float(base[:, :, 0][mask].mean())
    shift = float(patch[mask].mean()) - local_mean
    if abs(shift) < 40:  # a similar mean brightness: push the patch away from it to stay visible
        direction = 1.0 if local_mean < 128 else -1.0
        patch = patch + direction * 40 - shift
    return _composite(base, mask, patch), mask


def _defect_hole(rng: np.random.Generator, base: np.ndarray, target: float, category: str) -> DefectResult:
    size = base.shape[0]
    mask = _place(rng, (_radial_blob(rng, target, jagged=True), 0), target, size)
    if mask is None:
        return None
    gray = base[:, :, 0].astype(np.float32)
    return _composite(base, mask, gray * rng.uniform(0.04, 0.1) + rng.uniform(2, 10)), mask


def _defect_blotch(rng: np.random.Generator, base: np.ndarray, target: float, category: str) -> DefectResult:
    size = base.shape[0]
    mask = _place(rng, (_radial_blob(rng, target, jagged=False), 0), target, size)
    if mask is None:
        return None
    # A colour cast: one channel up, one down, the third anywhere in between (a random tint).
    up, down, mid = rng.permutation(3)
    factors = np.empty(3)
    factors[up] = rng.uniform(1.35, 1.6)
    factors[down] = rng.uniform(0.45, 0.65)
    factors[mid] = rng.uniform(0.7, 1.3)
    return _composite(base, mask, base.astype(np.float32) * factors), mask


DEFECT_DRAWERS: dict[str, Callable[[np.random.Generator, np.ndarray, float, str], DefectResult]] = {
    "scratch": _defect_scratch,
    "spot": _defect_spot,
    "foreign": _defect_foreign,
    "hole": _defect_hole,
    "blotch": _defect_blotch,
}


def _enforce_visibility(base: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Push the mask pixels that changed by less than MIN_PIXEL_DELTA away from their normal value."""
    delta = np.abs(image.astype(np.int16) - base.astype(np.int16)).mean(axis=2)
    weak = mask & (delta < MIN_PIXEL_DELTA)
    if not weak.any():
        return image
    out = image.copy()
    pixels = base[weak].astype(np.int16)
    up = pixels.mean(axis=1, keepdims=True) < 128
    out[weak] = np.where(up, pixels + MIN_PIXEL_DELTA, pixels - MIN_PIXEL_DELTA).astype(np.uint8)
    return out


def _add_defect(
    rng: np.random.Generator, base: np.ndarray, defect_type: str, category: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of the given type on base; returns (image, bool mask)."""
    size = base.shape[0]
    lo, hi = AREA_FRACTION_RANGE
    for _ in range(MAX_ATTEMPTS):
        target = math.exp(rng.uniform(math.log(lo), math.log(hi))) * size * size
        result = DEFECT_DRAWERS[defect_type](rng, base, target, category)
        if result is None:
            continue
        image, mask = result
        image = _enforce_visibility(base, image, mask)
        change = np.abs(image.astype(np.int16) - base.astype(np.int16)).mean(axis=2)[mask].mean()
        if mask.any() and change >= MIN_MEAN_DELTA:
            return image, mask
    raise RuntimeError(f"could not draw a {defect_type} defect in {MAX_ATTEMPTS} attempts")


def paint_defect(
    rng: np.random.Generator, image: np.ndarray, defect_type: str, category: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect of `defect_type` painted into an RGB uint8 image [H, W, 3] of any size: it is
    drawn in the largest centred square (where the drawers work) and put back. Returns (image, bool mask [H, W]).
    `category` only keeps a "foreign" patch from using the image's own texture when it is one of CATEGORIES."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(image[top : top + side, left : left + side])  # [side, side, 3]
    painted, square_mask = _add_defect(rng, square, defect_type, category)
    out, mask = image.copy(), np.zeros((h, w), dtype=bool)
    out[top : top + side, left : left + side] = painted
    mask[top : top + side, left : left + side] = square_mask
    return out, mask


# --- the builder ------------------------------------------------------------------------------------


def _check_arguments(size: int, categories: Sequence[str], counts: dict[str, int], seed: int) -> list[str]:
    if isinstance(size, bool) or not isinstance(size, int) or size not in SIZES:
        raise TilecoreError(f"synthetic dataset size {size!r}: expected one of {', '.join(map(str, SIZES))}")
    if isinstance(categories, str):
        categories = [categories]
    chosen = list(categories)
    for category in chosen:
        if category not in CATEGORIES:
            raise TilecoreError(
                f"synthetic dataset category {category!r}: expected one or more of {', '.join(CATEGORIES)}"
            )
    if not chosen or len(set(chosen)) != len(chosen):
        raise TilecoreError(f"synthetic dataset categories {chosen}: expected distinct names, at least one")
    for name, value in [*counts.items(), ("seed", seed)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TilecoreError(f"synthetic dataset {name} {value!r}: expected an integer >= 0")
    return chosen


def build_synth_dataset(
    out: Path,
    size: int = 256,
    *,
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_defect: int = 30,
    seed: int = 0,
    categories: Sequence[str] = CATEGORIES,
    on_image: Callable[[], None] | None = None,
) -> dict:
    """Write an MVTec-AD-layout dataset under ``out`` and return the description saved as dataset.json.

    Per category: ``train/good``, ``test/good``, ``test/<defect>`` and ``ground_truth/<defect>/NNN_mask.png``
    (0/255), with the defect types taking turns so they are spread evenly. ``on_image`` is called once
    per image (a defective image counts once, after its mask is written). ``dataset.json`` is written
    last, so its presence means the dataset is complete.
    """
    counts = {"n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
    chosen = _check_arguments(size, categories, counts, seed)
    out = Path(out)
    (out / "dataset.json").unlink(missing_ok=True)

    def written() -> None:
        if on_image is not None:
            on_image()

    described: dict[str, dict] = {}
    for category in chosen:
        for split, count, folder in [("train", n_train, "train"), ("test_good", n_test_good, "test")]:
            for index in range(count):
                image = _normal_base(category, size, seed, split, index)
                write_png(out / category / folder / "good" / f"{index:03d}.png", image)
                written()

        per_type = dict.fromkeys(DEFECT_TYPES, 0)
        defects = []
        for index in range(n_test_defect):
            defect_type = DEFECT_TYPES[index % len(DEFECT_TYPES)]
            number = per_type[defect_type]
            per_type[defect_type] += 1
            base = _normal_base(category, size, seed, "test_defect", index)
            defect_rng = _image_rng(seed, category, "test_defect", index, stream=1)
            image, mask = _add_defect(defect_rng, base, defect_type, category)
            image_rel = f"{category}/test/{defect_type}/{number:03d}.png"
            mask_rel = f"{category}/ground_truth/{defect_type}/{number:03d}_mask.png"
            write_png(out / image_rel, image)
            write_png(out / mask_rel, mask.astype(np.uint8) * 255)
            area = int(mask.sum())
            defects.append(
                {
                    "image": image_rel,
                    "mask": mask_rel,
                    "defect_type": defect_type,
                    "area_px": area,
                    "area_fraction": round(area / (size * size), 8),
                }
            )
            written()
        described[category] = {
            "train_good": n_train,
            "test_good": n_test_good,
            "test_defect": {t: n for t, n in per_type.items() if n},
            "defects": defects,
        }

    description = {
        "format": "mvtec_ad",
        "generator": "tilecore.train.synth",
        "source": "scikit-image texture photographs (skimage.data brick, grass, gravel; CC0)",
        "size": size,
        "seed": seed,
        "counts": counts,
        "defect_types": list(DEFECT_TYPES),
        "defect_area_fraction_range": list(AREA_FRACTION_RANGE),
        "categories": described,
    }
    atomic_write_json(out / "dataset.json", description)
    return description
