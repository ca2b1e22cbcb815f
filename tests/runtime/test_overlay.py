"""Overlay pictures: heat map, mask outline on the mask border, colour bar, banner, side by side."""

from __future__ import annotations

import numpy as np
import pytest

from tilecore.runtime.overlay import BAR_FRACTION, OUTLINE, mask_outline, overlay


def scored(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A grey (h, w) image, a map at a quarter of its resolution with one hot square, and its mask."""
    image = np.full((h, w, 3), 128, np.uint8)
    anomaly_map = np.zeros((h // 4, w // 4), np.float32)
    anomaly_map[h // 16 : h // 8, w // 16 : w // 8] = 2.0
    return image, anomaly_map, anomaly_map >= 1.0


def test_outline_pixels_sit_on_the_mask_border() -> None:
    mask = np.zeros((20, 30), bool)
    mask[5:12, 8:20] = True
    outline = mask_outline(mask)
    inside = np.zeros_like(mask)
    inside[6:11, 9:19] = True
    assert outline.sum() == mask.sum() - inside.sum()  # exactly the mask's one-pixel border
    assert not (outline & inside).any() and not (outline & ~mask).any()


@pytest.mark.parametrize(("h", "w"), [(256, 256), (192, 320), (2048, 2048)])
def test_overlay_draws_outline_bar_and_banner(h: int, w: int) -> None:
    image, anomaly_map, mask = scored(h, w)
    picture = overlay(image, anomaly_map, mask, 1.0, 0.83, 0.5, True)
    banner = picture.shape[0] - h
    assert picture.dtype == np.uint8 and banner > 0 and picture.shape[1] > w
    body = picture[banner:]
    full_mask = np.kron(mask, np.ones((4, 4), bool))  # (h, w), nearest-neighbour as the overlay resizes
    white = (body[:, :w] == OUTLINE).all(axis=2)
    assert white.any() and not (white & ~full_mask).any()  # the outline is drawn, and only inside the mask
    edge = mask_outline(full_mask)
    assert white[edge].all()  # every border pixel is drawn
    strip = body[h // 4 : -h // 4, w : w + 4].astype(int)  # the colour bar's left edge, between its ticks
    assert strip.std() > 0 and (strip[:, :, 0] > strip[:, :, 2]).mean() > 0.4  # a ramp, red above blue
    assert strip[0, 0, 0] > strip[0, 0, 2] and strip[-1, 0, 2] > strip[-1, 0, 0]
    labels = body[:, w + max(8, round(BAR_FRACTION * max(h, w) / 2)) + 3 :]  # right of the strip and its ticks
    assert (labels == 255).all(axis=2).any()  # the scale's values are written
    top = picture[:banner].reshape(-1, 3)
    assert (top == (220, 30, 30)).all(axis=1).mean() > 0.5  # the DEFECT banner's colour
    assert ((top == 255).all(axis=1)).any()  # its text


def test_ok_banner_differs_from_defect() -> None:
    image, anomaly_map, mask = scored(64, 64)
    ok = overlay(image, anomaly_map, mask, 1.0, 0.1, 0.5, False)
    top = ok[:4].reshape(-1, 3)
    assert (top == (40, 170, 40)).all(axis=1).mean() > 0.9


def test_side_by_side_adds_the_original_on_the_left() -> None:
    image, anomaly_map, mask = scored(96, 160)
    image[:, :, 1] = np.arange(160, dtype=np.uint8)[None, :]  # a gradient to recognise it
    plain = overlay(image, anomaly_map, mask, 1.0, 0.2, None, False)
    side = overlay(image, anomaly_map, mask, 1.0, 0.2, None, False, side_by_side=True)
    assert side.shape[1] - plain.shape[1] == 160 and side.shape[0] == plain.shape[0]
    banner = side.shape[0] - 96
    assert np.array_equal(side[banner:, :160], image)
    assert np.array_equal(side[banner:, 160:], plain[banner:])
