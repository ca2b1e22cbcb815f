"""From a grid of patch scores to a full-resolution anomaly map.

The rule, named in run metadata and manifests: bilinear upsampling with half-pixel centres (OpenCV's
INTER_LINEAR, which equals PyTorch's `align_corners=False` when enlarging), then a Gaussian blur with
the kernel fixed from sigma (radius = int(4 * sigma + 0.5), SciPy's own rule) and edge-including mirror padding
("reflect" in SciPy's terms, BORDER_REFLECT in OpenCV's, "symmetric" in NumPy's).

Both steps are linear and act on rows and columns separately, so for a batch they are two matrix products:
map = A_h @ scores @ A_w.T, with A = blur @ upsample along each axis (axis_operator, built once per size):
batch_to_maps, which the merge uses. patch_scores_to_map keeps OpenCV's resize and blur for one map.
"""

from __future__ import annotations

from functools import lru_cache

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


def reflect_index(i: int, n: int) -> int:
    """Where index i of a signal of length n reads under BORDER_REFLECT (fedcba|abcdef), reflected again
    while it lies outside (kernels longer than the signal), as OpenCV's borderInterpolate does."""
    if n == 1:
        return 0
    while not 0 <= i < n:
        i = -i - 1 if i < 0 else 2 * n - i - 1
    return i


def upsample_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] float64: bilinear interpolation with half-pixel centres, source clamped to the ends."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = source - low
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def blur_matrix(size: int, sigma: float) -> np.ndarray:
    """[size, size] float64: OpenCV's Gaussian kernel for sigma along one axis, with BORDER_REFLECT."""
    taps = blur_kernel_size(sigma)
    kernel = cv2.getGaussianKernel(taps, sigma)[:, 0]  # [taps], sums to 1
    radius = taps // 2
    matrix = np.zeros((size, size))
    for i in range(size):
        for t, weight in enumerate(kernel):
            matrix[i, reflect_index(i + t - radius, size)] += weight
    return matrix


@lru_cache(maxsize=32)
def axis_operator(size_in: int, size_out: int, sigma: float) -> np.ndarray:
    """[size_out, size_in] float32: upsampling then blur along one axis (cached: read only)."""
    operator = upsample_matrix(size_in, size_out)
    if sigma > 0:
        operator = blur_matrix(size_out, sigma) @ operator
    operator = operator.astype(np.float32)
    operator.setflags(write=False)
    return operator


# Each matrix product stays at or below this m * n * k, where OpenBLAS runs it on the calling thread (it threads
# larger ones: SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD). On a busy 2-core machine, handing ENS9's
# tile maps to its threads cost about 20x the products themselves; one thread does them in about 1 ms per image.
SINGLE_THREAD_PRODUCT = 65536 * 4


def batch_to_maps(patch_scores: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """Patch scores [N, h, w] -> anomaly maps [N, height, width] float32: map = rows @ scores @ cols.T."""
    n, h, w = patch_scores.shape
    rows, cols = axis_operator(h, height, sigma), axis_operator(w, width, sigma)  # [height, h], [width, w]
    flat = patch_scores.astype(np.float32).reshape(n * h, w)  # [N * h, w]
    widened = np.empty((n * h, width), dtype=np.float32)  # [N * h, width]
    step = max(1, SINGLE_THREAD_PRODUCT // (width * w))
    for start in range(0, n * h, step):
        np.matmul(flat[start : start + step], cols.T, out=widened[start : start + step])
    widened = widened.reshape(n, h, width)  # [N, h, width]
    maps = np.empty((n, height, width), dtype=np.float32)
    step = max(1, SINGLE_THREAD_PRODUCT // (h * width))
    for i in range(n):
        for start in range(0, height, step):
            np.matmul(rows[start : start + step], widened[i], out=maps[i, start : start + step])
    return maps
