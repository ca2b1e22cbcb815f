"""The deployed label rule, and the whole Predictor against a reference written here, on a real tiny bundle.

A Result's label is `score >= thresholds["image"]` and its mask `anomaly_map >= thresholds["pixel"]`:
the bundle below has an image threshold unlike its pixel threshold, both placed on values the images
really reach, so using one threshold for the other, or `>` for `>=`, changes labels and masks.
The second half scores the same images with an independent pipeline (numpy block means for the area
resize, brute-force kNN against the bundle's banks, scipy.ndimage for the map blur and seam pass,
the manifest's calibration by hand) fed by the bundle's own engine; only the engine is shared. The
bundle's seam sigma is set unlike its blur sigma, so the Predictor handing one in place of the other shows.
Both changes go through the bundle schema (read_manifest, dataclasses.replace, write_manifest), which
rewrites the manifest's digest as an export does.
"""

import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import faiss
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from tests.runtime.test_merge_reference import bilinear, reference_band, reference_seams, reference_untile
from tests.tiny import tiny_run
from tilecore.runtime.manifest import Manifest, read_manifest, write_manifest
from tilecore.runtime.predictor import Predictor

BLUR_SIGMA, SEAM_SIGMA = 4.0, 1.5  # the export writes 4.0 for both; the seam sigma is changed here


def rewrite_manifest(bundle: Path, change) -> None:
    """Write back a bundle's manifest as `change(Manifest)` returns it (with its digest)."""
    write_manifest(bundle, change(read_manifest(bundle)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tilecore.export.bundle import export_run

    root = tmp_path_factory.mktemp("label_rule")
    bundle = root / "bundle"
    export_run(tiny_run(root), bundle)

    def seams(manifest: Manifest) -> Manifest:
        rule = manifest.postprocess.rule
        assert (rule.blur_sigma, rule.seam_sigma) == (BLUR_SIGMA, BLUR_SIGMA)
        return replace(manifest, postprocess=replace(manifest.postprocess, rule=replace(rule, seam_sigma=SEAM_SIGMA)))

    rewrite_manifest(bundle, seams)
    return bundle


def coloured(image: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """The grey synthetic textures tinted, so that the three channels differ."""
    return np.clip(image.astype(np.float64) * np.array(gains), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(exported: Path) -> list[np.ndarray]:
    data = exported.parent / "data" / "gravel" / "test"
    paths = sorted(data.glob("*/*.png"))
    assert len(paths) == 5  # 2 good, 3 defects
    rgb = [cv2.imread(str(p), cv2.IMREAD_COLOR)[:, :, ::-1].copy() for p in paths]  # BGR file order -> RGB
    return rgb + [coloured(rgb[0], (1.0, 0.6, 0.3)), coloured(rgb[3], (0.4, 0.9, 1.2))]


@pytest.fixture(scope="module")
def scored(exported: Path, images: list[np.ndarray]) -> list:
    return Predictor(exported, device="cpu").predict_batch(images)


# --- the label rule ----------------------------------------------------------------------------------------


def thresholded_copy(exported: Path, tmp_path: Path, image: float, pixel: float) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported, bundle)

    def thresholds(manifest: Manifest) -> Manifest:
        return replace(manifest, thresholds=replace(manifest.thresholds, image=image, pixel=pixel))

    rewrite_manifest(bundle, thresholds)
    return bundle


def test_label_and_mask_each_use_their_own_threshold(
    exported: Path, images: list[np.ndarray], scored: list, tmp_path: Path
) -> None:
    scores = np.array([r.score for r in scored], dtype=np.float32)
    maps = np.stack([r.anomaly_map for r in scored])
    # the image threshold is one image's own score (so >= matters), the pixel threshold a map value well
    # below it: swapped, a different set of images is flagged and a different set of pixels masked
    image_threshold = float(np.sort(scores)[len(scores) // 2])
    pixel_threshold = float(np.sort(maps.ravel())[int(0.3 * maps.size)])
    assert pixel_threshold < image_threshold
    flagged, masked = scores >= image_threshold, maps >= pixel_threshold
    assert 0 < flagged.sum() < len(scores) and 0 < masked.sum() < maps.size
    assert not np.array_equal(flagged, scores >= pixel_threshold)  # this data tells the thresholds apart
    assert not np.array_equal(masked, maps >= image_threshold)

    results = Predictor(thresholded_copy(exported, tmp_path, image_threshold, pixel_threshold), device="cpu")
    results = results.predict_batch(images)
    np.testing.assert_array_equal([r.score for r in results], scores)  # thresholds change no score
    assert [r.label for r in results] == flagged.tolist()
    for result, expected in zip(results, masked, strict=True):
        assert result.mask.dtype == bool
        np.testing.assert_array_equal(result.mask, expected)
    at_threshold = int(np.argmax(scores == np.float32(image_threshold)))
    assert results[at_threshold].label is True  # a score equal to the threshold is anomalous
    on_pixel = np.unravel_index(np.argmax(maps == np.float32(pixel_threshold)), maps.shape)
    assert results[on_pixel[0]].mask[on_pixel[1:]]  # and so is a pixel equal to the pixel threshold


def test_calibrated_thresholds_label_by_the_image_threshold(exported: Path, scored: list) -> None:
    """The exported bundle's own thresholds (image 0.98, pixel 2.5 for this run): the same rule."""
    thresholds = read_manifest(exported).thresholds
    assert thresholds.image != thresholds.pixel
    for result in scored:
        assert result.label == bool(np.float32(result.score) >= np.float32(thresholds.image))
        np.testing.assert_array_equal(result.mask, result.anomaly_map >= np.float32(thresholds.pixel))


# --- the whole Predictor against an independent pipeline ---------------------------------------------------


def reference_results(bundle: Path, engine, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B], maps [B, 64, 64]) of README's rules, written out; `engine` is the only shared code."""
    manifest = read_manifest(bundle)
    (member,) = manifest.members  # the tiny run has one member
    spec, tiling, rule = member.preprocess, manifest.tiling, manifest.postprocess.rule
    assert (tiling.image, tiling.tile, tiling.stride, tiling.backbone_input) == ((64, 64), (32, 32), (32, 32), (32, 32))
    assert (rule.image_score, rule.normalisation, rule.fusion) == ("mean", "image", "mean")
    assert (rule.blur_sigma, rule.seam_sigma, rule.seam_band) == (BLUR_SIGMA, SEAM_SIGMA, 0.1)
    banks = []
    for name in member.banks:
        index = faiss.read_index(str(bundle / name))
        banks.append(index.reconstruct_n(0, index.ntotal).astype(np.float64))  # [n, D]
    stats = manifest.calibration.members[0].image  # normalisation "image": the merged map's statistics
    origins = [(0, 0), (0, 32), (32, 0), (32, 32)]
    rows, cols = reference_seams((64, 64), (32, 32), (32, 32))
    band = reference_band((64, 64), rows, cols, 3, 3)  # 10% of 32 = 3.2 -> 3 pixels each side
    scores, maps = [], []
    for image in images:
        h, w, _ = image.shape
        blocks = image.astype(np.float64).reshape(64, h // 64, 64, w // 64, 3).mean(axis=(1, 3))  # area resize
        resized = np.rint(blocks)  # to uint8 as OpenCV rounds: to nearest, ties to even
        normalised = ((resized / 255 - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)
        tiles = np.stack([normalised[:, y : y + 32, x : x + 32] for y, x in origins]).astype(np.float32)
        embeddings = engine.run(tiles).astype(np.float64)  # [4, h', w', D]
        tile_scores, tile_maps = [], []
        for t, bank in enumerate(banks):
            patches = embeddings[t].reshape(-1, bank.shape[1])
            nearest = np.sqrt(((patches[:, None, :] - bank[None]) ** 2).sum(axis=2)).min(axis=1)
            patch_scores = nearest.reshape(embeddings.shape[1:3])
            tile_scores.append(patch_scores.max())
            tile_maps.append(gaussian_filter(bilinear(patch_scores, 32, 32), BLUR_SIGMA, mode="reflect", truncate=4.0))
        merged = reference_untile(np.stack(tile_maps), (64, 64), (32, 32), (32, 32))
        merged = np.where(band, gaussian_filter(merged, SEAM_SIGMA, mode="reflect", truncate=4.0), merged)
        scores.append((np.mean(tile_scores) - stats.image_mean) / stats.image_std)
        maps.append((merged - stats.pixel_mean) / stats.pixel_std)
    return np.array(scores), np.stack(maps)


def test_predictor_equals_the_independent_pipeline(exported: Path, images: list[np.ndarray], scored: list) -> None:
    predictor = Predictor(exported, device="cpu")
    (engine,) = predictor.engines.values()
    expected_scores, expected_maps = reference_results(exported, engine, images)
    scores = np.array([r.score for r in scored])
    maps = np.stack([r.anomaly_map for r in scored])
    assert maps.shape == (len(images), 64, 64)
    spread = expected_scores.max() - expected_scores.min()
    assert spread > 1.0  # standard scores: the images are told apart
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5 * spread)
    np.testing.assert_allclose(maps, expected_maps, atol=1e-5 * (expected_maps.max() - expected_maps.min()))
