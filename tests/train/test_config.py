from pathlib import Path

import pytest

from tilecore.runtime.errors import TilecoreError
from tilecore.train.config import Config, config_from_dict, load_config


def test_defaults_are_the_embedded_main_job() -> None:
    config = load_config(None)
    assert config.model.backbone == "tf_efficientnet_lite0" and config.data.image_size == 256


def test_toml_overrides_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[model]\nbackbone = "resnet18"\nlayers = ["layer2", "layer3"]\ncoreset_ratio = 1\n')
    config = load_config(path)
    assert config.model.backbone == "resnet18" and config.model.coreset_ratio == 1.0
    assert config_from_dict(config.to_dict()) == config
    assert config.data == Config().data


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"colour": 1}}, "unknown key model.colour; allowed: backbone"),
        ({"modle": {}}, r"unknown section \[modle\]"),
        ({"model": {"coreset_ratio": "big"}}, "model.coreset_ratio: got string 'big', expected number"),
        ({"model": {"pretrained": 1}}, "model.pretrained: got integer 1, expected boolean"),
        ({"data": {"format": "coco"}}, "data.format = 'coco'; allowed: mvtec, visa"),
        ({"model": {"coreset_ratio": 1.5}}, "model.coreset_ratio = 1.5; expected 0 < value <= 1"),
        ({"model": {"patch_size": 2}}, "model.patch_size = 2; expected an odd integer"),
    ],
)
def test_bad_configs_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(TilecoreError, match=message):
        config_from_dict(raw)


def test_bad_toml_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[model\n")
    with pytest.raises(TilecoreError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(TilecoreError, match="not found"):
        load_config(tmp_path / "none.toml")
