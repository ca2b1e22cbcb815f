"""Reading images into the one layout every stage uses: RGB, uint8, [H, W, 3]."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tilecore.runtime.errors import TilecoreError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an 8-bit image as RGB [H, W, 3] uint8.

    Grayscale is replicated to three channels and an alpha channel is dropped (both common in
    inspection data, e.g. MVTec's grid, screw and zipper). 16-bit and unreadable files are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise TilecoreError(f"image {path}: file not found")
    if path.stat().st_size == 0:
        raise TilecoreError(f"image {path}: file is empty (0 bytes)")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise TilecoreError(f"image {path}: cannot decode (expected a PNG/JPEG/BMP/TIFF image)")
    if raw.dtype != np.uint8:
        raise TilecoreError(f"image {path}: {raw.dtype} pixels, expected 8-bit (uint8)")
    if raw.ndim == 2:
        return np.ascontiguousarray(np.repeat(raw[:, :, None], 3, axis=2))
    channels = raw.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(raw, 3, axis=2))
    if channels == 3:
        return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
    raise TilecoreError(f"image {path}: {channels} channels, expected 1, 3 or 4")


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as bool [H, W] (any non-zero pixel is anomalous)."""
    path = Path(path)
    if not path.is_file():
        raise TilecoreError(f"mask {path}: file not found")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise TilecoreError(f"mask {path}: cannot decode (expected a PNG image)")
    if raw.ndim == 3:
        raw = raw.max(axis=2)
    return raw > 0


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB [H, W, 3] or single-channel [H, W] uint8 image as PNG."""
    from tilecore.runtime.artifacts import atomic_write_bytes

    array = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise TilecoreError(f"image {path}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())
