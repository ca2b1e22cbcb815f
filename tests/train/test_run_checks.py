"""What `tilecore train` refuses before any bank is written, and what a run keeps so that export needs
nothing else: config lists, duplicated or spread-less data, too-small coresets, a failed run's folder, the
kept validation/calibration images, and the staging folders of killed exports."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_refusal, describe, run_cli, run_cli_here, toml_text
from tests.tiny import tiny_run
from tilecore.runtime.calibration import NormalStats
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb, write_png
from tilecore.runtime.preprocess import Preprocess, normalise_rgb
from tilecore.train.config import TABLES, MemberConfig, config_from_dict, element_type
from tilecore.train.data_checks import MIN_BANK_ROWS, check_bank_size, check_spread
from tilecore.train.run_dir import CONFIG_FILE, prepare_run_dir, run_categories
from tilecore.train.run_images import CALIBRATION, CALIBRATION_TILES, VALIDATION, kept_images

MEMBER = {
    "backbone": "resnet18",
    "layers": ["layer2", "layer3"],
    "pretrained": False,
    "pretrain_embed_dimension": 32,
    "target_embed_dimension": 16,
}


def noise(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_dataset(root: Path, images: list[np.ndarray], category: str = "widget") -> Path:
    """An MVTec-layout dataset with `images` as the normal training images of one category."""
    for i, image in enumerate(images):
        write_png(root / category / "train" / "good" / f"{i:03d}.png", image)
    write_png(root / category / "test" / "good" / "000.png", noise(999))
    return root


def raw_config(root: Path, **member: object) -> dict:
    return {"data": {"root": str(root), "image_size": 64, "val_fraction": 0.25}, "members": [{**MEMBER, **member}]}


def train(root: Path, out: Path, **member: object) -> dict:
    from tilecore.train.fit import train_run

    return train_run(config_from_dict(raw_config(root, **member)), out)


def split_names(root: Path, category: str = "widget") -> tuple[list[str], list[str]]:
    """(training, validation) file names the run's split takes from `root` (seeded, so known in advance)."""
    from tilecore.train.data import load_category

    data = load_category(root, category, "mvtec", 0.25, 0)
    return [s.image.name for s in data.train], [s.image.name for s in data.validation]


# ---------------------------------------------------------------------------------------------------------
# config lists


def list_keys() -> list[tuple[str, str, type]]:
    """(section, key, element type) of every list-typed key a config has."""
    tables = {**TABLES, "members": MemberConfig}
    return [
        (section, f.name, element_type(cls, f.name))
        for section, cls in tables.items()
        for f in fields(cls)
        if element_type(cls, f.name) is not None
    ]


def test_every_list_key_is_found() -> None:
    found = {(section, key) for section, key, _ in list_keys()}
    assert {("data", "categories"), ("members", "layers"), ("members", "mean"), ("tiling", "tile_size")} <= found
    assert len(found) == 8  # + cascade.order


@pytest.mark.parametrize(("section", "key", "element"), list_keys(), ids=lambda v: getattr(v, "__name__", v))
def test_list_elements_of_the_wrong_type_name_the_key(section: str, key: str, element: type) -> None:
    wrong = 3 if element is str else "x"
    value = [wrong] if element is str else [1, wrong, 1]
    table = [{key: value}] if section == "members" else {key: value}
    shown = {str: "strings", int: "integers", float: "numbers"}[element]
    index = 0 if element is str else 1
    with pytest.raises(TilecoreError, match=rf"{section}\.{key}\[{index}\]: got .* expected a list of {shown}"):
        config_from_dict({section: table})


def test_list_elements_bool_is_not_a_number_and_ints_widen() -> None:
    with pytest.raises(TilecoreError, match=r"members\.std\[2\]: got boolean True, expected a list of numbers"):
        config_from_dict({"members": [{"std": [1, 1, True]}]})
    with pytest.raises(TilecoreError, match=r"tiling\.tile_size\[0\]: got number 1\.5, expected a list of integers"):
        config_from_dict({"tiling": {"tile_size": [1.5]}})
    assert config_from_dict({"members": [{"mean": [0, 1, 0]}]}).members[0].mean == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("categories", [["a", "a"], [".."], ["a/b"], [""]])
def test_categories_are_distinct_folder_names(categories: list[str]) -> None:
    with pytest.raises(TilecoreError, match="data.categories .*expected distinct folder names"):
        config_from_dict({"data": {"categories": categories}})


# ---------------------------------------------------------------------------------------------------------
# degenerate data and coresets: refused before the run folder exists


def test_duplicated_training_images_are_refused_before_any_bank(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", [noise(i % 2) for i in range(10)])  # 10 files, 2 distinct images
    with pytest.raises(TilecoreError, match=r"category widget: 8 training images hold only 2 distinct .*at least 4"):
        train(root, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_copy_saved_in_another_format_is_a_duplicate(tmp_path: Path) -> None:
    """Decoded pixels decide, not file bytes: a BMP copy of a PNG is the same image."""
    import cv2

    from tilecore.train.data_checks import ImageCensus

    write_png(tmp_path / "a.png", noise(0))
    cv2.imwrite(str(tmp_path / "a.bmp"), cv2.cvtColor(noise(0), cv2.COLOR_RGB2BGR))
    write_png(tmp_path / "b.png", noise(1))
    census = ImageCensus.of([tmp_path / "a.png", tmp_path / "a.bmp", tmp_path / "b.png", tmp_path / "gone.png"])
    assert len(census.readable) == 3 and census.distinct == 2


def test_identical_validation_images_are_refused_before_any_bank(tmp_path: Path) -> None:
    """Every validation image the same: calibration's spread would be zero."""
    root = make_dataset(tmp_path / "data", [noise(i) for i in range(8)])
    _, validation = split_names(root)
    for name in validation:
        write_png(root / "widget" / "train" / "good" / name, noise(100))
    with pytest.raises(TilecoreError, match=r"2 readable validation images hold 1 distinct .*calibration needs 2"):
        train(root, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_validation_copies_of_training_images_are_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", [noise(i) for i in range(8)])
    training, validation = split_names(root)
    folder = root / "widget" / "train" / "good"
    for name, source in zip(validation, training, strict=False):
        shutil.copy(folder / source, folder / name)
    with pytest.raises(TilecoreError, match="hold 0 distinct image.* not also training images"):
        train(root, tmp_path / "run")


def test_coreset_leaving_too_few_rows_is_refused_before_any_bank(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", [noise(i) for i in range(8)])
    # 6 training images x 1 location x 8 x 8 patches (resnet18 layer2 at 64 px) = 384 patches
    expected = r"members\[0\]\.coreset_ratio 0\.001 keeps 1 of 384 patches .*expected at least 10 rows: raise it"
    with pytest.raises(TilecoreError, match=expected):
        train(root, tmp_path / "run", coreset_ratio=0.001)
    assert not (tmp_path / "run").exists()


def test_too_few_patches_for_any_coreset(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", [noise(i) for i in range(3)])
    raw = raw_config(root, layers=["layer3"], coreset_ratio=1.0)  # 2 x 2 patches per image at 32 px
    raw["data"].update(image_size=32, val_fraction=0.5)  # 1 training image, 2 validation images
    from tilecore.train.fit import train_run

    with pytest.raises(TilecoreError, match=r"keeps 4 of 4 patches .*at least 10 rows: add training images"):
        train_run(config_from_dict(raw), tmp_path / "run")


def test_bank_size_rule() -> None:
    assert check_bank_size(0, 0.1, 1, 6, 1, (4, 4)) == MIN_BANK_ROWS  # the tiny test run: 96 patches, 10 rows
    with pytest.raises(TilecoreError, match=r"keeps 10 of 96 patches .*expected at least 16 rows: raise it to .*0\.17"):
        check_bank_size(0, 0.1, 16, 6, 1, (4, 4))  # the reweighted rule looks up 16 neighbours
    with pytest.raises(TilecoreError, match=r"members\[2\]\.coreset_ratio 0\.0001 keeps 1 of 6144 patches"):
        check_bank_size(2, 0.0001, 1, 6, 1, (32, 32))


def test_zero_spread_at_calibration_is_refused() -> None:
    same = NormalStats(image_mean=2.5, image_std=0.0, pixel_mean=1.0, pixel_std=0.3)
    with pytest.raises(TilecoreError, match=r"member 0: every validation image gives the same image score \(2\.5\)"):
        check_spread(same, "category x member 0", "mean")
    check_spread(same, "category x member 0", "geometric")  # ratios to the mean need no spread
    zero = NormalStats(image_mean=0.0, image_std=0.0, pixel_mean=0.0, pixel_std=0.0)
    with pytest.raises(TilecoreError, match="a mean of zero"):
        check_spread(zero, "category x member 0", "geometric")
    with pytest.raises(TilecoreError, match="pixel score"):
        check_spread(NormalStats(2.5, 0.1, 1.0, 0.0), "category x member 0", "max")
    check_spread(NormalStats(2.5, 0.1, 1.0, 0.3), "category x member 0", "mean")


# ---------------------------------------------------------------------------------------------------------
# a run folder that failed early never blocks the corrected config


def test_failed_run_does_not_block_the_corrected_config(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", [noise(i) for i in range(8)])
    out = tmp_path / "run"
    with pytest.raises(TilecoreError, match="weights .*missing.safetensors: file not found"):
        train(root, out, weights=str(tmp_path / "missing.safetensors"))
    assert (out / CONFIG_FILE).is_file()  # it failed after the run folder was made
    metadata = train(root, out)  # corrected: no weights file
    assert metadata["resumed"] is False and metadata["categories"]["widget"]["bank_sizes"] == [39]
    assert json.loads((out / CONFIG_FILE).read_text())["members"][0]["weights"] == ""
    with pytest.raises(TilecoreError, match="different config and 1 finished bank"):
        train(root, out, coreset_ratio=0.2)  # once a bank exists, the refusal stays


def test_unfinished_run_is_replaced_but_what_tilecore_did_not_write_stays(tmp_path: Path) -> None:
    out = tmp_path / "run"
    prepare_run_dir(out, config_from_dict(raw_config(tmp_path)))
    for name in ("members/m0.safetensors", "metadata.json", "widget/split.json", "widget/kept/validation/0000.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / "widget" / "banks").mkdir()
    (out / "widget" / "banks" / ".m0_t0_0.safetensors.abc.tmp").write_text("half")  # a killed first bank
    (out / "notes.txt").write_text("mine")
    assert prepare_run_dir(out, config_from_dict(raw_config(tmp_path, coreset_ratio=0.5))) is False
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["config.json", "notes.txt"]
    assert json.loads((out / CONFIG_FILE).read_text())["members"][0]["coreset_ratio"] == 0.5


def test_a_folder_with_someone_elses_config_json_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "app"
    (out / "members").mkdir(parents=True)
    files = {"config.json": '{"name": "my app"}', "metrics.json": "{}", "members/notes.txt": "mine"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(TilecoreError, match=r"folder exists and is not a tilecore run"):
        prepare_run_dir(out, config_from_dict(raw_config(tmp_path)))
    assert {name: (out / name).read_text() for name in files} == files


def test_replacing_an_unfinished_run_keeps_the_users_files_in_members(tmp_path: Path) -> None:
    out = tmp_path / "run"
    prepare_run_dir(out, config_from_dict(raw_config(tmp_path)))
    (out / "members").mkdir()
    (out / "members" / "m0.safetensors").write_text("x")
    (out / "members" / "notes.txt").write_text("mine")
    prepare_run_dir(out, config_from_dict(raw_config(tmp_path, coreset_ratio=0.5)))
    assert sorted(p.name for p in (out / "members").iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------------------
# the CLI: exit 2, one line, no traceback


CLI_CASES = {
    "layers": (
        {"members": [{**MEMBER, "layers": [1, 2]}]},
        "members.layers[0]: got integer 1, expected a list of strings",
    ),
    "categories": ({"data": {"categories": [3]}}, "data.categories[0]: got integer 3, expected a list of strings"),
    "coreset": ({"members": [{**MEMBER, "coreset_ratio": 0.0001}]}, "members[0].coreset_ratio 0.0001 keeps 1 of 384"),
    "duplicates": ({"members": [MEMBER]}, "training images hold only 2 distinct"),
    "weights": ({"members": [MEMBER]}, "missing.safetensors: file not found"),
}


# refused before any backbone loads: real subprocesses; the others go through the same entry point in this
# process (run_cli_here), which pays no torch import
IN_SUBPROCESS = ("layers", "categories")


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every refused CLI case (the subprocesses at once), then the corrected `weights` run."""
    work = tmp_path_factory.mktemp("cli")
    make_dataset(work / "data", [noise(i) for i in range(8)])
    make_dataset(work / "dups", [noise(i % 2) for i in range(10)])
    jobs = {}
    for case, (raw, _) in CLI_CASES.items():
        raw = {"data": {"image_size": 64, "val_fraction": 0.25}, **raw}
        raw["data"] = {"image_size": 64, "val_fraction": 0.25, **raw["data"]}
        (work / f"{case}.toml").write_text(toml_text(raw))
        data = "dups" if case == "duplicates" else "data"
        extra = ["--weights", "missing.safetensors"] if case == "weights" else []
        jobs[case] = ["train", f"{case}.toml", "--data", data, "--out", f"runs/{case}", *extra]
    with ThreadPoolExecutor(len(IN_SUBPROCESS)) as pool:
        futures = {case: pool.submit(run_cli, *jobs[case], cwd=work) for case in IN_SUBPROCESS}
        results = {case: run_cli_here(*args, cwd=work) for case, args in jobs.items() if case not in IN_SUBPROCESS}
        results |= {case: future.result() for case, future in futures.items()}
    results["corrected"] = run_cli_here("train", "weights.toml", "--data", "data", "--out", "runs/weights", cwd=work)
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refusals_are_one_line(cli_runs: dict, case: str) -> None:
    assert_one_line_refusal(cli_runs[case], re.escape(CLI_CASES[case][1]))
    assert not cli_runs[case].stdout.strip(), describe(cli_runs[case])  # the one line is all the output


def test_cli_corrected_config_takes_the_out_of_a_failed_run(cli_runs: dict) -> None:
    proc = cli_runs["corrected"]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "replacing an unfinished run (no bank written) with a different config" in " ".join(proc.stderr.split())


# ---------------------------------------------------------------------------------------------------------
# export needs only the run directory


@pytest.fixture(scope="module")
def moved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run exported with its dataset in place, then its dataset moved away and exported again."""
    from tilecore.export.bundle import export_run

    root = tmp_path_factory.mktemp("moved")
    run = tiny_run(root)
    paths = {"root": root, "run": run}
    for kind in ("flat", "hnsw"):
        export_run(run, root / f"present_{kind}", index_kind=kind)
    (root / "data").rename(root / "elsewhere")
    for kind in ("flat", "hnsw"):
        export_run(run, root / f"moved_{kind}", index_kind=kind)
    return paths


def dataset_path(paths: dict[str, Path], path: str) -> Path:
    """Where a dataset file the run's split names lies now."""
    return paths["root"] / "elsewhere" / Path(path).relative_to(paths["root"] / "data")


def test_export_without_the_dataset_scores_as_with_it(moved: dict[str, Path]) -> None:
    from tilecore.runtime.manifest import read_manifest
    from tilecore.runtime.predictor import Predictor

    root = moved["root"]
    images = [read_rgb(p) for p in sorted((root / "elsewhere" / "gravel" / "test").glob("*/*.png"))]
    for kind in ("flat", "hnsw"):
        scores = [
            [r.score for r in Predictor(root / f"{where}_{kind}", device="cpu").predict_batch(images)]
            for where in ("present", "moved")
        ]
        assert scores[0] == scores[1] and len(set(scores[0])) > 1
    members = [read_manifest(root / f"{where}_hnsw").members[0] for where in ("present", "moved")]
    recalls = [[r.recall_at_1 for r in member.indexes] for member in members]
    assert recalls[0] == recalls[1] and len(recalls[0]) == 4  # validation queries of every bank, from the run


def test_kept_images_give_the_dataset_images_tensors(moved: dict[str, Path]) -> None:
    from tilecore.export.quantize import calibration_tiles
    from tilecore.export.reduced_precision import CALIBRATION_TILES as EXPORT_CALIBRATION_TILES
    from tilecore.train.model import load_embedder
    from tilecore.train.run_dir import load_run_config

    run = moved["run"]
    split = json.loads((run / "gravel" / "split.json").read_text())
    validation = kept_images(run, "gravel", VALIDATION)
    assert [Path(p).parent for p in validation] == [run / "gravel" / "kept" / "validation"] * 2
    spec = Preprocess(64, 64, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    for kept, original in zip(validation, split["validation"], strict=True):
        np.testing.assert_array_equal(
            normalise_rgb(read_rgb(kept), spec), normalise_rgb(read_rgb(dataset_path(moved, original)), spec)
        )
    assert EXPORT_CALIBRATION_TILES == CALIBRATION_TILES
    embedder = load_embedder(load_run_config(run), run, 0)
    args = (embedder.preprocess, embedder.grid, embedder.input_hw, CALIBRATION_TILES)
    originals = [dataset_path(moved, p) for p in split["train"]]
    np.testing.assert_array_equal(
        calibration_tiles(kept_images(run, "gravel", CALIBRATION), *args), calibration_tiles(originals, *args)
    )


def test_int8_export_without_the_dataset(moved: dict[str, Path]) -> None:
    from tilecore.export.bundle import export_run
    from tilecore.runtime.manifest import read_manifest
    from tilecore.runtime.predictor import Predictor

    root, run = moved["root"], moved["run"]
    export_run(run, root / "moved_int8", precisions=("int8",), precision_floor=0.0)
    (graph,) = read_manifest(root / "moved_int8").reduced_precision.int8.values()
    split = json.loads((run / "gravel" / "split.json").read_text())
    images = [read_rgb(dataset_path(moved, p)) for p in split["validation"]]  # the dataset's own files
    fp32 = np.array([r.score for r in Predictor(root / "moved_int8", device="cpu").predict_batch(images)])
    int8 = Predictor(root / "moved_int8", device=graph.validation.backend, precision="int8")
    int8_scores = np.array([r.score for r in int8.predict_batch(images)])
    assert np.abs(int8_scores - fp32).max() == pytest.approx(graph.validation.max_score_diff, abs=1e-5)


def test_old_run_falls_back_to_the_dataset_and_says_when_it_is_gone(moved: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(moved["run"], old)
    (old / "gravel" / "kept.json").unlink()
    shutil.rmtree(old / "gravel" / "kept")
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["category_names"]
    (old / "metadata.json").write_text(json.dumps(metadata))
    config = config_from_dict(json.loads((old / "config.json").read_text()))
    assert run_categories(old, config) == ["gravel"]  # from the category folders, not the dataset
    with pytest.raises(TilecoreError, match=r"gravel keeps no validation images .*dataset image .*002\.png is gone"):
        kept_images(old, "gravel", VALIDATION)
    split = json.loads((old / "gravel" / "split.json").read_text())
    (old / "gravel" / "split.json").write_text(
        json.dumps({k: [str(dataset_path(moved, p)) for p in v] for k, v in split.items()})
    )
    assert len(kept_images(old, "gravel", CALIBRATION)) == 6  # every training image, as before


# ---------------------------------------------------------------------------------------------------------
# staging folders of killed exports


def test_stale_staging_folders_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    from tilecore.export.staging import UNLOCKED_MAX_AGE_S, remove_stale_staging

    def staging(name: str, lock: bool = True) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        if lock:
            (tmp_path / f"{name}.lock").write_text("")
        return tmp_path / name

    dead = staging(".b.abcd1234.partial")
    alive = staging(".b.efgh5678.partial")
    other = staging(".b.c.abcd1234.partial")  # the bundle `b.c`, not `b`
    old = staging(".b.old_1234.partial", lock=False)  # an earlier tilecore's, left an hour ago
    recent = staging(".b.new_1234.partial", lock=False)
    os.utime(old, (time.time() - UNLOCKED_MAX_AGE_S - 60,) * 2)
    holder = os.open(tmp_path / f"{alive.name}.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a running export holds its lock
    try:
        assert remove_stale_staging(tmp_path / "b") == [dead, old]
    finally:
        os.close(holder)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([alive.name, f"{alive.name}.lock", other.name, f"{other.name}.lock", recent.name])


KILLABLE_EXPORT = """
import sys, time
from pathlib import Path
import tilecore.export.bundle as bundle
original = bundle.export_member_banks
def slow(*args, **kwargs):
    result = original(*args, **kwargs)
    print("staged", flush=True)
    time.sleep(120)
    return result
bundle.export_member_banks = slow
bundle.export_run(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_killed_export_leaves_nothing_after_the_next_export(moved: dict[str, Path], tmp_path: Path) -> None:
    from tilecore.export.bundle import export_run
    from tilecore.export.staging import remove_stale_staging

    out = tmp_path / "bundle"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_EXPORT, str(moved["run"]), str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "staged"
        staged = [p.name for p in tmp_path.iterdir()]
        assert len(staged) == 2 and any(n.endswith(".partial") for n in staged), staged
        assert remove_stale_staging(out) == []  # that export is still running: its folder stays
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list(tmp_path.iterdir())) == 2  # what the killed export left
    export_run(moved["run"], out)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
