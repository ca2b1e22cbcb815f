"""Dataset layouts: detection ("auto"), categories, splits and masks for each (docs/datasets.md)."""

from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_refusal, run_cli_here, toml_text
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import write_png
from tilecore.train.data import Sample, detect_format, list_categories, load_category, split_normals

PIXEL = np.zeros((4, 4, 3), dtype=np.uint8)


def images(folder: Path, names: list[str]) -> None:
    for name in names:
        write_png(folder / name, PIXEL)


def mask(path: Path) -> None:
    write_png(path, PIXEL[..., 0])


def load(root: Path, category: str, fmt: str = "auto", test_fraction: float = 0.2):
    return load_category(root, category, fmt, val_fraction=0.25, seed=0, test_fraction=test_fraction)


def test_mvtec_ad_with_subfolders(tmp_path: Path) -> None:
    images(tmp_path / "bottle" / "train" / "good", ["0.png", "1.png", "2.png", "sub/3.png"])
    images(tmp_path / "bottle" / "test" / "good", ["0.png"])
    images(tmp_path / "bottle" / "test" / "crack", ["0.png", "left/1.png"])
    mask(tmp_path / "bottle" / "ground_truth" / "crack" / "0_mask.png")
    mask(tmp_path / "bottle" / "ground_truth" / "crack" / "left" / "1_mask.png")
    assert detect_format(tmp_path) == "mvtec"
    data = load(tmp_path, "bottle")
    assert len(data.train) + len(data.validation) == 4
    assert [(s.defect, s.mask is not None) for s in data.test] == [("crack", True), ("crack", True), ("good", False)]


def make_mvtec_ad2(root: Path, validation: bool) -> None:
    images(root / "can" / "train" / "good", [f"{i}.png" for i in range(4)])
    if validation:
        images(root / "can" / "validation" / "good", ["v0.png", "v1.png"])
    images(root / "can" / "test_public" / "good", ["g0.png"])
    images(root / "can" / "test_public" / "bad", ["b0.png", "b1.png"])
    mask(root / "can" / "test_public" / "ground_truth" / "bad" / "b0_mask.png")


@pytest.mark.parametrize("validation", [True, False])
def test_mvtec_ad2_tests_on_test_public_and_validates_on_its_own_folder(tmp_path: Path, validation: bool) -> None:
    make_mvtec_ad2(tmp_path, validation)
    assert detect_format(tmp_path) == "mvtec_ad2"
    assert list_categories(tmp_path, "auto") == ["can"]
    data = load(tmp_path, "can")
    assert [(s.image.name, s.label) for s in data.test] == [("g0.png", 0), ("b0.png", 1), ("b1.png", 1)]
    assert data.test[1].mask.name == "b0_mask.png" and data.test[2].mask is None  # eval needs the mask: refused there
    if validation:  # the layout's own validation images; all of train/good trains
        assert [s.image.name for s in data.validation] == ["v0.png", "v1.png"] and len(data.train) == 4
    else:  # held out of train/good by val_fraction, as for MVTec AD
        assert len(data.validation) == 1 and len(data.train) == 3


def test_visa_csv_is_detected(tmp_path: Path) -> None:
    images(tmp_path / "candle", ["n0.png", "n1.png", "n2.png", "a0.png"])
    rows = ["object,split,label,image,mask"] + [f"candle,train,normal,candle/n{i}.png," for i in range(3)]
    rows.append("candle,test,anomaly,candle/a0.png,candle/a0.png")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert detect_format(tmp_path) == "visa"
    data = load(tmp_path, "candle")
    assert (len(data.train), len(data.validation), len(data.test)) == (2, 1, 1)


def test_visa_per_category_folders(tmp_path: Path) -> None:
    base = tmp_path / "pcb1" / "Data"
    images(base / "Images" / "Normal", [f"{i:03d}.JPG" for i in range(10)])
    images(base / "Images" / "Anomaly", ["000.JPG", "001.JPG"])
    mask(base / "Masks" / "Anomaly" / "000.png")
    assert detect_format(tmp_path) == "visa_folders"
    assert list_categories(tmp_path, "auto") == ["pcb1"]
    data = load(tmp_path, "pcb1")
    assert (len(data.train), len(data.validation)) == (6, 2)  # 10 good: 2 test, then 2 of 8 for validation
    assert [(s.label, s.mask is not None) for s in data.test] == [(0, False), (0, False), (1, True), (1, False)]


def test_plain_layout_with_categories_masks_and_subfolders(tmp_path: Path) -> None:
    for category in ("screws", "washers"):
        images(tmp_path / category / "good", [f"{i}.png" for i in range(8)] + ["batch2/8.png", "batch2/9.png"])
        images(tmp_path / category / "bad", ["scratch.png", "dents/d1.png"])
        mask(tmp_path / category / "masks" / "scratch.png")
        mask(tmp_path / category / "masks" / "dents" / "d1.png")
    assert detect_format(tmp_path) == "plain"
    assert list_categories(tmp_path, "auto") == ["screws", "washers"]
    data = load(tmp_path, "screws")
    everything = {s.image for s in data.train} | {s.image for s in data.validation} | {s.image for s in data.test}
    assert len(everything) == 12 and len(data.train) + len(data.validation) + len(data.test) == 12
    bad = [s for s in data.test if s.label == 1]
    assert [(s.image.name, s.mask.name) for s in bad] == [("d1.png", "d1.png"), ("scratch.png", "scratch.png")]
    assert sum(s.label == 0 for s in data.test) == 2  # round(0.2 * 10)


def test_plain_single_category_is_named_after_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "gaskets"
    images(root / "good", [f"{i}.png" for i in range(6)])
    images(root / "bad", ["b.png"])
    assert detect_format(root) == "plain"
    assert list_categories(root, "auto") == ["gaskets"]
    data = load(root, "gaskets")
    assert data.test[-1].label == 1 and data.test[-1].mask is None


def test_split_normals_is_seeded_disjoint_and_keeps_order() -> None:
    normals = [Sample(Path(f"{i:02d}.png"), 0, "good") for i in range(20)]
    train, test = split_normals(normals, 0.2, seed=3)
    assert (train, test) == split_normals(normals, 0.2, seed=3)
    assert test != split_normals(normals, 0.2, seed=4)[1]
    assert len(test) == 4 and sorted(train + test, key=lambda s: s.image) == normals
    assert test == sorted(test, key=lambda s: s.image)
    with pytest.raises(TilecoreError, match="test split: 1 good images cannot spare 1"):
        split_normals(normals[:1], 0.2, seed=0)


def test_unknown_layout_is_refused_naming_the_layouts(tmp_path: Path) -> None:
    images(tmp_path / "stuff", ["a.png"])
    with pytest.raises(TilecoreError, match=r"no known layout; expected one of: mvtec .* plain .*datasets.md"):
        detect_format(tmp_path)
    with pytest.raises(TilecoreError, match="folder not found"):
        detect_format(tmp_path / "missing")


def test_cli_refuses_an_unknown_layout_in_one_line(tmp_path: Path) -> None:
    images(tmp_path / "data" / "stuff", ["a.png"])
    config = tmp_path / "c.toml"
    config.write_text(toml_text({"data": {"root": str(tmp_path / "data")}}))
    proc = run_cli_here("train", config, "--out", tmp_path / "run")  # subprocess refusals: tests/test_cli.py
    assert_one_line_refusal(proc, r"no known layout; expected one of: mvtec")
    assert not (tmp_path / "run").exists()
