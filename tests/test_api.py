"""The public Python API: `from tilecore.runtime import Predictor, Result`, loaded lazily; `predict` takes a
path or an RGB uint8 array and refuses anything else in one line; `tilecore --version`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tilecore
import tilecore.runtime
from tests.cli import describe, run_cli
from tests.tiny import tiny_run
from tilecore.runtime import Predictor, Result, TilecoreError
from tilecore.runtime.image_io import read_rgb

LAZY = """
import sys
import tilecore.runtime.calibration
heavy = {"faiss", "onnxruntime", "cv2"} & set(sys.modules)
assert not heavy, sorted(heavy)
from tilecore.runtime import Predictor, Result
assert "faiss" in sys.modules and Predictor.__module__ == "tilecore.runtime.predictor"
print("ok")
"""


def test_importing_part_of_the_runtime_does_not_load_the_predictor() -> None:
    proc = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", describe(proc)


def test_every_public_name_resolves_and_others_do_not() -> None:
    for name in tilecore.runtime.__all__:
        assert getattr(tilecore.runtime, name).__name__ == name
    assert set(tilecore.runtime.__all__) <= set(dir(tilecore.runtime))
    with pytest.raises(AttributeError, match="module 'tilecore.runtime' has no attribute 'Predicter'"):
        tilecore.runtime.Predicter  # noqa: B018


def test_version_flag() -> None:
    proc = run_cli("--version", timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"tilecore {tilecore.__version__}\n", describe(proc)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, Path]:
    from tilecore.export.bundle import export_run

    root = tmp_path_factory.mktemp("api")
    export_run(tiny_run(root), root / "bundle")
    image = next((root / "data" / "gravel" / "test").glob("*/*.png"))
    return Predictor(root / "bundle", device="cpu"), image


def test_predict_takes_a_path_or_an_array(predictor: tuple[Predictor, Path]) -> None:
    model, image = predictor
    from_array = model.predict(read_rgb(image))
    for given in (image, str(image)):
        result = model.predict(given)
        assert isinstance(result, Result)
        assert result.score == from_array.score and np.array_equal(result.anomaly_map, from_array.anomaly_map)
    other = next(p for p in image.parent.parent.glob("*/*.png") if p != image)
    assert model.predict(other).score != from_array.score  # the path is what gets read


def test_a_missing_or_unreadable_path_is_one_line(predictor: tuple[Predictor, Path], tmp_path: Path) -> None:
    model, _ = predictor
    with pytest.raises(TilecoreError, match=r"nope\.png.*(not found|no such file)") as caught:
        model.predict(tmp_path / "nope.png")
    assert "\n" not in str(caught.value)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(TilecoreError, match=r"text\.png") as caught:
        model.predict(str(tmp_path / "text.png"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((32, 32, 3), np.float32), r"expected an RGB uint8 array \[H, W, 3\], got float32 \[32, 32, 3\]"),
        (np.zeros((32, 32), np.uint8), r"expected an RGB uint8 array \[H, W, 3\], got uint8 \[32, 32\]"),
        (np.zeros((32, 32, 4), np.uint8), r"expected an RGB uint8 array \[H, W, 3\], got uint8 \[32, 32, 4\]"),
        (np.zeros((0, 32, 3), np.uint8), r"expected an RGB uint8 array \[H, W, 3\], got uint8 \[0, 32, 3\]"),
        ([[0, 0, 0]], r"expected an image path or an RGB uint8 array, got list"),
    ],
)
def test_other_inputs_are_refused_in_one_line(predictor: tuple[Predictor, Path], image: object, message: str) -> None:
    model, _ = predictor
    with pytest.raises(TilecoreError, match=f"^predict: {message}") as caught:
        model.predict(image)
    assert "\n" not in str(caught.value)
