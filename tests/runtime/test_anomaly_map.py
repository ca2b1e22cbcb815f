"""The runtime's map post-processing against the definitions it names (PyTorch bilinear, SciPy blur)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from tilecore.runtime.anomaly_map import batch_to_maps, blur_kernel_size, patch_scores_to_map


def test_upsampling_equals_torch_bilinear_without_corner_alignment() -> None:
    scores = np.random.default_rng(0).random((2, 8, 6)).astype(np.float32)
    ours = batch_to_maps(scores, 64, 48, sigma=0)
    reference = F.interpolate(torch.from_numpy(scores)[:, None], size=(64, 48), mode="bilinear", align_corners=False)[
        :, 0
    ].numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_blur_equals_scipy_gaussian_with_reflect_padding() -> None:
    scores = np.random.default_rng(1).random((40, 40)).astype(np.float32)
    ours = patch_scores_to_map(scores, 40, 40, sigma=4.0)
    reference = gaussian_filter(scores.astype(np.float64), sigma=4.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_constant_map_stays_constant() -> None:
    ours = patch_scores_to_map(np.full((7, 7), 3.5, dtype=np.float32), 50, 50, sigma=4.0)
    np.testing.assert_allclose(ours, 3.5, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.625, 1.125, 4.0, 2.3])
def test_blur_kernel_radius_is_scipys(sigma):
    impulse = np.zeros(81)
    impulse[40] = 1.0
    radius = np.count_nonzero(gaussian_filter(impulse, sigma, truncate=4.0)) // 2  # SciPy's kernel reach
    assert blur_kernel_size(sigma) == 2 * radius + 1
