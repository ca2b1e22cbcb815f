"""`tilecore run` and `tilecore train` over inputs that used to crash, vanish or pass as good images.

Every command runs in a subprocess: a crash inside OpenCV (SIGSEGV on a file name that is not UTF-8) ends
the process, which only a subprocess can observe.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import pytest

from tests.cli import assert_one_line_refusal, describe, run_cli
from tests.runtime.test_image_io import zeros_png
from tests.tiny import tiny_run
from tilecore.export.bundle import export_run

NOT_UTF8 = b"caf\xe9_\xff.png"  # Latin-1 bytes: not valid UTF-8


def write_raw_name(folder: Path, raw_name: bytes, data: bytes) -> None:
    fd = os.open(os.fsencode(folder) + b"/" + raw_name, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    export_run(tiny_run(root), root / "bundle")
    return root / "bundle"


def test_run_accounts_for_every_entry_and_survives_any_name(bundle: Path, tmp_path: Path) -> None:
    good = sorted((bundle.parent / "data" / "gravel" / "test").glob("*/*.png"))[:2]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, path in enumerate(good):
        shutil.copy(path, inputs / f"{i}_good.png")
    write_raw_name(inputs, NOT_UTF8, good[0].read_bytes())  # SIGSEGV in cv2.imread(str(path)) before
    os.symlink(inputs / "nowhere.png", inputs / "d_broken_link.png")  # dropped without a line before
    (inputs / "e_folder.png").mkdir()  # dropped without a line before
    jpeg = cv2.imencode(".jpg", cv2.imread(str(good[0])))[1].tobytes()
    (inputs / "f_cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # scored before (OpenCV only warned)
    png = good[0].read_bytes()
    (inputs / "g_cut.png").write_bytes(png[: len(png) // 2])
    (inputs / "h_huge.png").write_bytes(zeros_png(20000, 20000))  # decoded at 2.6 GB and scored before
    out = tmp_path / "out"
    proc = run_cli("run", bundle, inputs, "--out", out, "--device", "cpu", "--masks", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr + proc.stdout, describe(proc)

    raw_lines = (out / "results.jsonl").read_bytes().splitlines()
    records = [json.loads(line.decode("utf-8")) for line in raw_lines]  # strict UTF-8, one record a line
    assert len(records) == len(os.listdir(os.fsencode(inputs))) == 8
    by_name = {Path(r["input"]).name: r for r in records}
    shown = NOT_UTF8.decode("utf-8", "backslashreplace")
    assert shown == "caf\\xe9_\\xff.png" and shown in by_name
    scored = sorted(name for name, r in by_name.items() if "score" in r)
    assert scored == ["0_good.png", "1_good.png", shown]
    assert by_name[shown]["score"] == by_name["0_good.png"]["score"]  # the same bytes: the same score
    reasons = {
        "d_broken_link.png": "broken symbolic link",
        "e_folder.png": "is a folder",
        "f_cut.jpg": "JPEG is truncated",
        "g_cut.png": "PNG is truncated",
        "h_huge.png": "20000x20000 PNG is 400.0 megapixels, over the limit of 100.0 megapixels",
    }
    for name, reason in reasons.items():
        assert reason in by_name[name]["error"], by_name[name]
    for record in records:
        record["input"].encode("utf-8")  # no lone surrogates: any JSON reader takes the line
    assert len(list((out / "masks").glob("*.png"))) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("7", r"^error: camera 7: cannot open \(no such camera, or it is in use\)$"),
        ("99999999999999999999", r"^error: camera 99999999999999999999: expected a camera index from 0 to 99 "),
    ],
)
def test_camera_that_does_not_exist_is_one_line(bundle: Path, tmp_path: Path, spec: str, message: str) -> None:
    # Before: index 7 also printed OpenCV's backend warnings; the long number ended in a traceback.
    if spec == "7" and Path("/dev/video7").exists():
        pytest.skip("this machine has a /dev/video7")
    proc = run_cli("run", bundle, spec, "--out", tmp_path / "out", "--device", "cpu", cwd=tmp_path)
    assert_one_line_refusal(proc, message)
    assert "WARN" not in proc.stderr, describe(proc)


TRAIN_CONFIG = """\
[data]
root = "{root}"
categories = ["gravel"]
image_size = 64
val_fraction = 0.25

[[members]]
backbone = "resnet18"
layers = ["layer2", "layer3"]
pretrained = false
pretrain_embed_dimension = 32
target_embed_dimension = 16

[tiling]
tile_size = [32]
stride = [32]
"""


def test_train_over_a_name_that_is_not_utf8(bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(bundle.parent / "data", data)
    train_good = data / "gravel" / "train" / "good"
    write_raw_name(train_good, NOT_UTF8, sorted(train_good.glob("*.png"))[0].read_bytes())
    (tmp_path / "config.toml").write_text(TRAIN_CONFIG.format(root=data))
    proc = run_cli("train", tmp_path / "config.toml", "--out", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)  # SIGSEGV (exit -11) before
    assert "Traceback" not in proc.stderr + proc.stdout, describe(proc)
    split = json.loads((tmp_path / "run" / "gravel" / "split.json").read_text())
    used = [os.fsencode(path) for path in split["train"] + split["validation"]]
    assert os.fsencode(train_good) + b"/" + NOT_UTF8 in used
