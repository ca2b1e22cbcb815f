"""timm backbones as frozen feature extractors, with layers named the way users write them.

Layer names are timm's feature module names: `layer2`/`layer3` (ResNet, WideResNet, ResNeXt),
`features.denseblock2` (DenseNet), `blocks.2`/`blocks.4` (EfficientNet, MobileNet).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from tilecore.runtime.errors import TilecoreError


def check_backbone_name(backbone: str) -> None:
    if not timm.is_model(backbone):
        suggestions = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(suggestions)})" if suggestions else ""
        raise TilecoreError(f"backbone {backbone!r}: not a timm model name{hint}")


def feature_layer_names(backbone: str) -> list[str]:
    """All layer names `backbone` can return features from, shallow to deep."""
    check_backbone_name(backbone)
    with torch.device("meta"):  # builds the graph without allocating or initialising weights
        model = timm.create_model(backbone, features_only=True, pretrained=False)
    return list(model.feature_info.module_name())


def resolve_out_indices(backbone: str, layers: list[str]) -> list[int]:
    """Map layer names to timm `out_indices`, failing with the list of valid names."""
    valid = feature_layer_names(backbone)
    if not layers:
        raise TilecoreError(f"layers: empty list, expected one or more of {valid} for {backbone}")
    indices = []
    for layer in layers:
        if layer not in valid:
            raise TilecoreError(f"layer {layer!r}: {backbone} has no such feature layer; valid: {valid}")
        indices.append(valid.index(layer))
    if indices != sorted(set(indices)):
        raise TilecoreError(f"layers {layers}: expected distinct layers ordered shallow to deep, from {valid}")
    return indices


def create_feature_extractor(backbone: str, layers: list[str], state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """A frozen timm `features_only` model returning one feature map per requested layer.

    `state_dict` uses the full classifier model's key names; entries the truncated model lacks (deeper
    stages, the head) are dropped. Missing entries are an error, never silently left random.
    """
    out_indices = resolve_out_indices(backbone, layers)
    model = timm.create_model(backbone, features_only=True, out_indices=out_indices, pretrained=False)
    if state_dict is not None:
        expected = model.state_dict()
        state_dict = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state_dict}
        missing = [k for k in expected if k not in state_dict]
        if missing:
            raise TilecoreError(f"weights for {backbone}: {len(missing)} feature tensors missing (first: {missing[0]})")
        for key, value in expected.items():
            if state_dict[key].shape != value.shape:
                raise TilecoreError(
                    f"weights for {backbone}: {key} has shape {tuple(state_dict[key].shape)}, "
                    f"expected {tuple(value.shape)}"
                )
        model.load_state_dict({k: state_dict[k] for k in expected})
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def feature_channels(model: nn.Module) -> list[int]:
    return list(model.feature_info.channels())


def feature_reductions(model: nn.Module) -> list[int]:
    return list(model.feature_info.reduction())


def default_mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation the backbone's ImageNet weights were trained with."""
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)
