from pathlib import Path

import pytest

from tilecore.runtime.errors import TilecoreError
from tilecore.train.config import Config, config_from_dict, load_config, tiling_geometry


def test_defaults_are_the_embedded_main_job() -> None:
    config = load_config(None)
    assert [m.backbone for m in config.members] == ["tf_efficientnet_lite0"]
    assert config.data.image_size == 256
    assert tiling_geometry(config) == ((256, 256), (256, 256), (256, 256), False)


def test_toml_members_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[[members]]\nbackbone = "resnet18"\nlayers = ["layer2", "layer3"]\ncoreset_ratio = 1\n'
        '[[members]]\nbackbone = "densenet121"\nlayers = ["features.denseblock2"]\n'
        '[fusion]\nrule = "geometric"\n'
    )
    config = load_config(path)
    assert [m.backbone for m in config.members] == ["resnet18", "densenet121"]
    assert config.members[0].coreset_ratio == 1.0
    assert config_from_dict(config.to_dict()) == config
    assert config.data == Config().data


@pytest.mark.parametrize(
    ("size", "preset", "expected"),
    [
        (512, "SM256", ((512, 512), (512, 512), (256, 256), False)),
        (512, "SM512", ((512, 512), (512, 512), (512, 512), False)),
        (512, "ST4", ((256, 256), (256, 256), (256, 256), True)),
        (512, "ST9", ((256, 256), (128, 128), (256, 256), True)),
        (512, "ENS4", ((256, 256), (256, 256), (256, 256), False)),
        (512, "ENS9", ((256, 256), (128, 128), (256, 256), False)),
        (512, "ENS9N", ((256, 256), (128, 128), (256, 256), False)),
        (1024, "ENS9", ((512, 512), (256, 256), (512, 512), False)),
        (2048, "SM256", ((2048, 2048), (2048, 2048), (1024, 1024), False)),
    ],
)
def test_presets_scale_with_the_image(size: int, preset: str, expected: tuple) -> None:
    config = config_from_dict({"data": {"image_size": size}, "tiling": {"preset": preset}})
    assert tiling_geometry(config) == expected


@pytest.mark.parametrize(
    ("tiling", "expected"),
    [
        ({}, 0),
        ({"preset": "ENS9"}, 0),
        ({"preset": "ENS9N"}, 1),
        ({"preset": "ENS9N", "neighbourhood": 2}, 2),  # a key the config sets wins over the preset's
        ({"preset": "ENS9N", "neighbourhood": 0}, 0),
        ({"tile_size": [128], "stride": [64], "neighbourhood": 3}, 3),
    ],
)
def test_neighbourhood_from_the_preset_unless_set(tiling: dict, expected: int) -> None:
    config = config_from_dict({"tiling": tiling})
    assert config.tiling.neighbourhood == expected
    assert config_from_dict(config.to_dict()) == config  # what a run folder stores reads back the same


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"members": [{"colour": 1}]}, "unknown key members.colour; allowed: backbone"),
        ({"model": {}}, r"unknown section \[model\] \(members are \[\[members\]\] tables\)"),
        ({"members": [{"coreset_ratio": "big"}]}, "members.coreset_ratio: got string 'big', expected number"),
        ({"members": [{"pretrained": 1}]}, "members.pretrained: got integer 1, expected boolean"),
        ({"data": {"format": "coco"}}, "data.format = 'coco'; allowed: 'auto', 'mvtec', 'mvtec_ad2', 'visa'"),
        ({"members": [{}, {"coreset_ratio": 1.5}]}, "member 1 coreset_ratio = 1.5; expected 0 < value <= 1"),
        ({"members": [{"patch_size": 2}]}, "member 0 patch_size = 2; expected an odd integer"),
        ({"members": []}, "one or more"),
        ({"fusion": {"rule": "median"}}, "fusion.rule = 'median'; allowed: 'mean', 'max', 'geometric'"),
        ({"tiling": {"tile_size": [300]}}, r"tile size 300x300: expected 1..image size 256x256"),
        ({"tiling": {"tile_size": [128], "stride": [0]}}, "tile stride 0x0"),
        ({"tiling": {"tile_size": [128], "stride": [200]}}, "tile stride 200x200"),
        ({"tiling": {"preset": "ENS9", "stride": [64]}}, "either a preset or"),
        ({"tiling": {"preset": "ENS16"}}, "tiling.preset = 'ENS16'; allowed"),
        ({"tiling": {"neighbourhood": -1}}, r"tiling.neighbourhood = -1; expected an integer >= 0"),
        ({"tiling": {"neighbourhood": 1.5}}, r"tiling.neighbourhood: got number 1.5, expected integer"),
        ({"tiling": {"preset": "ST9", "neighbourhood": 1}}, r"tiling.neighbourhood = 1 with stacked tiles; expected 0"),
        (
            {"tiling": {"tile_size": [128], "stacked": True, "neighbourhood": 2}},
            r"tiling.neighbourhood = 2 with stacked tiles",
        ),
        ({"tiling": {"image_score": "top5"}}, r"tiling.image_score = 'top5'; allowed: 'mean', 'max', 'top3'"),
    ],
)
def test_bad_configs_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(TilecoreError, match=message):
        config_from_dict(raw)


def test_bad_toml_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[data\n")
    with pytest.raises(TilecoreError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(TilecoreError, match="not found"):
        load_config(tmp_path / "none.toml")
