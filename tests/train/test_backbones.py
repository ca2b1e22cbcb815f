import pytest
import torch

from tilecore.runtime.errors import TilecoreError
from tilecore.train.backbones import create_feature_extractor, feature_channels, feature_layer_names

CASES = [  # backbone, the layers users write, channels expected at those layers
    ("resnet18", ["layer2", "layer3"], [128, 256]),
    ("wide_resnet50_2", ["layer2", "layer3"], [512, 1024]),
    ("resnext50_32x4d", ["layer2", "layer3"], [512, 1024]),
    ("densenet121", ["features.denseblock2", "features.denseblock3"], [512, 1024]),
    ("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], [40, 112]),
]


@pytest.mark.parametrize(("backbone", "layers", "channels"), CASES)
def test_features_at_named_layers(backbone: str, layers: list[str], channels: list[int]) -> None:
    model = create_feature_extractor(backbone, layers, state_dict=None)
    assert feature_channels(model) == channels
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == channels
    assert [m.shape[-1] for m in maps] == [8, 4]  # strides 8 and 16
    assert not any(p.requires_grad for p in model.parameters())


def test_wrong_layer_lists_the_valid_names() -> None:
    with pytest.raises(TilecoreError, match="layer9") as info:
        create_feature_extractor("resnet18", ["layer2", "layer9"], None)
    assert "layer9" in str(info.value)
    assert all(name in str(info.value) for name in feature_layer_names("resnet18"))


def test_layers_out_of_order_or_unknown_backbone_fail() -> None:
    with pytest.raises(TilecoreError, match="shallow to deep"):
        create_feature_extractor("resnet18", ["layer3", "layer2"], None)
    with pytest.raises(TilecoreError, match="resnet_nope"):
        create_feature_extractor("resnet_nope", ["layer2"], None)
