"""From a grid of patch scores to a full-resolution anomaly map.

The rule, named in run metadata and manifests: bilinear upsampling with half-pixel centres (OpenCV's
INTER_LINEAR, which equals PyTorch's `align_corners=False` when enlarging), then a Gaussian blur with
the kernel fixed from sigma (radius = int(4 * sigma + 0.5), SciPy's own rule) and edge-including mirror padding
("reflect" in SciPy's terms, BORDER_REFLECT in OpenCV's, "symmetric" in NumPy's).
"""

from __future__ import annotations

import cv2
import numpy as np

MAP_RULE = {"upsample": "bilinear_half_pixel", "blur": "gaussian", "truncate": 4.0, "padding": "symmetric"}


def blur_kernel_size(sigma: float) -> int:
    """Odd kernel size covering +-4 sigma, fixed ahead of time (never computed inside a graph).

    The radius rounds halves up, as scipy.ndimage.gaussian_filter(truncate=4) does (Python's round()
    would round 2.5 down to 2)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def patch_scores_to_map(patch_scores: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """Patch scores [h, w] -> anomaly map [height, width] float32."""
    upsampled = cv2.resize(patch_scores.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    if sigma <= 0:
        return upsampled
    size = blur_kernel_size(sigma)
    return cv2.GaussianBlur(upsampled, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def batch_to_maps(patch_scores: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """Patch scores [B, h, w] -> anomaly maps [B, height, width] float32."""
    return np.stack([patch_scores_to_map(s, height, width, sigma) for s in patch_scores])
