"""Tests of tilecore.train.synth: layout, pixel-exact masks, visibility, determinism, argument checks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tilecore.runtime.errors import TilecoreError
from tilecore.train import synth
from tilecore.train.synth import DEFECT_TYPES, build_synth_dataset

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defect": 5}


def read_raw(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(read_raw(path), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, int]:
    out = tmp_path_factory.mktemp("synth")
    calls = []
    description = build_synth_dataset(out, 256, seed=7, on_image=lambda: calls.append(1), **SMALL)
    return out, description, len(calls)


def test_layout_counts_and_description(small_build: tuple[Path, dict, int]) -> None:
    out, description, calls = small_build
    assert json.loads((out / "dataset.json").read_text()) == description
    assert description["size"] == 256 and description["seed"] == 7
    assert description["counts"] == SMALL
    assert list(description["categories"]) == ["brick", "grass", "gravel"]
    assert calls == 3 * sum(SMALL.values())
    for category, info in description["categories"].items():
        root = out / category
        train_names = sorted(p.name for p in (root / "train" / "good").iterdir())
        assert train_names == [f"{i:03d}.png" for i in range(4)]
        assert sorted(p.name for p in (root / "test" / "good").iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
        for defect_type in DEFECT_TYPES:
            assert [p.name for p in (root / "test" / defect_type).iterdir()] == ["000.png"]
            assert [p.name for p in (root / "ground_truth" / defect_type).iterdir()] == ["000_mask.png"]
        assert info["test_defect"] == dict.fromkeys(DEFECT_TYPES, 1)
        assert [d["defect_type"] for d in info["defects"]] == list(DEFECT_TYPES)
        for image_path in root.rglob("*.png"):
            image = read_raw(image_path)
            if image_path.name.endswith("_mask.png"):
                assert image.shape == (256, 256) and image.dtype == np.uint8
            else:
                assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert not list(out.rglob("*.tmp"))


def test_masks_are_binary_nonempty_and_match_the_record(small_build: tuple[Path, dict, int]) -> None:
    out, description, _ = small_build
    for info in description["categories"].values():
        for defect in info["defects"]:
            mask = read_raw(out / defect["mask"])
            image = read_raw(out / defect["image"])
            assert mask.shape == image.shape[:2]
            assert set(np.unique(mask).tolist()) == {0, 255}
            area = int((mask == 255).sum())
            assert area >= 1 and area == defect["area_px"]
            assert defect["area_fraction"] == pytest.approx(area / mask.size, abs=1e-8)
            assert 1e-4 <= defect["area_fraction"] <= 3e-2


def test_defect_changes_only_and_every_mask_pixel(small_build: tuple[Path, dict, int]) -> None:
    out, description, _ = small_build
    for category, info in description["categories"].items():
        for index, defect in enumerate(info["defects"]):
            base = synth._normal_base(category, 256, 7, "test_defect", index)
            image = read_rgb(out / defect["image"])
            mask = read_raw(out / defect["mask"]) > 0
            change = np.abs(image.astype(np.int16) - base.astype(np.int16)).mean(axis=2)
            assert np.array_equal(image[~mask], base[~mask]), defect["image"]
            assert change[mask].min() > 0, defect["image"]
            assert change[mask].mean() >= 25, defect["image"]


def test_normal_images_are_regenerable_gray_and_distinct(small_build: tuple[Path, dict, int]) -> None:
    out, _, _ = small_build
    first = read_rgb(out / "brick" / "train" / "good" / "000.png")
    assert np.array_equal(first, synth._normal_base("brick", 256, 7, "train", 0))
    assert np.array_equal(first[:, :, 0], first[:, :, 1]) and np.array_equal(first[:, :, 0], first[:, :, 2])
    second = read_rgb(out / "brick" / "train" / "good" / "001.png")
    test_good = read_rgb(out / "brick" / "test" / "good" / "000.png")
    assert not np.array_equal(first, second) and not np.array_equal(first, test_good)


def test_every_defect_type_holds_up_over_many_draws() -> None:
    """Area range, exact masks and visibility, over more draws than a build test can afford."""
    for category in synth.CATEGORIES:
        for index in range(30):
            defect_type = DEFECT_TYPES[index % len(DEFECT_TYPES)]
            base = synth._normal_base(category, 256, 1, "test_defect", index)
            rng = synth._image_rng(1, category, "test_defect", index, stream=1)
            image, mask = synth._add_defect(rng, base, defect_type, category)
            change = np.abs(image.astype(np.int16) - base.astype(np.int16)).mean(axis=2)
            assert 1e-4 <= mask.mean() <= 3e-2
            assert np.array_equal(image[~mask], base[~mask])
            assert change[mask].min() >= synth.MIN_PIXEL_DELTA
            assert change[mask].mean() >= 25


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    kwargs = {**SMALL, "seed": 3, "categories": ("gravel", "brick")}
    build_synth_dataset(tmp_path / "a", 256, **kwargs)
    build_synth_dataset(tmp_path / "b", 256, **kwargs)
    first = files(tmp_path / "a")
    assert len(first) == 2 * (4 + 2 + 2 * 5) + 1
    assert first == files(tmp_path / "b")
    build_synth_dataset(tmp_path / "c", 256, **{**kwargs, "seed": 4})
    assert files(tmp_path / "c")["brick/train/good/000.png"] != first["brick/train/good/000.png"]


def test_size_1024_one_category(tmp_path: Path) -> None:
    description = build_synth_dataset(tmp_path, 1024, n_train=1, n_test_good=1, n_test_defect=5, categories=["grass"])
    assert list(description["categories"]) == ["grass"]
    assert read_raw(tmp_path / "grass" / "train" / "good" / "000.png").shape == (1024, 1024, 3)
    for defect in description["categories"]["grass"]["defects"]:
        mask = read_raw(tmp_path / defect["mask"])
        assert mask.shape == (1024, 1024)
        assert 1e-4 <= defect["area_fraction"] <= 3e-2
        assert defect["area_px"] >= 100  # the fraction is of the image area, so defects grow in pixels


@pytest.mark.parametrize("size", [128, 300, 4096, 256.0, "256"])
def test_bad_size_raises(tmp_path: Path, size: object) -> None:
    with pytest.raises(TilecoreError, match="256, 512, 1024, 2048"):
        build_synth_dataset(tmp_path, size, **SMALL)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("categories", [("brick", "marble"), ("Brick",), (), ("grass", "grass")])
def test_bad_category_raises(tmp_path: Path, categories: object) -> None:
    with pytest.raises(TilecoreError, match="categor") as info:
        build_synth_dataset(tmp_path, 256, categories=categories, **SMALL)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_bad_counts_raise(tmp_path: Path) -> None:
    with pytest.raises(TilecoreError, match="n_train"):
        build_synth_dataset(tmp_path, 256, n_train=-1)
    with pytest.raises(TilecoreError, match="seed"):
        build_synth_dataset(tmp_path, 256, seed=-5)
