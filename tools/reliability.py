"""Try tilecore the way a careless user, a failing machine and an attacker would; write what happened.

    .venv/bin/python tools/reliability.py --out docs/results

Builds its own small world in --work (a synthetic dataset, a tiny random-init resnet18 run, a bundle, a
key pair), then runs each case as a subprocess through the `tilecore` CLI (or a short Python snippet
where the case is an API one), and records the exit status, the last line on stderr and whether a
traceback appeared. Writes reliability.json and reliability.md (docs/results/reliability.md).
Needs the train, export and dev extras.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TILECORE = [sys.executable, "-m", "tilecore.cli"]
TINY_CONFIG = """\
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
"""


@dataclass
class Outcome:
    code: int
    stderr_tail: str
    traceback: bool
    seconds: float


@dataclass
class Case:
    name: str  # what is tried
    argv: list[str]  # the command (run in --work)
    expect: str  # "refused": exit 2, one line, no traceback; "ok": exit 0
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, Outcome], str] | None = None  # extra finding, "" when none
    preexec: Callable[[], None] | None = None
    timeout: float = 300.0
    notes: list[str] = field(default_factory=list)


def run_case(case: Case, work: Path) -> dict:
    if case.setup is not None:
        case.setup(work)
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            case.argv, cwd=work, capture_output=True, timeout=case.timeout, preexec_fn=case.preexec, env=child_env()
        )
        code, stderr = proc.returncode, proc.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        code, stderr = -1, "timed out"
    outcome = Outcome(code, last_line(stderr), "Traceback" in stderr, time.perf_counter() - started)
    finding = case.check(work, outcome) if case.check is not None else ""
    passed = not outcome.traceback and (outcome.code == 2 if case.expect == "refused" else outcome.code == 0)
    passed = passed and not finding.startswith("FAIL")
    return {
        "case": case.name,
        "command": shown_command(case.argv),
        "expected": case.expect,
        "exit": outcome.code,
        "message": outcome.stderr_tail,
        "traceback": outcome.traceback,
        "finding": finding,
        "as_expected": passed,
        "seconds": round(outcome.seconds, 2),
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["COLUMNS"] = "400"  # rich must not fold the one-line error
    return env


def shown_command(argv: list[str]) -> str:
    """The command as a user would type it: `tilecore ...`, or `python -c NAME` for a snippet of this file."""
    if argv[: len(TILECORE)] == TILECORE:
        return shlex.join(["tilecore", *argv[len(TILECORE) :]])
    return shlex.join(["python" if a == sys.executable else SNIPPET_NAMES.get(a, a) for a in argv])


def last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# --------------------------------------------------------------------------------------------------
# The small world every case starts from


def build_world(work: Path) -> None:
    """dataset/, run/, bundle/, keys/ in `work` (reused when present)."""
    work.mkdir(parents=True, exist_ok=True)

    def tilecore(*args: str) -> None:
        subprocess.run([*TILECORE, *args], cwd=work, check=True, env=child_env())

    if not (work / "dataset" / "dataset.json").is_file():
        tilecore(
            "data",
            "synth",
            "--out",
            "dataset",
            "--size",
            "256",
            "--n-train",
            "8",
            "--n-test-good",
            "2",
            "--n-test-defect",
            "3",
        )
    (work / "tiny.toml").write_text(TINY_CONFIG.format(root=(work / "dataset").resolve()))
    if not (work / "run" / "gravel").is_dir():
        tilecore("train", "tiny.toml", "--out", "run")
    if not (work / "keys").is_dir():
        tilecore("keygen", "--out", "keys")
    if not (work / "bundle").is_dir():
        tilecore("export", "run", "--out", "bundle")
    if not (work / "signed").is_dir():
        tilecore("export", "run", "--out", "signed", "--sign", "keys/tilecore-signing.key")
    (work / "other-keys").exists() or tilecore("keygen", "--out", "other-keys")


def fresh_copy(name: str, source: str = "bundle") -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(work / source, work / name)

    return setup


def edit_manifest(
    name: str, edit: Callable[[dict], None], source: str = "bundle", rehash: bool = False
) -> Callable[[Path], None]:
    """A copy of `source` whose manifest `edit` changed; `rehash`: its digest recomputed too."""

    def setup(work: Path) -> None:
        fresh_copy(name, source)(work)
        path = work / name / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest, indent=2))
        if rehash:
            rehash_manifest(work / name)

    return setup


def rehash_manifest(folder: Path) -> None:
    """What an attacker does after editing a file: recompute every sha256 and the manifest's digest."""
    from tilecore.runtime.artifacts import sha256_file
    from tilecore.runtime.manifest import DIGEST_FILE, MANIFEST_FILE

    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"]}
    path.write_text(json.dumps(manifest, indent=2))
    (folder / DIGEST_FILE).write_text(sha256_file(path) + "\n")


def poison_bank(name: str, source: str, same_rows: bool) -> Callable[[Path], None]:
    """Replace the bundle's bank by one that hides defects (far away rows, or many more rows), rehash."""

    def setup(work: Path) -> None:
        import faiss

        fresh_copy(name, source)(work)
        folder = work / name
        bank_file = sorted(folder.glob("bank_*.faiss"))[0]
        index = faiss.read_index(str(bank_file))
        rows = index.reconstruct_n(0, index.ntotal)
        extra = np.random.default_rng(0).normal(0, 50, (len(rows) * (1 if same_rows else 20), rows.shape[1]))
        poisoned = faiss.IndexFlatL2(rows.shape[1])
        poisoned.add(extra.astype(np.float32) if same_rows else np.vstack([rows, extra]).astype(np.float32))
        faiss.write_index(poisoned, str(bank_file))
        rehash_manifest(folder)

    return setup


def write_bytes(relative: str, data: bytes) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        path = work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def huge_png(height: int, width: int) -> bytes:
    """A grey PNG of height x width pixels that is small on disk (zlib of zero rows)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_image(work: Path) -> Path:
    return sorted((work / "dataset" / "gravel" / "test" / "good").glob("*.png"))[0]


def lines_of(relative: str) -> Callable[[Path], list[str]]:
    return lambda work: (work / relative).read_text().splitlines() if (work / relative).is_file() else []


def count_lines(relative: str, expected: int) -> Callable[[Path, Outcome], str]:
    def check(work: Path, outcome: Outcome) -> str:
        lines = lines_of(relative)(work)
        try:
            [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            return f"FAIL: {relative} holds a line that is not JSON"
        verdict = "" if len(lines) == expected else "FAIL: "
        return f"{verdict}{len(lines)} result lines (expected {expected}), all valid JSON"

    return check


def limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def python_snippet(code: str, name: str) -> list[str]:
    """A Python script as a command; the report shows it as `python -c NAME`, the name in this file."""
    SNIPPET_NAMES[textwrap.dedent(code)] = name
    return [sys.executable, "-c", textwrap.dedent(code)]


SNIPPET_NAMES: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------


def cases(work: Path) -> list[Case]:
    image = str(test_image(work).relative_to(work))
    run = [*TILECORE, "run"]
    return [
        # ---- bundle integrity and signatures
        Case(
            "manifest edited (image threshold x1000)",
            [*run, "edited", image, "--out", "out/edited"],
            "refused",
            edit_manifest("edited", lambda m: m["thresholds"].update(image=m["thresholds"]["image"] * 1000)),
        ),
        Case(
            "manifest names a file outside the bundle (../x), digest recomputed",
            [*run, "escape", image, "--out", "out/esc"],
            "refused",
            edit_manifest("escape", lambda m: m["members"][0].update(engine="../bundle/x.onnx"), rehash=True),
        ),
        Case(
            "manifest field of the wrong type, digest recomputed",
            [*run, "wrongtype", image, "--out", "out/wt"],
            "refused",
            edit_manifest("wrongtype", lambda m: m["members"][0].update(embedding_dim="sixteen"), rehash=True),
        ),
        Case(
            "manifest field missing, digest recomputed",
            [*run, "missing", image, "--out", "out/missing"],
            "refused",
            edit_manifest("missing", lambda m: m.pop("thresholds"), rehash=True),
        ),
        Case(
            "unsigned bundle: threshold edited and digest recomputed (accepted: only a signature stops this)",
            [*run, "rewritten", image, "--out", "out/rewritten"],
            "ok",
            edit_manifest("rewritten", lambda m: m["thresholds"].update(image=1e9), rehash=True),
        ),
        Case(
            "bank replaced (20x rows), sha256s and digest recomputed",
            [*run, "rows", image, "--out", "out/rows"],
            "refused",
            poison_bank("rows", "bundle", same_rows=False),
        ),
        Case(
            "signed bundle, --trust with its key",
            [*run, "signed", image, "--out", "out/signed", "--trust", "keys/tilecore-signing.pub"],
            "ok",
        ),
        Case(
            "signed bundle: bank replaced (same rows), everything rehashed",
            [*run, "poisoned", image, "--out", "out/poisoned", "--trust", "keys/tilecore-signing.pub"],
            "refused",
            poison_bank("poisoned", "signed", same_rows=True),
        ),
        Case(
            "signed bundle: manifest edited and digest recomputed",
            [*run, "resigned", image, "--out", "out/resigned", "--trust", "keys/tilecore-signing.pub"],
            "refused",
            edit_manifest("resigned", lambda m: m["thresholds"].update(image=1e9), "signed"),
        ),
        Case(
            "signed bundle, --trust with another key",
            [*run, "signed", image, "--out", "out/wrongkey", "--trust", "other-keys/tilecore-signing.pub"],
            "refused",
        ),
        Case(
            "unsigned bundle, --trust",
            [*run, "bundle", image, "--out", "out/unsigned", "--trust", "keys/tilecore-signing.pub"],
            "refused",
        ),
        # ---- inputs
        Case(
            "input path typo, into an --out holding yesterday's results",
            [*run, "bundle", "dataset/gravel/tset/*.png", "--out", "out/typo"],
            "refused",
            lambda w: run_once(w, image, "out/typo"),
            kept_results("out/typo"),
        ),
        Case(
            "file name that is not UTF-8, beside good images",
            [*run, "bundle", "mixed", "--out", "out/mixed"],
            "ok",
            setup_mixed_folder,
            count_lines("out/mixed/results.jsonl", 6),
        ),
        Case(
            "PNG of 20000 x 20000 pixels (small on disk)",
            [*run, "bundle", "huge.png", "--out", "out/huge"],
            "ok",
            write_bytes("huge.png", huge_png(20000, 20000)),
            failed_with("out/huge/results.jsonl", "pixel"),
        ),
        Case(
            "truncated JPEG",
            [*run, "bundle", "cut.jpg", "--out", "out/cut"],
            "ok",
            setup_truncated_jpeg,
            failed_with("out/cut/results.jsonl", ""),
        ),
        Case("camera index that does not exist", [*run, "bundle", "7", "--out", "out/cam"], "refused"),
        # ---- results
        Case("--out is a file", [*run, "bundle", image, "--out", "tiny.toml"], "refused"),
        Case("--out path component over 255 bytes", [*run, "bundle", image, "--out", "out/" + "x" * 300], "refused"),
        Case(
            "full disk while writing results (file-size limit 2 KB)",
            [*run, "bundle", "dataset/*/test/*/*.png", "--out", "out/full", "--batch", "1"],
            "refused",
            lambda w: shutil.rmtree(w / "out" / "full", ignore_errors=True),
            complete_records("out/full/results.jsonl"),
            limit_file_size(2048),
        ),
        Case("second run into a busy --out", python_snippet(BUSY_OUT, "BUSY_OUT"), "ok"),
        # ---- training and export
        Case(
            "config list with wrong element types (layers = [1, 2])",
            [*TILECORE, "train", "badlayers.toml", "--out", "run-badlayers"],
            "refused",
            lambda w: (w / "badlayers.toml").write_text(
                TINY_CONFIG.format(root=w / "dataset").replace('["layer2", "layer3"]', "[1, 2]")
            ),
        ),
        Case(
            "coreset ratio that keeps one row",
            [*TILECORE, "train", "onerow.toml", "--out", "run-onerow"],
            "refused",
            lambda w: (w / "onerow.toml").write_text(TINY_CONFIG.format(root=w / "dataset") + "coreset_ratio = 1e-9\n"),
        ),
        Case(
            "training images all identical",
            [*TILECORE, "train", "dupes.toml", "--out", "run-dupes"],
            "refused",
            setup_duplicates,
        ),
        Case(
            "a config that failed, then the corrected one into the same --out",
            python_snippet(FAILED_THEN_FIXED, "FAILED_THEN_FIXED"),
            "ok",
            timeout=600,
        ),
        Case("export with the dataset folder moved away", python_snippet(EXPORT_MOVED, "EXPORT_MOVED"), "ok"),
        Case("export killed mid-way, then exported again", python_snippet(KILLED_EXPORT, "KILLED_EXPORT"), "ok"),
        # ---- results under interruption, the runtime under threads, engine caches
        Case("run killed mid-way, then --resume", python_snippet(KILLED_RUN, "KILLED_RUN"), "ok"),
        Case(
            "rerun into an --out that holds results, no --resume",
            [*run, "bundle", image, "--out", "out/again"],
            "refused",
            lambda w: run_once(w, image, "out/again"),
        ),
        Case("one Predictor shared by 4 threads (ONNX Runtime, OpenVINO)", python_snippet(THREADS, "THREADS"), "ok"),
        Case("OpenVINO compiled-model cache corrupted", python_snippet(OPENVINO_CACHE, "OPENVINO_CACHE"), "ok"),
    ]


def setup_duplicates(work: Path) -> None:
    folder = work / "dupes" / "gravel" / "train" / "good"
    shutil.rmtree(work / "dupes", ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(8):
        shutil.copy(test_image(work), folder / f"{i:03d}.png")
    (work / "dupes.toml").write_text(TINY_CONFIG.format(root=work / "dupes"))


def run_once(work: Path, image: str, out: str) -> None:
    shutil.rmtree(work / out, ignore_errors=True)
    subprocess.run([*TILECORE, "run", "bundle", image, "--out", out], cwd=work, check=True, capture_output=True)


def setup_mixed_folder(work: Path) -> None:
    folder = work / "mixed"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for i, path in enumerate(sorted((work / "dataset" / "gravel" / "test" / "good").glob("*.png"))[:2]):
        shutil.copy(path, folder / f"good{i}.png")
    data = test_image(work).read_bytes()
    with open(os.path.join(os.fsencode(folder), b"caf\xe9-\xff.png"), "wb") as f:
        f.write(data)
    (folder / "broken-link.png").symlink_to(folder / "nowhere.png")
    (folder / "folder.png").mkdir()
    (folder / "empty.png").write_bytes(b"")


def setup_truncated_jpeg(work: Path) -> None:
    import cv2

    rgb = cv2.imread(str(test_image(work)))
    ok, data = cv2.imencode(".jpg", rgb)
    (work / "cut.jpg").write_bytes(data.tobytes()[: len(data) // 2])


def kept_results(relative: str) -> Callable[[Path, Outcome], str]:
    def check(work: Path, outcome: Outcome) -> str:
        lines = lines_of(f"{relative}/results.jsonl")(work)
        summary = json.loads((work / relative / "summary.json").read_text())
        if len(lines) != 1 or not summary.get("completed"):
            return f"FAIL: earlier results changed ({len(lines)} lines, summary {summary})"
        return "the earlier results.jsonl and summary.json are untouched"

    return check


def failed_with(relative: str, word: str) -> Callable[[Path, Outcome], str]:
    def check(work: Path, outcome: Outcome) -> str:
        lines = lines_of(relative)(work)
        records = [json.loads(line) for line in lines]
        if len(records) != 1 or "error" not in records[0] or word not in records[0]["error"]:
            return f"FAIL: expected one error line mentioning {word!r}, got {lines}"
        return f"error line: {records[0]['error']}"

    return check


def complete_records(relative: str) -> Callable[[Path, Outcome], str]:
    def check(work: Path, outcome: Outcome) -> str:
        path = work / relative
        data = path.read_bytes() if path.is_file() else b""
        if data and not data.endswith(b"\n"):
            return f"FAIL: {relative} ends inside a record"
        try:
            n = len([json.loads(line) for line in data.decode().splitlines()])
        except json.JSONDecodeError:
            return f"FAIL: {relative} holds a line that is not JSON"
        return f"{relative}: {n} complete records, {len(data)} bytes"

    return check


BUSY_OUT = """
import fcntl, os, subprocess, sys
os.makedirs("out/busy", exist_ok=True)
lock = open("out/busy/.lock", "a")
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds --out
image = sorted(__import__("glob").glob("dataset/gravel/test/good/*.png"))[0]
proc = subprocess.run([sys.executable, "-m", "tilecore.cli", "run", "bundle", image, "--out", "out/busy"],
                      capture_output=True, text=True)
print(proc.stderr.strip().splitlines()[-1], file=sys.stderr)
sys.exit(0 if proc.returncode == 2 and "Traceback" not in proc.stderr else 1)
"""

EXPORT_MOVED = """
import os, shutil, subprocess, sys
shutil.rmtree("moved", ignore_errors=True)
shutil.copytree("run", "moved/run")
shutil.copytree("dataset", "moved/dataset")
os.rename("moved/dataset", "moved/dataset-away")
proc = subprocess.run([sys.executable, "-m", "tilecore.cli", "export", "moved/run", "--out", "moved/bundle"],
                      capture_output=True, text=True)
print((proc.stderr.strip().splitlines() or [""])[-1], file=sys.stderr)
sys.exit(proc.returncode)
"""


FAILED_THEN_FIXED = """
import shutil, subprocess, sys
shutil.rmtree("run-fixed", ignore_errors=True)
config = open("tiny.toml").read()
open("broken.toml", "w").write(config.replace('pretrained = false', 'pretrained = false\\nweights = "nope.pt"'))
cli = [sys.executable, "-m", "tilecore.cli", "train"]
first = subprocess.run([*cli, "broken.toml", "--out", "run-fixed"], capture_output=True, text=True)
second = subprocess.run([*cli, "tiny.toml", "--out", "run-fixed"], capture_output=True, text=True)
print(f"broken config: exit {first.returncode}; corrected config: exit {second.returncode}", file=sys.stderr)
sys.exit(0 if first.returncode == 2 and second.returncode == 0 else 1)
"""

KILLED_EXPORT = """
import glob, os, shutil, signal, subprocess, sys, time
shutil.rmtree("killed-bundle", ignore_errors=True)
cli = [sys.executable, "-m", "tilecore.cli", "export", "run", "--out", "killed-bundle"]
proc = subprocess.Popen(cli, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 120
while not glob.glob(".killed-bundle.*.partial") and time.monotonic() < deadline:
    time.sleep(0.05)
proc.send_signal(signal.SIGKILL)
proc.wait()
left = glob.glob(".killed-bundle.*")
again = subprocess.run(cli, capture_output=True, text=True)
after = glob.glob(".killed-bundle.*")
print(f"staging left by the kill: {len(left)}; after the next export: {len(after)}; exit {again.returncode}",
      file=sys.stderr)
sys.exit(0 if left and not after and again.returncode == 0 else 1)
"""

KILLED_RUN = """
import glob, json, os, shutil, signal, subprocess, sys, time
shutil.rmtree("out/killed", ignore_errors=True)
os.makedirs("many", exist_ok=True)
tests = sorted(glob.glob("dataset/gravel/test/*/*.png"))
for i in range(40):
    shutil.copy(tests[i % len(tests)], f"many/{i:03d}.png")
cli = [sys.executable, "-m", "tilecore.cli", "run", "bundle", "many", "--out", "out/killed", "--batch", "1"]
proc = subprocess.Popen(cli, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    path = "out/killed/results.jsonl"
    if os.path.exists(path) and open(path).read().count("\\n") >= 10:
        break
    time.sleep(0.02)
proc.send_signal(signal.SIGKILL)
proc.wait()
before = open("out/killed/results.jsonl").read().count("\\n")
completed = json.load(open("out/killed/summary.json"))["completed"]
again = subprocess.run([*cli, "--resume"], capture_output=True, text=True)
records = [json.loads(line) for line in open("out/killed/results.jsonl")]
names = sorted(r["input"] for r in records)
print(f"killed after {before} lines (summary completed={completed}); after --resume: {len(records)} lines, "
      f"{len(set(names))} distinct inputs of 40", file=sys.stderr)
sys.exit(0 if again.returncode == 0 and len(records) == 40 == len(set(names)) and not completed else 1)
"""

THREADS = """
import sys, glob
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.predictor import Predictor
images = [read_rgb(p) for p in sorted(glob.glob("dataset/gravel/*/*/*.png"))[:25]] * 8
worst = {}
for device in ("cpu", "openvino"):
    predictor = Predictor("bundle", device)
    alone = [predictor.predict(image).score for image in images]
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(lambda image: predictor.predict(image).score, images))
    worst[device] = float(np.max(np.abs(np.array(alone) - np.array(shared))))
print(f"{len(images)} images, 4 threads; largest score difference to one thread: {worst}", file=sys.stderr)
sys.exit(0 if all(v == 0.0 for v in worst.values()) else 1)
"""

OPENVINO_CACHE = """
import glob, os, sys
os.environ["XDG_CACHE_HOME"] = os.path.abspath("ov-cache")
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.predictor import Predictor
image = read_rgb(sorted(glob.glob("dataset/gravel/test/*/*.png"))[0])
fresh = Predictor("bundle", "openvino").predict(image).score
blobs = glob.glob("ov-cache/tilecore/openvino/*.blob")
for blob in blobs:
    data = bytearray(open(blob, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(blob, "wb").write(bytes(data))
again = Predictor("bundle", "openvino").predict(image).score
print(f"{len(blobs)} cached blob(s) corrupted; score {fresh:.6f} fresh, {again:.6f} after", file=sys.stderr)
sys.exit(0 if blobs and again == fresh else 1)
"""


def write_report(rows: list[dict], out: Path, machine: str) -> None:
    """out/reliability.json (every field) and out/reliability.md (the table, with how it was made)."""
    out.mkdir(parents=True, exist_ok=True)
    made = f"{time.strftime('%Y-%m-%d')}, {machine}, tilecore {tilecore_version()}"
    (out / "reliability.json").write_text(json.dumps({"machine": machine, "cases": rows}, indent=2) + "\n")
    lines = [
        "# Bad inputs and faults, tried",
        "",
        "What tilecore does when it is handed a bad input, a failing machine or a tampered bundle. Every row",
        "comes from `tools/reliability.py`, which builds its own small world (a synthetic dataset, a tiny",
        "random-init resnet18 run, a bundle, a signed bundle, two key pairs) and runs each case as a",
        'subprocess; rerun it with `.venv/bin/python tools/reliability.py --out docs/results`. "refused" means exit 2',
        "with one line on stderr and no traceback; commands run in the script's work folder.",
        "",
        f"Last run: {made}. {sum(r['as_expected'] for r in rows)} of {len(rows)} cases as expected.",
        "",
        "| case | command | expected | exit | what it said | as expected |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        said = row["message"] + (f" ({row['finding']})" if row["finding"] else "")
        said = said.replace("|", "\\|") + (" **traceback**" if row["traceback"] else "")
        command = row["command"] if len(row["command"]) <= 140 else row["command"][:137] + "..."
        lines.append(
            f"| {row['case']} | `{command}` | {row['expected']} | {row['exit']} | {said} | "
            f"{'yes' if row['as_expected'] else '**no**'} |"
        )
    (out / "reliability.md").write_text("\n".join(lines) + "\n")


def tilecore_version() -> str:
    import tilecore

    return tilecore.__version__


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tilecore-reliability"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for reliability.md and .json")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args()
    work = args.work.resolve()
    build_world(work)
    shutil.rmtree(work / "out", ignore_errors=True)  # every case writes into a fresh --out
    rows = []
    for case in cases(work):
        if args.only and args.only not in case.name:
            continue
        row = run_case(case, work)
        print(f"{'ok ' if row['as_expected'] else 'NO '} {row['case']}: exit {row['exit']}, {row['message']}")
        rows.append(row)
    write_report(rows, args.out, f"{os.cpu_count()} cores, {cpu_model()}")
    bad = [r["case"] for r in rows if not r["as_expected"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} cases as expected" + (f"; not: {bad}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
