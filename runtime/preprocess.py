"""Image preprocessing shared by training and the runtime, so both feed the backbone identical tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from tilecore.runtime.errors import TilecoreError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Name written into run metadata / manifests; changing the resize below means changing this name.
RESIZE_RULE = "opencv_inter_area"


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes a normalised float tensor."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    bit_depth: str | int = 8  # how image files become uint8 first (runtime.image_io.to_uint8); 8: 8-bit files only

    def to_dict(self) -> dict:
        return {**asdict(self), "resize": RESIZE_RULE, "channel_order": "RGB", "layout": "NCHW"}


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an RGB uint8 image with OpenCV's area interpolation (antialiased when shrinking)."""
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def preprocess_batch(images: list[np.ndarray], spec: Preprocess) -> np.ndarray:
    """RGB uint8 images [H, W, 3] (any size) -> normalised float32 batch [B, 3, height, width]."""
    if not images:
        raise TilecoreError("preprocess: empty batch, expected at least one image")
    return np.stack([normalise_rgb(image, spec) for image in images])


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a bool mask [H, W] with nearest-neighbour sampling."""
    if mask.shape == (height, width):
        return mask
    resized = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return resized > 0


def normalise_rgb(image: np.ndarray, spec: Preprocess) -> np.ndarray:
    """RGB uint8 [H, W, 3] (any size) -> resized, normalised float32 [3, height, width]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise TilecoreError(f"preprocess: got {image.dtype} {image.shape}, expected uint8 [H, W, 3]")
    resized = resize_rgb(image, spec.height, spec.width)  # [H, W, 3] uint8
    std = np.asarray(spec.std, dtype=np.float32)
    scale, offset = 1.0 / (255.0 * std), -np.asarray(spec.mean, dtype=np.float32) / std
    out = np.empty((3, *resized.shape[:2]), dtype=np.float32)  # [3, H, W], written channel by channel
    for c in range(3):  # (x / 255 - mean) / std as one multiply-add: one pass, no temporaries
        np.multiply(resized[:, :, c], scale[c], out=out[c], dtype=np.float32)
        out[c] += offset[c]
    return out


def resize_tiles(tiles: np.ndarray, height: int, width: int) -> np.ndarray:
    """Normalised tiles [T, 3, th, tw] -> [T, 3, height, width] (area interpolation; identity if equal)."""
    if tiles.shape[-2:] == (height, width):
        return tiles
    out = np.empty((tiles.shape[0], tiles.shape[1], height, width), dtype=np.float32)
    for i, tile in enumerate(tiles):
        hwc = cv2.resize(tile.transpose(1, 2, 0), (width, height), interpolation=cv2.INTER_AREA)
        out[i] = hwc.transpose(2, 0, 1)  # [h, w, 3] -> [3, h, w]
    return out


def tiles_at(normalised: np.ndarray, grid, locations: list[int], input_hw: tuple[int, int]) -> np.ndarray:
    """Normalised image [3, S, S] -> backbone inputs [T', 3, in_h, in_w] for the chosen tile locations."""
    from tilecore.runtime.tiling import cut_tiles

    return resize_tiles(cut_tiles(normalised, grid, locations), *input_hw)
