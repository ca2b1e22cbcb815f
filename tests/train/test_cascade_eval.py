"""The [cascade] config table and when a run gets a cascade (train.cascade_fit)."""

from __future__ import annotations

import pytest

from tilecore.runtime.errors import TilecoreError
from tilecore.train.cascade_fit import fit_cascade, tile_gflops
from tilecore.train.config import config_from_dict

MEMBER = {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False,
          "pretrain_embed_dimension": 32, "target_embed_dimension": 16}  # fmt: skip


def config(members: int = 2, **cascade: object):
    return config_from_dict({"data": {"image_size": 64}, "members": [MEMBER] * members, "cascade": cascade})


def calibration(members: int = 2) -> dict:
    normal = [[-1.0, 0.0, 0.5, -0.5] for _ in range(members)]
    synthetic = [[3.0, 4.0, 0.8, 5.0, 2.5] for _ in range(members)]
    return {"thresholds": {"image": 1.0}, "validation_member_scores": normal, "synthetic_member_scores": synthetic}


def test_the_cascade_table_has_defaults_and_is_checked() -> None:
    assert config().cascade.mode == "auto" and config().cascade.agreement == 0.995
    assert config(order=[1, 0]).cascade.order == [1, 0]
    with pytest.raises(TilecoreError, match=r"cascade\.mode = 'always'; allowed: 'auto', 'off'"):
        config(mode="always")
    with pytest.raises(TilecoreError, match=r"cascade\.order = \[0, 0\]; expected empty or each member index"):
        config(order=[0, 0])
    with pytest.raises(TilecoreError, match=r"cascade\.agreement = 0\.0; expected 0 < value <= 1"):
        config(agreement=0.0)
    with pytest.raises(TilecoreError, match=r"cascade\.margin = -1\.0; expected >= 0"):
        config(margin=-1.0)


def test_an_ensemble_gets_a_cascade_unless_it_is_off_or_a_single_model() -> None:
    cascade = fit_cascade(config(), calibration())
    assert cascade is not None and len(cascade.stages) == 2
    assert cascade.calibration_images == 9
    assert fit_cascade(config(mode="off"), calibration()) is None
    assert fit_cascade(config(), calibration(), mode="off") is None  # export --cascade off
    assert fit_cascade(config(1), calibration(1)) is None
    with pytest.raises(TilecoreError, match="--cascade sometimes: expected auto or off"):
        fit_cascade(config(), calibration(), mode="sometimes")


def test_a_run_calibrated_before_cascades_exports_without_one() -> None:
    old = {"thresholds": {"image": 1.0}}  # calibration.json of a run trained before member scores were kept
    assert fit_cascade(config(), old) is None


def test_a_wider_head_costs_more() -> None:
    small = config_from_dict({"members": [MEMBER]}).members[0]
    wide = config_from_dict({"members": [{**MEMBER, "target_embed_dimension": 64}]}).members[0]
    assert 0 < tile_gflops(small, (32, 32)) < tile_gflops(wide, (32, 32))
