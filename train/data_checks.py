"""Degenerate training data, refused in one line before any bank is written.

- Duplicates. Images are compared by their decoded pixels (a copy saved under another name or in another
  format is the same image). At least half of a category's readable training images must be distinct
  (MIN_DISTINCT_SHARE): a folder of copies of a few images is almost certainly a mistake, and its banks
  would describe those few images only.
- The held-out split. Calibration turns scores into standard scores against the validation images, so it
  needs at least MIN_CALIBRATION_IMAGES distinct validation images that are not also training images:
  identical validation images all score the same (a spread of zero: every standard score divides by zero),
  and a copy of a training image scores as if it were part of the bank.
- Bank sizes. A member's coreset ratio must leave at least MIN_BANK_ROWS rows in every bank (and at least
  `num_neighbours`, which the reweighted scoring looks up). A bank of a handful of rows scores a normal
  patch by how sparse the bank is rather than by how normal the patch is; a ratio that leaves one row
  scores every patch by its distance to one vector.
- The spread measured at calibration (after the banks: a last check where pixels were not identical but
  the scores are): every validation image scoring the same is refused, for each statistic the configured
  normalisation divides by.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilecore.runtime.calibration import MIN_CALIBRATION_IMAGES, NormalStats
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.train.coreset import coreset_size

MIN_DISTINCT_SHARE = 0.5
MIN_BANK_ROWS = 10
MIN_RELATIVE_SPREAD = 1e-6  # a standard deviation below this share of the mean is float rounding, not spread


def pixel_digest(image: np.ndarray) -> str:
    """sha256 of a decoded image's shape and pixels."""
    digest = hashlib.sha256(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


@dataclass
class ImageCensus:
    """The readable images of a list and their pixel digests; unreadable ones are left to the fit's warning."""

    readable: list[Path] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, paths: list[Path]) -> ImageCensus:
        census = cls()
        for path in paths:
            try:
                image = read_rgb(path)
            except TilecoreError:
                continue
            census.readable.append(path)
            census.digests.append(pixel_digest(image))
        return census

    @property
    def distinct(self) -> int:
        return len(set(self.digests))


def check_category_images(name: str, train: list[Path], validation: list[Path]) -> tuple[ImageCensus, ImageCensus]:
    """Refuse duplicated training images and a validation split without spread; returns both censuses."""
    trained, held_out = ImageCensus.of(train), ImageCensus.of(validation)
    if not trained.readable:
        raise TilecoreError(f"category {name}: none of its {len(train)} training images is readable")
    needed = math.ceil(MIN_DISTINCT_SHARE * len(trained.readable))
    if trained.distinct < needed:
        raise TilecoreError(
            f"category {name}: {len(trained.readable)} training images hold only {trained.distinct} distinct "
            f"image(s) (same decoded pixels); expected at least {needed}: remove the duplicates"
        )
    fresh = len(set(held_out.digests) - set(trained.digests))
    if fresh < MIN_CALIBRATION_IMAGES:
        raise TilecoreError(
            f"category {name}: its {len(held_out.readable)} readable validation images hold {fresh} distinct "
            f"image(s) that are not also training images; calibration needs {MIN_CALIBRATION_IMAGES} (identical "
            "validation images all score the same: no spread to normalise by); remove the duplicates"
        )
    return trained, held_out


def round_up(value: float, digits: int = 2) -> float:
    """`value` rounded up to `digits` significant digits (a ratio to suggest that surely suffices)."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def check_bank_size(
    member: int, ratio: float, num_neighbours: int, images: int, locations: int, feature_grid: tuple[int, int]
) -> int:
    """Refuse a coreset that leaves a bank too few rows; returns the rows it keeps.

    A bank holds the patches of `images` images at `locations` tile locations, `feature_grid` (h, w) each.
    """
    patches = images * locations * feature_grid[0] * feature_grid[1]
    rows = coreset_size(patches, ratio)
    needed = max(MIN_BANK_ROWS, num_neighbours)
    if rows >= needed:
        return rows
    hint = (
        f"raise it to at least {round_up(needed / patches):g}"
        if patches >= needed
        else f"add training images (even all {patches} patches are too few)"
    )
    raise TilecoreError(
        f"members[{member}].coreset_ratio {ratio:g} keeps {rows} of {patches} patches per bank ({images} images x "
        f"{locations} tile location(s) x {feature_grid[0]}x{feature_grid[1]} patches); expected at least "
        f"{needed} rows: {hint}"
    )


def check_spread(stats: NormalStats, what: str, fusion: str) -> None:
    """Refuse statistics that would normalise by nothing: a zero spread (standard scores) or, for the
    geometric fusion (ratios to the mean), a zero mean."""
    if fusion == "geometric":
        checks = [("image", stats.image_mean, stats.image_mean), ("pixel", stats.pixel_mean, stats.pixel_mean)]
        kind = "mean"
    else:
        checks = [("image", stats.image_mean, stats.image_std), ("pixel", stats.pixel_mean, stats.pixel_std)]
        kind = "spread"
    for level, mean, divisor in checks:
        if not divisor > MIN_RELATIVE_SPREAD * abs(mean):  # also refuses zero over zero, and NaN
            raise TilecoreError(
                f"{what}: every validation image gives the same {level} score ({mean:.6g}): a {kind} of zero, "
                "nothing to normalise by; expected validation images that differ from each other and from the "
                "training images"
            )
