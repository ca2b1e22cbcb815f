"""tilecore.runtime: the lean inference core (numpy, onnxruntime, faiss, opencv; never torch or timm).

It owns everything that training and deployment must compute identically: image preprocessing,
nearest-neighbour scoring, anomaly-map post-processing and the artifact helpers.

The public API is the names in `__all__`:

    from tilecore.runtime import Predictor
    result = Predictor("bundles/brick", device="cpu").predict("part.png")  # a path or an RGB uint8 array
    print(result.score, result.label)

They load lazily (module `__getattr__`), so importing a part of the runtime, as training does with
`tilecore.runtime.calibration`, never pulls in onnxruntime or faiss.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tilecore.runtime.errors import TilecoreError
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.manifest import Identity, Manifest, read_manifest
    from tilecore.runtime.predictor import Predictor, Result

__all__ = ["Identity", "Manifest", "Predictor", "Result", "TilecoreError", "read_manifest", "read_rgb"]

_HOMES = {
    "Predictor": "predictor",
    "Result": "predictor",
    "TilecoreError": "errors",
    "Manifest": "manifest",
    "Identity": "manifest",
    "read_manifest": "manifest",
    "read_rgb": "image_io",
}

# Wheels that install the same Python module: with both of a pair in one environment, whichever was
# installed last owns the files, and the runtime would run a mix of CPU and CUDA builds.
CLASHING_DISTRIBUTIONS = (
    ("onnxruntime", ("onnxruntime-gpu",)),
    ("faiss-cpu", ("faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")),
)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'tilecore.runtime' has no attribute {name!r}")
    value = getattr(import_module(f"tilecore.runtime.{home}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


def clashing_install() -> str | None:
    """One line naming the CPU and GPU wheels installed side by side (the `runtime` and `gpu` extras in
    one environment), or None when each module comes from one wheel."""
    clashes = []
    for cpu, gpus in CLASHING_DISTRIBUTIONS:
        both = [gpu for gpu in gpus if installed(gpu)]
        if both and installed(cpu):
            clashes.append(f"{cpu} and {' and '.join(both)}")
    if not clashes:
        return None
    return (
        f"{'; '.join(clashes)} are installed together (the 'runtime' and 'gpu' extras in one environment); "
        "they install the same modules: keep one set (pip uninstall the other, then reinstall the one you keep)"
    )


def check_single_stack() -> None:
    """Refuse (TilecoreError) an environment with both the CPU and the GPU wheels; Predictor calls this."""
    from tilecore.runtime.errors import TilecoreError

    if (problem := clashing_install()) is not None:
        raise TilecoreError(problem)
