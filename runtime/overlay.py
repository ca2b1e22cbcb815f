"""Overlay pictures of `tilecore run --overlays` (opencv + numpy only).

An overlay is the input with its anomaly map blended on as a heat map, the outline of the mask (the map
at or above the pixel threshold) drawn in white, a colour bar with its scale on the right, and a banner
on top with the label (OK / DEFECT), the image score and the image threshold. `side_by_side` puts the
original on the left of it. Text and lines scale with the image, so they read at 256 px and at 2048 px.
"""

from __future__ import annotations

import cv2
import numpy as np

BAR_FRACTION = 0.06  # colour bar width with its labels, of the image's longer side (about)
OUTLINE = (255, 255, 255)  # RGB
OK_COLOUR = (40, 170, 40)
DEFECT_COLOUR = (220, 30, 30)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def heat_scale(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """Map values as 0..1 on the heat scale: 1 (red) at or above twice the pixel threshold."""
    return np.clip(anomaly_map / max(2.0 * pixel_threshold, 1e-6), 0.0, 1.0)


def heat_colours(scale: np.ndarray) -> np.ndarray:
    """RGB uint8 colours of 0..1 values (JET)."""
    return cv2.applyColorMap((scale * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]  # BGR -> RGB


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W): the pixels of the mask that touch a pixel outside it (its border, one pixel wide)."""
    mask = mask.astype(np.uint8)
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (mask > 0) & (inner == 0)


def _line_width(size: int) -> int:
    return max(1, round(size / 256))


def _font_scale(size: int) -> float:
    return max(0.35, size / 640)


def _colour_bar(height: int, size: int, pixel_threshold: float) -> np.ndarray:
    """RGB (height, bar + labels) strip: the heat scale from 0 (bottom) to 2 x pixel threshold (top), and its
    values at the bottom, the middle (the pixel threshold) and the top written beside it on dark grey."""
    scale, thick = _font_scale(size) * 0.8, _line_width(size)
    ticks = [(2.0 * pixel_threshold, 0.0), (pixel_threshold, 0.5), (0.0, 1.0)]  # value, place from the top
    texts = [f"{value:.3g}" for value, _ in ticks]
    sizes = [cv2.getTextSize(text, FONT, scale, thick)[0] for text in texts]
    strip = max(8, round(BAR_FRACTION * size / 2))
    labels = max(tw for tw, _ in sizes) + 8
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(strip, axis=1)  # (H, strip), top = highest
    bar = np.full((height, strip + labels, 3), 40, np.uint8)
    bar[:, :strip] = heat_colours(ramp)
    for (_, place), text, (_, th) in zip(ticks, texts, sizes, strict=True):
        y = int(np.clip(place * height + th / 2, th + 2, height - 3))
        cv2.line(bar, (0, int(place * (height - 1))), (strip + 2, int(place * (height - 1))), (255, 255, 255), thick)
        cv2.putText(bar, text, (strip + 4, y), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return bar


def _banner(width: int, size: int, score: float, threshold: float | None, defect: bool) -> np.ndarray:
    scale, thick = _font_scale(size), _line_width(size)
    label = "DEFECT" if defect else "OK"
    text = f"{label}  score {score:.4g}" + (f"  threshold {threshold:.4g}" if threshold is not None else "")
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    if tw > width - 8:  # a narrow image: shrink the text to fit
        scale *= (width - 8) / tw
        (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    height = th + base + 2 * max(3, th // 3)
    banner = np.empty((height, width, 3), np.uint8)
    banner[:] = DEFECT_COLOUR if defect else OK_COLOUR
    cv2.putText(banner, text, (4, height - base - max(3, th // 3)), FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return banner


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray,
    pixel_threshold: float,
    score: float,
    threshold: float | None,
    defect: bool,
    side_by_side: bool = False,
) -> np.ndarray:
    """RGB overlay picture of one scored image.

    image: RGB uint8 (H, W, 3); anomaly_map and mask: (h, w) at any resolution (resized to H x W).
    Returns (H + banner, W + bar, 3), or (H + banner, 2 W + bar, 3) side by side with the original.
    """
    h, w = image.shape[:2]
    full_map = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)  # (H, W)
    full_mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)  # (H, W)
    blended = cv2.addWeighted(image, 0.6, heat_colours(heat_scale(full_map, pixel_threshold)), 0.4, 0.0)
    outline = mask_outline(full_mask)
    if _line_width(max(h, w)) > 1:  # thicker lines on big images
        k = _line_width(max(h, w))
        outline = cv2.dilate(outline.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool) & (full_mask > 0)
    blended[outline] = OUTLINE
    bar = _colour_bar(h, max(h, w), pixel_threshold)
    body = np.concatenate([image, blended, bar] if side_by_side else [blended, bar], axis=1)  # (H, W', 3)
    banner = _banner(body.shape[1], max(h, w), score, threshold, defect)
    return np.concatenate([banner, body], axis=0)
