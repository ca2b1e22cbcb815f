"""Weight resolution, and real ImageNet weights recognising real photographs."""

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import timm
import torch
from safetensors.torch import save_file

from tilecore.runtime.errors import TilecoreError
from tilecore.train.backbones import default_mean_std
from tilecore.train.weights import resolve_weights

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def top_class(backbone: str, state_dict: dict, photo: np.ndarray) -> int:
    model = timm.create_model(backbone, pretrained=False)
    model.load_state_dict(state_dict)
    mean, std = default_mean_std(backbone)
    x = cv2.resize(photo, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x.transpose(2, 0, 1))[None])
    return int(logits.argmax())


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "mobilenetv2_100"])
def test_offline_weights_recognise_a_cat_and_an_espresso(backbone: str) -> None:
    resolved = resolve_weights(backbone, None, pretrained=True)
    assert resolved.source.startswith("package:")
    assert top_class(backbone, resolved.state_dict, skimage.data.chelsea()) in CAT_CLASSES
    assert top_class(backbone, resolved.state_dict, skimage.data.coffee()) == ESPRESSO


def test_explicit_file_wins_in_both_formats(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": reference}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        resolved = resolve_weights("resnet18", tmp_path / name, pretrained=True)
        assert resolved.source == f"file:{(tmp_path / name).resolve()}"
        torch.testing.assert_close(resolved.state_dict["layer2.0.conv1.weight"], reference["layer2.0.conv1.weight"])


def test_files_that_are_not_state_dicts_are_refused(tmp_path: Path) -> None:
    torch.save({"note": "hello", "nested": {"x": [1, 2]}}, tmp_path / "bad.pth")
    with pytest.raises(TilecoreError, match="bad.pth"):
        resolve_weights("resnet18", tmp_path / "bad.pth", pretrained=True)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(TilecoreError, match="junk.safetensors"):
        resolve_weights("resnet18", tmp_path / "junk.safetensors", pretrained=True)
    with pytest.raises(TilecoreError, match="not found"):
        resolve_weights("resnet18", tmp_path / "missing.pth", pretrained=True)


def test_wrong_architecture_file_is_refused(tmp_path: Path) -> None:
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(TilecoreError, match="expected"):
        resolve_weights("resnet34", tmp_path / "r18.pth", pretrained=True)


def test_unreachable_hub_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dns(*args: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(TilecoreError, match="hub is unreachable.*--weights"):
        resolve_weights("resnet18", None, pretrained=True)


def test_hub_download_failure_is_one_clear_error() -> None:
    # HF_HUB_OFFLINE must be set before huggingface_hub is imported, hence the subprocess.
    code = (
        "from tilecore.train.weights import resolve_weights\n"
        "try:\n    resolve_weights('resnet18', None, True)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.startswith("TilecoreError") and "hub download failed" in out and "--weights" in out


def test_random_init_only_when_asked_and_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tilecore"):
        resolved = resolve_weights("resnet18", None, pretrained=False)
    assert resolved.state_dict is None and resolved.source == "random"
    assert "RANDOM INIT" in caplog.text
