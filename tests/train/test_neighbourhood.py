"""Neighbourhood-aware tile banks, the top3 image score, and post-processing changes that keep a run's banks.

One tiny 3 x 3 tiled run (ENS9's geometry at 64 px, tests/tiny.py) is retrained in its own folder with
tiling.neighbourhood = 1: the banks stay, the calibration is redone, and the exported bundle matches PyTorch."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_refusal, run_cli_here, toml_text
from tests.export.test_bundle import pytorch_and_runtime
from tests.tiny import tiny_run
from tilecore.export.bundle import export_run
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import BankScorer
from tilecore.runtime.merge import IMAGE_SCORE_REDUCERS, MergeRule, TileOutputs, merge_tiles, score_locations
from tilecore.runtime.tiling import tile_grid
from tilecore.train.config import config_from_dict
from tilecore.train.ensemble import bank_path, load_bank, load_category_model, neighbourhood_locations, search_banks
from tilecore.train.fit import train_run
from tilecore.train.model import load_embedder
from tilecore.train.run_dir import CONFIG_FILE, changed_keys, load_run_config

ENS9_AT_64 = {"tile_size": [32], "stride": [16]}  # 3 x 3 overlapping tiles, one bank per location
CATEGORY = "brick"  # the category tests.export.test_bundle.pytorch_and_runtime reads


def grid_3x3():
    return tile_grid((64, 64), (32, 32), (16, 16))


def test_neighbourhood_locations_on_a_3x3_grid() -> None:
    grid = grid_3x3()
    assert neighbourhood_locations(grid, 0) == [[i] for i in range(9)]
    around = neighbourhood_locations(grid, 1)
    assert [len(n) for n in around] == [4, 6, 4, 6, 9, 6, 4, 6, 4]  # corners 4, edges 6, centre 9
    assert around[0] == [0, 1, 3, 4] and around[1] == [0, 1, 2, 3, 4, 5] and around[8] == [4, 5, 7, 8]
    assert neighbourhood_locations(grid, 2) == [list(range(9))] * 9
    assert neighbourhood_locations(grid, 100) == [list(range(9))] * 9


def test_top3_image_score() -> None:
    scores = np.array([[1.0, 5.0, 3.0, 4.0], [2.0, 2.0, 9.0, 0.0]], dtype=np.float32)  # [B=2, T=4]
    assert np.allclose(IMAGE_SCORE_REDUCERS["top3"](scores), [(5 + 4 + 3) / 3, (9 + 2 + 2) / 3])
    assert np.allclose(IMAGE_SCORE_REDUCERS["top3"](scores[:, :2]), [3.0, 2.0])  # fewer tiles: mean of all
    grid = tile_grid((64, 64), (32, 32), (32, 32))  # 2 x 2 tiles
    outputs = TileOutputs(scores, np.zeros((2, 4, 32, 32), dtype=np.float32))
    merged, maps = merge_tiles(outputs, grid, MergeRule(image_score="top3"))
    assert np.allclose(merged, [4.0, 13 / 3]) and maps.shape == (2, 64, 64)
    assert np.allclose(merge_tiles(outputs, grid, MergeRule(image_score="max"))[0], [5.0, 9.0])
    with pytest.raises(TilecoreError, match="image_score 'top4': expected one of mean, max, top3"):
        MergeRule(image_score="top4")


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 3 x 3 run with each location's own bank (neighbourhood 0)."""
    return tiny_run(tmp_path_factory.mktemp("neighbourhood"), CATEGORY, ENS9_AT_64)


def bank_files(run: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.glob("*/banks/*.safetensors"))}


def with_tiling(run: Path, **tiling) -> dict:
    raw = json.loads((run / CONFIG_FILE).read_text())
    raw["tiling"].update(tiling)
    return raw


@pytest.fixture(scope="module")
def neighbour_run(own_run: Path) -> Path:
    """A copy of own_run retrained in place with neighbourhood 1: banks reused, calibration redone."""
    run = own_run.parent / "neighbour"
    shutil.copytree(own_run, run, copy_function=shutil.copy2)  # mtimes kept, so "unchanged" can be checked
    before = bank_files(run)
    train_run(config_from_dict(with_tiling(run, neighbourhood=1)), run)
    assert bank_files(run) == before  # not one bank refit or rewritten
    return run


def model_for(run: Path):
    config = load_run_config(run)
    embedders = [load_embedder(config, run, i) for i in range(len(config.members))]
    return load_category_model(config, run, CATEGORY, embedders)


def images_of(run: Path) -> list[np.ndarray]:
    from tilecore.runtime.image_io import read_rgb
    from tilecore.train.run_images import VALIDATION, kept_images

    return [read_rgb(p) for p in kept_images(run, CATEGORY, VALIDATION)]


def test_neighbourhood_0_scores_each_location_against_its_own_bank(own_run: Path) -> None:
    config = load_run_config(own_run)
    assert config.tiling.neighbourhood == 0
    grid = grid_3x3()
    served = search_banks(config, own_run, CATEGORY, 0)
    assert [(name, locations) for name, locations, _ in served] == [
        (f"t{r}_{c}", [i]) for i, (r, c) in enumerate(grid.locations())
    ]
    for name, _, bank in served:
        assert np.array_equal(bank, load_bank(bank_path(own_run, CATEGORY, 0, name)))
    model = model_for(own_run)
    images = images_of(own_run)
    (outputs,) = model.raw_outputs(images)
    own = [BankScorer.from_bank(load_bank(bank_path(own_run, CATEGORY, 0, name))) for name, _, _ in served]
    embedder = model.embedders[0]
    normalised = embedder.normalise(images)
    reference = score_locations(lambda locs: embedder.embed_normalised(normalised, locs), own, grid, 4.0, 9)
    assert np.array_equal(outputs.scores, reference.scores) and np.array_equal(outputs.maps, reference.maps)


def test_retrain_with_a_neighbourhood_reuses_the_banks_and_recalibrates(
    own_run: Path, neighbour_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_run_config(neighbour_run)
    assert config.tiling.neighbourhood == 1
    metadata = json.loads((neighbour_run / "metadata.json").read_text())
    assert metadata["tiling"]["neighbourhood"] == 1 and metadata["resumed"] is True
    old = json.loads((own_run / CATEGORY / "calibration.json").read_text())
    new = json.loads((neighbour_run / CATEGORY / "calibration.json").read_text())
    assert new["members"] != old["members"]  # per-location statistics measured with the union banks
    # each location searches the union of its neighbours' banks, in location order
    served = {tuple(locations): bank for _, locations, bank in search_banks(config, neighbour_run, CATEGORY, 0)}
    assert len(served) == 9
    corner = [load_bank(bank_path(neighbour_run, CATEGORY, 0, s)) for s in ("t0_0", "t0_1", "t1_0", "t1_1")]
    assert np.array_equal(served[(0,)], np.concatenate(corner))
    # a superset bank can only bring each patch's nearest neighbour closer, and here it does for some tiles
    images = images_of(own_run)
    (own,) = model_for(own_run).raw_outputs(images)
    (union,) = model_for(neighbour_run).raw_outputs(images)
    assert np.all(union.scores <= own.scores + 1e-5) and np.any(union.scores < own.scores - 1e-4)
    assert not np.allclose(model_for(neighbour_run).predict(images)[0], model_for(own_run).predict(images)[0])
    # a second change of post-processing keys alone says so in one line and keeps the banks again
    before = bank_files(neighbour_run)
    with caplog.at_level(logging.INFO, logger="tilecore"):
        train_run(config_from_dict(with_tiling(neighbour_run, image_score="top3")), neighbour_run)
    lines = [r.getMessage() for r in caplog.records if "post-processing keys changed" in r.getMessage()]
    assert len(lines) == 1 and "(tiling.image_score)" in lines[0] and "reusing its 9 bank(s)" in lines[0], lines
    assert bank_files(neighbour_run) == before
    assert json.loads((neighbour_run / CATEGORY / "calibration.json").read_text()) != new
    train_run(config_from_dict(with_tiling(neighbour_run, image_score="mean")), neighbour_run)  # back to as it was
    assert json.loads((neighbour_run / CATEGORY / "calibration.json").read_text()) == new


def test_exported_neighbourhood_run_matches_pytorch(neighbour_run: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    manifest = export_run(neighbour_run, bundle)
    (member,) = manifest.members
    assert member.banks[0] == "bank_m0_r0-1_c0-1.faiss" and len(set(member.banks)) == 9
    rows = {r.file: r.rows for r in member.indexes}
    own_rows = [len(load_bank(bank_path(neighbour_run, CATEGORY, 0, f"t{r}_{c}"))) for r, c in grid_3x3().locations()]
    assert rows["bank_m0_r0-2_c0-2.faiss"] == sum(own_rows)  # the centre searches every location's bank
    labels, torch_scores, torch_maps, runtime_scores, runtime_maps = pytorch_and_runtime(
        neighbour_run, bundle, neighbour_run.parent / "data"
    )
    score_range = torch_scores.max() - torch_scores.min()
    assert score_range > 0
    assert np.abs(runtime_scores - torch_scores).max() <= 1e-4 * score_range
    assert np.abs(runtime_maps - torch_maps).max() <= 1e-4 * (torch_maps.max() - torch_maps.min())


def test_a_bank_defining_change_is_still_refused_and_names_the_key(own_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(own_run, run)
    before = bank_files(run)
    raw = json.loads((run / CONFIG_FILE).read_text())
    raw["members"][0]["coreset_ratio"] = 0.2
    raw["tiling"]["image_score"] = "max"
    (tmp_path / "changed.toml").write_text(toml_text(raw))
    proc = run_cli_here("train", tmp_path / "changed.toml", "--out", run)
    line = assert_one_line_refusal(proc, r"different config and 9 finished bank.*: .*members\[0\]\.coreset_ratio")
    assert "image_score" not in line  # a post-processing key is not what blocks the run
    with pytest.raises(TilecoreError, match=r"bank-defining keys changed: tiling\.stride\)"):
        train_run(config_from_dict(with_tiling(run, stride=[32])), run)
    assert bank_files(run) == before and (run / CATEGORY / "calibration.json").is_file()


@pytest.mark.parametrize(
    ("old", "new", "banks", "post"),
    [
        ({"preset": "ENS9"}, {"preset": "ENS9N"}, [], ["tiling.neighbourhood", "tiling.preset"]),
        ({"preset": "ENS9"}, {"preset": "ENS9", "image_score": "top3"}, [], ["tiling.image_score"]),
        (
            {"preset": "ENS9"},
            {"tile_size": [256], "stride": [128], "input_size": [256]},  # the same tiles, spelled out
            [],
            ["tiling.preset", "tiling.tile_size", "tiling.stride", "tiling.input_size"],
        ),
        ({"preset": "ENS9"}, {"preset": "ST9"}, ["tiling.preset"], []),
        ({"preset": "ENS9"}, {"preset": "ENS4", "blur_sigma": 2.0}, ["tiling.preset"], ["tiling.blur_sigma"]),
    ],
)
def test_changed_keys_sorts_bank_keys_from_post_processing(old: dict, new: dict, banks: list, post: list) -> None:
    a = config_from_dict({"data": {"image_size": 512}, "tiling": old})
    b = config_from_dict({"data": {"image_size": 512}, "tiling": new})
    assert changed_keys(a, b) == (banks, post)


def test_changed_keys_in_other_tables() -> None:
    base = config_from_dict({})
    changed = config_from_dict(
        {
            "members": [{"coreset_ratio": 0.2, "num_neighbours": 3}],
            "fusion": {"quantile": 0.9},
            "cascade": {"mode": "off"},
            "train": {"seed": 1},
        }
    )
    assert changed_keys(base, changed) == (
        ["members[0].coreset_ratio", "train.seed"],
        ["members[0].num_neighbours", "fusion.quantile", "cascade.mode"],
    )
    assert changed_keys(base, config_from_dict({"members": [{}, {}]}))[0] == ["members (their number)"]
