"""Installs with part of the extras: a command whose extra is missing says which one to install, in one line;
the CPU and GPU wheels installed side by side are refused in one line before a bundle loads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import tilecore
from tests.cli import assert_one_line_refusal, describe, run_cli
from tilecore import cli
from tilecore.runtime import check_single_stack, clashing_install
from tilecore.runtime.errors import TilecoreError

BLOCKED = ("torch", "torchvision", "timm", "safetensors", "sklearn", "skimage", "onnx", "nncf")


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a runtime-only install: a sitecustomize that makes every import of the train and
    export extras' modules fail as if they were not installed."""
    folder = tmp_path_factory.mktemp("runtime_only")
    (folder / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in BLOCKED)
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--out", "{tmp}/run"], r"tilecore train needs the 'train' extra: pip install 'tilecore\[train\]' "
                                          r"\(missing module torch\)$"),
        (["eval", "{tmp}/run"], r"tilecore eval needs the 'train' extra: pip install 'tilecore\[train\]'"),
        (["export", "{tmp}/run", "--out", "{tmp}/b"],
         r"tilecore export needs the 'train' extra: pip install 'tilecore\[train,export\]' \(missing module torch\)"),
        (["data", "synth", "--out", "{tmp}/d"],
         r"tilecore data synth needs the 'train' extra: pip install 'tilecore\[train\]' \(missing module skimage\)"),
    ],
)  # fmt: skip
def test_a_command_of_a_missing_extra_names_it_in_one_line(
    runtime_only: dict, tmp_path: Path, args: list[str], message: str
) -> None:
    proc = run_cli(*(a.format(tmp=tmp_path) for a in args), env=runtime_only, timeout=60)
    assert_one_line_refusal(proc, message)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_runtime_commands_still_work_without_the_other_extras(runtime_only: dict, tmp_path: Path) -> None:
    proc = run_cli("--version", env=runtime_only, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tilecore {tilecore.__version__}", describe(proc)
    proc = run_cli("info", tmp_path / "nothing", env=runtime_only, timeout=60)
    assert_one_line_refusal(proc, r"bundle .*nothing: folder not found")  # the command's own refusal, no extra
    proc = run_cli("train", "--help", env=runtime_only, timeout=60)
    assert proc.returncode == 0 and "--out" in proc.stdout, describe(proc)


def test_an_import_failing_mid_command_is_named_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tilecore", "export", "runs/x", "--precision", "int8"])
    message = cli.missing_extra(ModuleNotFoundError("No module named 'nncf'", name="nncf"))
    expected = "tilecore export needs the 'export' extra: pip install 'tilecore[train,export]' (missing module nncf)"
    assert message == expected
    assert cli.missing_extra(ModuleNotFoundError("No module named 'foo'", name="foo")) is None  # a bug: re-raised


def fake_distribution(folder: Path, name: str, version: str = "1.31.1") -> None:
    """What pip leaves for an installed wheel, as far as importlib.metadata looks."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_this_environment_has_one_stack() -> None:
    assert clashing_install() is None  # the test venv installs `runtime` only
    check_single_stack()


def test_cpu_and_gpu_wheels_side_by_side_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "onnxruntime-gpu")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TilecoreError, match=r"^onnxruntime and onnxruntime-gpu are installed together") as caught:
        check_single_stack()
    assert "\n" not in str(caught.value) and "faiss" not in str(caught.value)
    fake_distribution(tmp_path, "faiss-gpu-cu12", "1.15.1")
    assert clashing_install().startswith("onnxruntime and onnxruntime-gpu; faiss-cpu and faiss-gpu-cu12 are installed")


def test_the_cli_refuses_a_mixed_install_before_loading_a_bundle(tmp_path: Path) -> None:
    fakes = tmp_path / "site"
    fake_distribution(fakes, "faiss-gpu", "1.15.1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fakes), *sys.path])}
    proc = run_cli("run", tmp_path / "no-bundle", tmp_path / "x.png", "--out", tmp_path / "o", env=env, timeout=60)
    assert_one_line_refusal(proc, r"faiss-cpu and faiss-gpu are installed together \(the 'runtime' and 'gpu' extras")
