"""`tilecore run` through the CLI: results are never lost or mixed, and output faults are one line, exit 2."""

from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import assert_one_line_refusal, run_cli
from tests.faults import obey_file_modes
from tests.runtime.test_run_stream import tiny_bundle

RUN = [sys.executable, "-m", "tilecore.cli", "run"]
MANY = 200  # inputs of the runs that are stopped half-way


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def many(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of MANY test images (copies of the tiny dataset's 5), long enough to stop a run half-way even
    when the machine is loaded and the test process is slow to send its signal."""
    folder = tmp_path_factory.mktemp("many")
    tests = sorted((bundle.parent / "data" / "gravel" / "test").glob("*/*.png"))
    for i in range(MANY):
        shutil.copy(tests[i % len(tests)], folder / f"{i:03d}_{tests[i % len(tests)].parent.name}.png")
    return folder


@pytest.fixture(scope="module")
def reference(bundle: Path, many: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The records of an uninterrupted run over `many`."""
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = tilecore(bundle, many, out)
    assert proc.returncode == 0, proc.stderr
    return lines(out)


def tilecore(bundle: Path, spec: Path | str, out: Path | str, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("run", bundle, spec, "--out", out, "--device", "cpu", "--batch", "1", *extra, **kwargs)


def lines(out: Path) -> list[dict]:
    """Every line of out/results.jsonl, each of which must be a complete strict-JSON record."""
    data = (out / "results.jsonl").read_bytes() if (out / "results.jsonl").exists() else b""
    assert not data or data.endswith(b"\n"), "results.jsonl ends inside a record"

    def refuse(constant: str) -> None:
        raise AssertionError(f"results.jsonl holds {constant}")

    return [json.loads(line, parse_constant=refuse) for line in data.decode().splitlines()]


def test_input_typo_leaves_earlier_results_untouched(bundle: Path, tmp_path: Path) -> None:
    image = sorted((bundle.parent / "data" / "gravel" / "test" / "good").glob("*.png"))[0]
    out = tmp_path / "out"
    assert tilecore(bundle, image, out).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("results.jsonl", "summary.json")}
    typo = str(bundle.parent / "data" / "gravel" / "tset" / "*.png")
    assert_one_line_refusal(tilecore(bundle, typo, out), r"tset/\*\.png: no such file, folder or glob match")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert_one_line_refusal(tilecore(bundle, typo, out, "--overwrite"), r"tset/\*\.png: no such file")
    assert {name: (out / name).read_bytes() for name in before} == before


def test_rerun_needs_resume_or_overwrite(bundle: Path, tmp_path: Path) -> None:
    images = bundle.parent / "data" / "gravel" / "test" / "good"
    out = tmp_path / "out"
    assert tilecore(bundle, images, out).returncode == 0
    before = (out / "results.jsonl").read_bytes()
    refusal = r"holds results of an earlier run: add --resume to continue it or --overwrite to replace it"
    assert_one_line_refusal(tilecore(bundle, images, out), refusal)
    assert (out / "results.jsonl").read_bytes() == before
    assert_one_line_refusal(tilecore(bundle, images, out, "--resume", "--overwrite"), "pick one")
    proc = tilecore(bundle, images, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(lines(out)) == 2 and json.loads((out / "summary.json").read_text())["resumed"] == 0


def wait_for_lines(out: Path, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 120
    path = out / "results.jsonl"
    while not (path.exists() and path.read_bytes().count(b"\n") >= count):
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "no results appeared"
        time.sleep(0.005)


def default_sigint() -> None:
    """In the child: Ctrl-C's default action. A suite started in the background (`make test &`) inherits
    SIGINT ignored, and Python then never raises KeyboardInterrupt, so the run would not stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(bundle: Path, many: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [*RUN, str(bundle), str(many), "--out", str(out), "--device", "cpu", "--batch", "1", *extra]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )


def test_resume_after_a_killed_run_gives_one_line_per_input(
    bundle: Path, many: Path, reference: list[dict], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = start(bundle, many, out)
    wait_for_lines(out, proc, 3)
    proc.kill()
    proc.communicate()
    assert json.loads((out / "summary.json").read_text())["completed"] is False  # not the summary of a finished run
    with open(out / "results.jsonl", "ab") as results:
        results.write(b'{"input": "' + str(many).encode() + b"/0")  # and killed inside a record
    resumed = tilecore(bundle, many, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    records = lines(out)
    assert [r["input"] for r in records] == [r["input"] for r in reference] == sorted(map(str, many.glob("*.png")))
    assert [r["score"] for r in records] == pytest.approx([r["score"] for r in reference], abs=1e-5)
    assert [r["label"] for r in records] == [r["label"] for r in reference]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True and summary["images"] == MANY and summary["failed"] == 0
    assert 3 <= summary["resumed"] < MANY


def test_interrupted_run_says_so_in_its_summary(bundle: Path, many: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start(bundle, many, out)
    wait_for_lines(out, proc, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False
    assert summary["images"] + summary["failed"] == len(lines(out)) < MANY


def test_second_run_into_a_busy_folder_is_refused(bundle: Path, many: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        proc = tilecore(bundle, many, out)
    assert_one_line_refusal(proc, re.escape(f"--out {out}: another tilecore run is writing there"))
    assert not (out / "results.jsonl").exists() and not (out / "summary.json").exists()


def file_size_limit(limit: int):
    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


@pytest.mark.parametrize("extra", [(), ("--overlays",)], ids=["results", "overlays"])
def test_full_disk_ends_with_one_line_and_complete_records(
    bundle: Path, many: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    proc = tilecore(bundle, many, out, *extra, preexec_fn=file_size_limit(2048))
    assert_one_line_refusal(proc, re.escape(f"--out {out}") + r".*: cannot write \(File too large\)")
    records = lines(out)
    assert len(records) < MANY and (out / "results.jsonl").stat().st_size <= 2048
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["images"] + summary["failed"] == len(records)


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x")), r"exists and is not a folder"),
        (lambda tmp: (tmp / "file.txt" / "out", (tmp / "file.txt").write_text("x")), r"\(Not a directory\)"),
        (lambda tmp: (tmp / ("x" * 300) / "out", None), r"\(File name too long\)"),
    ],
    ids=["out-is-a-file", "out-under-a-file", "component-over-255-bytes"],
)
def test_output_folder_faults_are_one_line(bundle: Path, tmp_path: Path, make_out, message: str) -> None:
    out, _ = make_out(tmp_path)
    image = sorted((bundle.parent / "data" / "gravel" / "test" / "good").glob("*.png"))[0]
    assert_one_line_refusal(tilecore(bundle, image, out), rf"^error: --out .*{message}")


def test_read_only_folder_is_one_line(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    image = sorted((bundle.parent / "data" / "gravel" / "test" / "good").glob("*.png"))[0]
    proc = tilecore(bundle, image, out, preexec_fn=obey_file_modes)
    assert_one_line_refusal(proc, re.escape(f"--out {out}") + r".*\(Permission denied\)")
    assert list(out.iterdir()) == []


def test_names_that_look_like_console_markup_are_printed_as_they_are(bundle: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "x["  # inputs/]b.png prints as .../x[/]b.png: rich's closing tag with nothing to close
    inputs.mkdir()
    for name in ("]b.png", "[bold]c.png"):
        (inputs / name).write_bytes(b"")  # empty: each gets an error line, which the CLI prints
    proc = tilecore(bundle, inputs, tmp_path / "out")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    for name in ("]b.png", "[bold]c.png"):
        assert f"skipped {inputs / name}: image {inputs / name}: file is empty" in proc.stderr, proc.stderr


def test_overlay_and_mask_names_never_collide(bundle: Path, tmp_path: Path) -> None:
    image = sorted((bundle.parent / "data" / "gravel" / "test" / "good").glob("*.png"))[0].read_bytes()
    names = ["a b.png", "a_b.png", "a__b.png", "a?b.png", "a#b.png", "a.b.png", "a-b.png", "a b .png"]
    names += ["A" + "x" * 240 + ".png", "B" + "x" * 240 + ".png", "x" * 240 + "1.png", "x" * 240 + "2.png"]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in names:
        (inputs / name).write_bytes(image)
    out = tmp_path / "out"
    proc = tilecore(bundle, inputs, out, "--overlays", "--masks")
    assert proc.returncode == 0, proc.stderr
    records = lines(out)
    assert sorted(Path(r["input"]).name for r in records) == sorted(names)
    for kind in ("overlay", "mask"):
        files = [r[kind] for r in records]
        assert len(set(files)) == len(names) and all((out / f).is_file() for f in files)
        assert len(list((out / f"{kind}s").iterdir())) == len(names)
        assert max(len(Path(f).name.encode()) for f in files) <= 100


def test_progress_lines_and_summary_in_a_log(bundle: Path, many: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "TILECORE_PROGRESS_EVERY_S": "0"}  # stderr is a pipe: plain lines, one per batch
    proc = tilecore(bundle, many, out, "--side-by-side", env=env)
    assert proc.returncode == 0, proc.stderr
    pattern = r"^run: (\d+) scored \(\d+ anomalous\), 0 failed, [\d.e+]+ images/s, \d:\d\d:\d\d elapsed$"
    counts = [int(m.group(1)) for m in re.finditer(pattern, proc.stderr, re.M)]
    assert counts == list(range(1, MANY + 1)), proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert re.fullmatch(
        rf"{MANY} scored \(\d+ anomalous\), 0 failed, [\d.e+]+ images/s on CPUExecutionProvider, [\d.]+ s; "
        rf"results in {re.escape(str(out / 'results.jsonl'))}; summary in {re.escape(str(out / 'summary.json'))}; "
        rf"overlays in {re.escape(str(out / 'overlays'))}",
        last,
    ), last
    assert "\x1b[" not in proc.stderr
    assert len(list((out / "overlays").glob("*.png"))) == MANY and not list((out / "overlays").glob("*.png.png"))
