"""tilecore.runtime must import on an edge device where torch and timm are not installed."""

import subprocess
import sys

BLOCK_AND_IMPORT = """
import sys, pkgutil, importlib
for name in ("torch", "timm", "torchvision"):
    sys.modules[name] = None  # any `import torch` now raises ImportError
import tilecore.runtime as runtime
for module in pkgutil.iter_modules(runtime.__path__):
    importlib.import_module(f"tilecore.runtime.{module.name}")
    print(module.name)
assert not any(m in sys.modules and sys.modules[m] is not None for m in ("torch", "timm"))
"""


def test_runtime_imports_without_torch_or_timm() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_AND_IMPORT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    imported = set(result.stdout.split())
    assert {"knn", "anomaly_map", "preprocess", "image_io", "artifacts", "errors"} <= imported
