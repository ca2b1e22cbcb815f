"""`tilecore run` end to end on a tiny bundle: a stream with bad items goes on and counts them."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.tiny import tiny_run
from tilecore.export.bundle import export_run
from tilecore.runtime.image_io import write_png


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    export_run(tiny_run(root), root / "bundle")
    return root / "bundle"


def test_stream_skips_bad_items_and_keeps_going(bundle: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    test_images = sorted((bundle.parent / "data" / "gravel" / "test").glob("*/*.png"))
    for i, path in enumerate(test_images[:3]):
        (inputs / f"{i}_ok.png").parent.mkdir(parents=True, exist_ok=True)
        (inputs / f"{i}_ok.png").write_bytes(path.read_bytes())
    (inputs / "1a_empty.png").write_bytes(b"")
    (inputs / "1b_corrupt.png").write_bytes(b"\x89PNG nonsense")
    write_png(inputs / "1c_tiny.png", np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(inputs / "1d_deep.png"), np.zeros((64, 64, 3), np.uint16))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tilecore.cli", "run", str(bundle), str(inputs), "--out", str(out)]
    proc = subprocess.run([*command, "--device", "cpu", "--overlays", "--masks"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(r["input"]).name for r in records] == sorted(p.name for p in inputs.iterdir())
    errors = {Path(r["input"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"1a_empty.png", "1b_corrupt.png", "1c_tiny.png", "1d_deep.png"}
    assert "empty" in errors["1a_empty.png"] and "smaller than one tile" in errors["1c_tiny.png"]
    scored = [r for r in records if "score" in r]
    assert len(scored) == 3 and all(r["label"] in ("normal", "anomalous") for r in scored)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3 and summary["failed"] == 4 and summary["providers"] == ["CPUExecutionProvider"]
    assert len(list((out / "overlays").glob("*.png"))) == 3 and len(list((out / "masks").glob("*.png"))) == 3


def test_runtime_cli_needs_no_torch(bundle: Path, tmp_path: Path) -> None:
    image = sorted((bundle.parent / "data" / "gravel" / "test" / "good").glob("*.png"))[0]
    code = (
        "import sys\n"
        "for name in ('torch', 'timm', 'torchvision'):\n    sys.modules[name] = None\n"
        "from tilecore.cli import main\n"
        f"sys.argv = ['tilecore', 'run', {str(bundle)!r}, {str(image)!r}, '--out', {str(tmp_path / 'o')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["images"] == 1


def test_bad_bundle_and_device_are_one_line_errors(bundle: Path, tmp_path: Path) -> None:
    for args, keyword in (
        (["run", str(tmp_path), "x.png"], "no manifest.json"),
        (["run", str(bundle), "x.png", "--device", "tpu"], "--device 'tpu'"),
        (["run", str(bundle), "x.png", "--recheck", "0.5"], "--recheck 0.5: only with a reduced"),  # fp32
        (["run", str(bundle), "x.png", "--device", "cpu", "--streams", "2"], "--streams 2: parallel streams"),
    ):
        proc = subprocess.run([sys.executable, "-m", "tilecore.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert keyword in proc.stderr, proc.stderr
