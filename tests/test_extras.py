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


# One CUDA major for the `gpu` and `tensorrt` extras together (pyproject.toml): the extras' requirements are
# resolved by pip against the package index (dry run: nothing is installed) and the CUDA major of every
# resolved CUDA package must be the same. Skipped, with the reason, only when the index cannot be reached.
CUDA_SET_EXTRAS = ("gpu", "tensorrt")
NVIDIA_INDEX = "https://pypi.nvidia.com"
NETWORK_ERRORS = ("NewConnectionError", "NameResolutionError", "Failed to establish", "Max retries exceeded",
                  "Network is unreachable", "ConnectTimeout", "Read timed out", "Temporary failure")  # fmt: skip


def extra_requirements(*extras: str) -> list[str]:
    import tomllib

    optional = tomllib.loads(Path(tilecore.__file__).parents[1].joinpath("pyproject.toml").read_text())["project"]
    return list(dict.fromkeys(r for extra in extras for r in optional["optional-dependencies"][extra]))


def pypi_only(requirements: list[str]) -> list[str]:
    """TensorRT's libraries are on NVIDIA's index only: tensorrt-cuXX becomes its Python bindings wheel of the same
    versions (tensorrt-cuXX-bindings, on PyPI), which carries the same CUDA major in its name."""
    import re

    return [re.sub(r"^(tensorrt-cu\d+)(?=[<>=!~ ;\[]|$)", r"\1-bindings", r) for r in requirements]


def resolve(requirements: list[str], *index_args: str) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install for `requirements`, as a dry run; skips the test when the
    index is unreachable, fails it (with pip's reason) when the set cannot be installed together."""
    import json
    import subprocess

    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:",
               "--quiet", "--retries", "1", "--timeout", "20", "--report", "-", *index_args, *requirements]  # fmt: skip
    # fast-deps reads each wheel's metadata by HTTP range requests instead of downloading ~1.5 GB of CUDA
    # wheels (10 s instead of a minute here); a pip without the feature resolves the slow way
    proc = subprocess.run([*command[:4], "--use-feature=fast-deps", *command[4:]], capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    if proc.returncode != 0 and "fast-deps" in proc.stderr and "option" in proc.stderr:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        if any(marker in proc.stderr for marker in NETWORK_ERRORS):
            pytest.skip(f"the package index is unreachable: {proc.stderr.strip().splitlines()[-1][:200]}")
        raise AssertionError(f"pip cannot install {requirements} together:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    return [(item["metadata"]["name"].lower().replace("_", "-"), item["metadata"]["version"])
            for item in report["install"]]  # fmt: skip


def cuda_major(name: str, version: str) -> str | None:
    """The CUDA major a resolved package belongs to: -cuXX in its name; NVIDIA's CUDA 13 wheels, which dropped
    that suffix (nvidia-cuda-runtime, nvidia-cufft, ...); cuda-python's and cuda-toolkit's own versions; None
    for a package without CUDA."""
    import re

    if suffix := re.search(r"-cu(\d+)(?:-|$)", name):
        return suffix.group(1)
    if name in ("cuda-bindings", "cuda-python", "cuda-toolkit"):
        return version.split(".")[0]
    if name.startswith("nvidia-") and name not in ("nvidia-ml-py", "nvidia-pyindex"):
        return "13"  # unsuffixed: CUDA 13's library wheels (their versions are the libraries', not CUDA's)
    return None


def check_one_cuda_major(installs: list[tuple[str, str]]) -> None:
    majors: dict[str, list[str]] = {}
    for name, version in installs:
        if (major := cuda_major(name, version)) is not None:
            majors.setdefault(major, []).append(f"{name} {version}")
    assert len(majors) == 1, f"the extras {CUDA_SET_EXTRAS} resolve to more than one CUDA major: {majors}"


def test_cuda_major_of_resolved_packages() -> None:
    assert cuda_major("nvidia-cudnn-cu12", "9.28.0.42") == "12" and cuda_major("tensorrt-cu13-bindings", "10") == "13"
    assert cuda_major("nvidia-cuda-runtime", "13.0.96") == "13" and cuda_major("nvidia-curand", "10.4.0") == "13"
    assert cuda_major("cuda-bindings", "12.9.10") == "12" and cuda_major("numpy", "2.4.6") is None
    with pytest.raises(AssertionError, match="more than one CUDA major"):
        check_one_cuda_major([("faiss-gpu", "1.15.1"), ("nvidia-cuda-runtime-cu12", "12.9"), ("cuda-bindings", "13.5")])


def test_gpu_and_tensorrt_extras_install_as_one_cuda_set() -> None:
    """From PyPI: every requirement of both extras, TensorRT through its bindings wheel (pypi_only)."""
    requirements = extra_requirements(*CUDA_SET_EXTRAS)
    ort = [r for r in requirements if r.startswith("onnxruntime-gpu")]
    assert ort and all("[cuda,cudnn]" in r for r in ort), "onnxruntime-gpu loads no CUDA library without its extras"
    installs = resolve(pypi_only(requirements))
    names = {name for name, _ in installs}
    assert {"onnxruntime-gpu", "faiss-gpu", "cuda-python"} <= names and any(n.startswith("nvidia-cudnn") for n in names)
    check_one_cuda_major(installs)


def test_gpu_and_tensorrt_extras_install_with_nvidias_index() -> None:
    """The same set with TensorRT's own libraries, from NVIDIA's index (as docs/gpu.md installs it)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{NVIDIA_INDEX}/tensorrt-cu12-libs/", timeout=10).close()
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"NVIDIA's package index {NVIDIA_INDEX} is unreachable: {exc}")
    installs = resolve(extra_requirements(*CUDA_SET_EXTRAS), "--extra-index-url", NVIDIA_INDEX)
    assert any(name.startswith("tensorrt-cu") and name.endswith("-libs") for name, _ in installs)
    check_one_cuda_major(installs)
