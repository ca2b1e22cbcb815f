from pathlib import Path

import numpy as np
import pytest

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import write_png
from tilecore.train.data import list_categories, load_category, split_validation

PIXEL = np.zeros((4, 4, 3), dtype=np.uint8)


def make_mvtec(root: Path, n_train: int = 10) -> None:
    for i in range(n_train):
        write_png(root / "bottle" / "train" / "good" / f"{i:03d}.png", PIXEL)
    write_png(root / "bottle" / "test" / "good" / "000.png", PIXEL)
    write_png(root / "bottle" / "test" / "crack" / "000.png", PIXEL)
    write_png(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", PIXEL[..., 0])


def test_mvtec_layout(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    assert list_categories(tmp_path, "mvtec") == ["bottle"]
    data = load_category(tmp_path, "bottle", "mvtec", val_fraction=0.2, seed=0)
    assert (len(data.train), len(data.validation)) == (8, 2)
    assert {s.image for s in data.train}.isdisjoint({s.image for s in data.validation})
    defects = {s.defect: s for s in data.test}
    assert defects["good"].label == 0 and defects["good"].mask is None
    assert defects["crack"].label == 1 and defects["crack"].mask.name == "000_mask.png"


def test_visa_layout(tmp_path: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for i in range(5):
        write_png(tmp_path / "candle" / f"n{i}.png", PIXEL)
        rows.append(f"candle,train,normal,candle/n{i}.png,")
    write_png(tmp_path / "candle" / "a0.png", PIXEL)
    write_png(tmp_path / "candle" / "a0_mask.png", PIXEL[..., 0])
    rows.append("candle,test,anomaly,candle/a0.png,candle/a0_mask.png")
    rows.append("candle,test,normal,candle/n0.png,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert list_categories(tmp_path, "visa") == ["candle"]
    data = load_category(tmp_path, "candle", "visa", val_fraction=0.2, seed=0)
    assert (len(data.train), len(data.validation), len(data.test)) == (4, 1, 2)
    assert [s.label for s in data.test] == [1, 0]
    assert data.test[0].mask == tmp_path / "candle" / "a0_mask.png"


def test_split_is_seeded() -> None:
    normals = list(range(50))
    a = split_validation(normals, 0.1, seed=1)
    assert a == split_validation(normals, 0.1, seed=1)
    assert a != split_validation(normals, 0.1, seed=2)
    assert len(a[1]) == 5 and sorted(a[0] + a[1]) == normals


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "folder not found"),
        (lambda root: (root / "bottle" / "train" / "good").mkdir(parents=True), "no normal training images"),
        (lambda root: (root / "bottle").mkdir(parents=True), "missing train/good"),
    ],
)
def test_bad_datasets_fail_clearly(tmp_path: Path, setup, message: str) -> None:
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(TilecoreError, match=message):
        load_category(root, "bottle", "mvtec", 0.1, 0)


def test_validation_needs_enough_images(tmp_path: Path) -> None:
    make_mvtec(tmp_path, n_train=1)
    with pytest.raises(TilecoreError, match="cannot spare"):
        load_category(tmp_path, "bottle", "mvtec", val_fraction=0.1, seed=0)


def test_broken_links_and_image_named_folders_are_listed_then_skipped_with_a_message(tmp_path: Path, caplog) -> None:
    from tilecore.train.data import Sample, list_images
    from tilecore.train.fit import read_batches

    folder = tmp_path / "good"
    folder.mkdir()
    write_png(folder / "a.png", np.zeros((8, 8, 3), np.uint8))
    (folder / "b.png").symlink_to(folder / "gone.png")
    (folder / "c.png").mkdir()
    (folder / "notes.txt").write_text("not an image")
    listed = list_images(folder)
    assert [p.name for p in listed] == ["a.png", "b.png", "c.png"]
    skipped: list[str] = []
    with caplog.at_level("WARNING", logger="tilecore"):
        batches = list(read_batches([Sample(p, 0, "good") for p in listed], 4, skipped))
    assert [[s.image.name for s in samples] for samples, _ in batches] == [["a.png"]]
    assert skipped == [str(folder / "b.png"), str(folder / "c.png")]
    messages = [r.getMessage() for r in caplog.records]
    assert any("b.png: broken symbolic link" in m for m in messages), messages
    assert any("c.png: is a folder" in m for m in messages), messages
