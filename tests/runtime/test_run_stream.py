"""`tilecore run` on a tiny bundle (a stream with bad items goes on), and run_stream's promises about --out."""

import errno
import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from tests.tiny import tiny_run
from tilecore.runtime import run_stream as run_stream_module
from tilecore.runtime import sources as sources_module
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import write_png
from tilecore.runtime.predictor import Result
from tilecore.runtime.run_stream import output_stem, run_stream

_BUNDLES: dict[Path, Path] = {}


def tiny_bundle(factory: pytest.TempPathFactory) -> Path:
    """The tiny run's bundle, exported once per test session (tests/test_run_cli.py uses it too)."""
    from tilecore.export.bundle import export_run

    key = factory.getbasetemp()
    if key not in _BUNDLES:
        root = factory.mktemp("stream")
        export_run(tiny_run(root), root / "bundle")
        _BUNDLES[key] = root / "bundle"
    return _BUNDLES[key]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory)


def test_stream_skips_bad_items_and_keeps_going(bundle: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    test_images = sorted((bundle.parent / "data" / "gravel" / "test").glob("*/*.png"))
    for i, path in enumerate(test_images[:3]):
        (inputs / f"{i}_ok.png").parent.mkdir(parents=True, exist_ok=True)
        (inputs / f"{i}_ok.png").write_bytes(path.read_bytes())
    (inputs / "1a_empty.png").write_bytes(b"")
    (inputs / "1b_corrupt.png").write_bytes(b"\x89PNG nonsense")
    write_png(inputs / "1c_tiny.png", np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(inputs / "1d_deep.png"), np.zeros((64, 64, 3), np.uint16))  # bit_depth auto: scored
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tilecore.cli", "run", str(bundle), str(inputs), "--out", str(out)]
    proc = subprocess.run([*command, "--device", "cpu", "--overlays", "--masks"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(r["input"]).name for r in records] == sorted(p.name for p in inputs.iterdir())
    errors = {Path(r["input"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"1a_empty.png", "1b_corrupt.png", "1c_tiny.png"}
    assert "empty" in errors["1a_empty.png"] and "smaller than one tile" in errors["1c_tiny.png"]
    scored = [r for r in records if "score" in r]
    assert len(scored) == 4 and all(r["label"] in ("normal", "anomalous") for r in scored)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["failed"] == 3 and summary["providers"] == ["CPUExecutionProvider"]
    assert len(list((out / "overlays").glob("*.png"))) == 4 and len(list((out / "masks").glob("*.png"))) == 4


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


# --------------------------------------------------------------------------------------------------
# run_stream in-process, with a stand-in Predictor: what lands in --out, and when


class FakeThresholds(dict):
    """Reads like the manifest's thresholds both as a dict and as a record with attributes."""

    image = 0.5
    pixel = 0.5

    def to_dict(self) -> dict:
        return dict(self)


class FakePredictor:
    """The attributes run_stream uses; each image's score is its red value / 100 unless `scores` says."""

    def __init__(self, scores: dict[int, float] | None = None, interrupt_on_call: int | None = None) -> None:
        self.grid = SimpleNamespace(tile_h=8, tile_w=8)
        self.thresholds = FakeThresholds(image=0.5, pixel=0.5)
        self.providers = ["FakeProvider"]
        self.bundle = Path("fake-bundle")
        self.manifest_sha256 = "0" * 64
        self.bit_depth = 8
        self.cascade = None  # no early exits: every member runs
        self.scores = scores or {}
        self.interrupt_on_call = interrupt_on_call
        self.calls = 0
        self.seen: list[int] = []

    def predict_batch(self, images: list[np.ndarray]) -> list[Result]:
        self.calls += 1
        if self.calls == self.interrupt_on_call:
            raise KeyboardInterrupt(f"fake Ctrl-C on call {self.calls}")
        results = []
        for image in images:
            value = int(image[0, 0, 0])
            self.seen.append(value)
            score = self.scores.get(value, value / 100)
            anomaly_map = np.full((8, 8), score, np.float32)
            results.append(Result(score, score >= 0.5, anomaly_map, anomaly_map >= 0.5))
        return results


def numbered_images(folder: Path, count: int) -> list[Path]:
    """`count` 16 x 16 images whose red value is their number (1..count), named in that order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for value in range(1, count + 1):
        image = np.zeros((16, 16, 3), np.uint8)
        image[..., 0] = value
        write_png(folder / f"{value:03d}.png", image)
        paths.append(folder / f"{value:03d}.png")
    return paths


def strict_lines(path: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, not strict JSON")

    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the file ends inside a record"
    return [json.loads(line, parse_constant=refuse) for line in data.decode().splitlines()]


def test_non_finite_score_is_an_error_line(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 4)
    predictor = FakePredictor({2: float("nan"), 3: float("inf")})
    summary = run_stream(predictor, str(tmp_path / "in"), tmp_path / "out", batch_size=4, overlays=True)
    records = strict_lines(tmp_path / "out" / "results.jsonl")
    assert [Path(r["input"]).name for r in records] == ["001.png", "002.png", "003.png", "004.png"]
    assert records[1] == {"input": str(tmp_path / "in" / "002.png"), "error": "score is not finite (nan)"}
    assert records[2]["error"] == "score is not finite (inf)" and "label" not in records[2]
    assert [r["score"] for r in (records[0], records[3])] == [0.01, 0.04]
    assert (summary["images"], summary["failed"], summary["completed"]) == (2, 2, True)
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 2  # none for the failed items


def test_summary_counts_equal_lines_and_say_completed(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 7)
    (tmp_path / "in" / "000_empty.png").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"images": 99, "completed": true}')  # stale, from some earlier run
    summary = run_stream(FakePredictor(), str(tmp_path / "in"), out, batch_size=3)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["completed"] is True and summary["resumed"] == 0
    assert (summary["images"], summary["anomalous"], summary["failed"]) == (7, 0, 1)
    assert summary["images"] + summary["failed"] == len(strict_lines(out / "results.jsonl"))


def test_interrupted_run_leaves_incomplete_summary_with_counts_of_its_lines(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 6)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt, match="^fake Ctrl-C on call 2$"):  # propagated as raised
        run_stream(FakePredictor(interrupt_on_call=2), str(tmp_path / "in"), out, batch_size=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False
    assert summary["images"] + summary["failed"] == len(strict_lines(out / "results.jsonl")) == 2


def test_folder_with_results_is_refused_and_kept(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    run_stream(FakePredictor(), str(tmp_path / "in"), out)
    before = {name: (out / name).read_bytes() for name in ("results.jsonl", "summary.json")}
    with pytest.raises(TilecoreError, match=r"holds results of an earlier run: add --resume .* or --overwrite"):
        run_stream(FakePredictor(), str(tmp_path / "in"), out)
    assert {name: (out / name).read_bytes() for name in before} == before
    with pytest.raises(TilecoreError, match="--resume and --overwrite: pick one"):
        run_stream(FakePredictor(), str(tmp_path / "in"), out, resume=True, overwrite=True)


def test_input_typo_touches_nothing(tmp_path: Path) -> None:
    with pytest.raises(TilecoreError, match="no such file, folder or glob match"):
        run_stream(FakePredictor(), str(tmp_path / "tset" / "*.png"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resume_scores_only_what_is_missing_and_drops_a_torn_line(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 6)
    reference = tmp_path / "reference"
    run_stream(FakePredictor(), str(tmp_path / "in"), reference, batch_size=2)
    out = tmp_path / "out"
    out.mkdir()
    lines = (reference / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:20])  # killed inside the 4th record
    predictor = FakePredictor()
    decoded = []
    real_read_rgb = sources_module.read_rgb

    def counting_read_rgb(path: Path, *args: object) -> np.ndarray:
        decoded.append(Path(path).name)
        return real_read_rgb(path, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources_module, "read_rgb", counting_read_rgb)
        summary = run_stream(predictor, str(tmp_path / "in"), out, batch_size=2, resume=True)
    assert predictor.seen == [4, 5, 6]
    assert decoded == [Path(r["input"]).name for r in strict_lines(reference / "results.jsonl")[3:]]  # 3 never read
    drop_timings = [
        {k: v for k, v in r.items() if k != "timings_ms"} for r in strict_lines(reference / "results.jsonl")
    ]
    assert [
        {k: v for k, v in r.items() if k != "timings_ms"} for r in strict_lines(out / "results.jsonl")
    ] == drop_timings
    assert (summary["images"], summary["resumed"], summary["completed"]) == (6, 3, True)


def test_resume_counts_repeated_names(tmp_path: Path) -> None:
    a, b = numbered_images(tmp_path / "in", 2)
    (tmp_path / "list.txt").write_text(f"{a}\n{a}\n{b}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"input": str(a), "score": 0.01, "label": "normal"}) + "\n")
    predictor = FakePredictor()
    summary = run_stream(predictor, str(tmp_path / "list.txt"), out, batch_size=1, resume=True)
    assert predictor.seen == [1, 2]  # the second listing of a, then b
    assert [r["input"] for r in strict_lines(out / "results.jsonl")] == [str(a), str(a), str(b)]
    assert summary["images"] == 3


def test_resume_refuses_a_file_that_is_not_results(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"input": "x"}{"input": "y"}\n')  # two runs interleaved
    with pytest.raises(TilecoreError, match=r"results.jsonl line 1: not a result record .* --overwrite"):
        run_stream(FakePredictor(), str(tmp_path / "in"), out, resume=True)


def test_resume_of_a_camera_is_refused_before_the_camera_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "0" names no file here, so it is a camera index

    def never(*args: object) -> None:
        raise AssertionError("the camera was opened")

    monkeypatch.setattr("tilecore.runtime.sources._camera_frames", never)
    with pytest.raises(TilecoreError, match=r"^--resume with camera 0: a camera has no earlier frames to skip"):
        run_stream(FakePredictor(), "0", tmp_path / "out", resume=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", ["input", "bundle"])
def test_resume_with_another_input_or_bundle_is_refused(tmp_path: Path, change: str) -> None:
    numbered_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    run_stream(FakePredictor(), str(tmp_path / "in"), out)
    (out / "results.jsonl").write_text((out / "results.jsonl").read_text().splitlines()[0] + "\n")  # cut short
    other = FakePredictor()
    spec = str(tmp_path / "in")
    if change == "input":
        spec = str(tmp_path / "in" / ".." / "in")  # the same folder, spelled otherwise: names would differ
    else:
        other.manifest_sha256 = "1" * 64
    with pytest.raises(TilecoreError, match=rf"^--resume into {out}: the earlier run has .*use --overwrite$"):
        run_stream(other, spec, out, resume=True)
    assert len((out / "results.jsonl").read_text().splitlines()) == 1 and other.calls == 0


def test_overwrite_starts_afresh(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "from-another-run.png").write_bytes(b"old")
    (out / "results.jsonl").write_text('{"input": "elsewhere.png", "error": "old"}\n')
    summary = run_stream(FakePredictor(), str(tmp_path / "in"), out, overlays=True, overwrite=True)
    records = strict_lines(out / "results.jsonl")
    assert [Path(r["input"]).name for r in records] == ["001.png", "002.png", "003.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(Path(r["overlay"]).name for r in records)
    assert summary["images"] == 3


def test_failed_write_cuts_results_back_to_the_last_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    numbered_images(tmp_path / "in", 5)
    out = tmp_path / "out"
    real_write = os.write
    lines_written = []

    def disk_fills_on_third_line(fd: int, data: bytes) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            return real_write(fd, data)
        lines_written.append(bytes(data))
        if len(lines_written) == 3:
            real_write(fd, bytes(data)[:10])  # half a record reaches the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(run_stream_module.os, "write", disk_fills_on_third_line)
    with pytest.raises(TilecoreError, match=r"results.jsonl: cannot write \(No space left on device\)"):
        run_stream(FakePredictor(), str(tmp_path / "in"), out, batch_size=1)
    monkeypatch.undo()
    assert len(strict_lines(out / "results.jsonl")) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["images"] == 2


def test_busy_folder_is_refused_and_the_lock_is_released_after(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TilecoreError, match=r"another tilecore run is writing there"):
            run_stream(FakePredictor(), str(tmp_path / "in"), out)
    assert not (out / "results.jsonl").exists()
    run_stream(FakePredictor(), str(tmp_path / "in"), out)
    with open(out / ".lock", "a") as after:
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if a run still held it


def test_output_stems_never_collide_and_stay_short() -> None:
    names = [
        "a b.png",
        "a_b.png",
        "a__b.png",
        "a?b.png",
        "a#b.png",
        "a.b.png",
        "a b",
        "a-b.png",
        "dir/a b.png",
        "dir a/b.png",
        "caf\udce9.png",
        "caf\udcff.png",
        "café.png",
        "cafe.png",
        "video.mp4#1",
        "video.mp4#11",
        "A" + "x" * 500 + ".png",
        "B" + "x" * 500 + ".png",
        "x" * 500 + "1.png",
        "x" * 500 + "2.png",
    ]
    stems = [output_stem(name) for name in names]
    assert len(set(stems)) == len(names)
    for stem in stems:
        assert stem.isascii() and len(stem) <= 80 and "/" not in stem and not stem.startswith(".")
    assert output_stem("data/gravel/test/crack/000.png").startswith("data_gravel_test_crack_000-")


def test_summary_is_rewritten_while_the_run_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    numbered_images(tmp_path / "in", 4)
    out = tmp_path / "out"
    monkeypatch.setattr(run_stream_module, "SUMMARY_EVERY_S", 0.0)
    seen_by_batch = []

    class Watching(FakePredictor):
        def predict_batch(self, images: list[np.ndarray]) -> list[Result]:
            summary = json.loads((out / "summary.json").read_text())
            seen_by_batch.append((summary["completed"], summary["images"], len(strict_lines(out / "results.jsonl"))))
            return super().predict_batch(images)

    run_stream(Watching(), str(tmp_path / "in"), out, batch_size=1)
    assert seen_by_batch == [(False, 0, 0), (False, 1, 1), (False, 2, 2), (False, 3, 3)]
    assert json.loads((out / "summary.json").read_text())["completed"] is True


def test_output_stems_have_no_double_suffix_and_keep_subfolders_apart() -> None:
    names = ["x.png", "x.PNG", "x.jpeg", "a/x.png", "b/x.png", "a/b/x.png", "a_b/x.png", "x"]
    stems = [output_stem(name) for name in names]
    assert len(set(stems)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+-[0-9a-f]{16}", stem) for stem in stems), stems
    assert stems[0].startswith("x-") and stems[3].startswith("a_x-") and stems[5].startswith("a_b_x-")


def test_progress_callback_gets_the_counts_after_each_batch(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 5)
    (tmp_path / "in" / "004.png").write_bytes(b"")  # one bad input
    seen = []
    run_stream(FakePredictor(), str(tmp_path / "in"), tmp_path / "out", batch_size=2, on_batch=seen.append)
    assert [(s["images"], s["failed"]) for s in seen] == [(2, 0), (3, 1), (4, 1)]
    assert all(s["completed"] is False and s["images_per_second"] is not None for s in seen)


def test_side_by_side_overlays_are_twice_as_wide(tmp_path: Path) -> None:
    numbered_images(tmp_path / "in", 1)
    widths = {}
    for side in (False, True):
        out = tmp_path / f"out{side}"
        run_stream(FakePredictor(), str(tmp_path / "in"), out, overlays=True, side_by_side=side)
        record = strict_lines(out / "results.jsonl")[0]
        assert record["overlay"].endswith(".png") and not record["overlay"].endswith(".png.png")
        widths[side] = cv2.imread(str(out / record["overlay"])).shape[1]
    assert widths[True] - widths[False] == 16  # the 16 px original beside the overlay
