"""FAISS's exact kNN on Intel CPUs newer than the OpenBLAS that faiss-cpu bundles.

faiss-cpu 1.15's wheel carries OpenBLAS 0.3.15. On an Intel CPU model it does not know, that OpenBLAS falls
back to its Prescott (SSE3) kernels, and FAISS's exact search, a matrix product, runs several times slower
than the CPU allows (docs/results: "kNN and OpenBLAS's kernels"). OpenBLAS reads
OPENBLAS_CORETYPE once, when it loads, so `tilecore/__init__.py` calls choose_openblas_kernels before
anything imports faiss. It names the kernels the CPU can run: SkylakeX with AVX-512, Haswell with AVX2
and FMA. A value the user set is kept, and CPUs of other vendors are left to OpenBLAS's own choice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
HASWELL_FLAGS = frozenset({"avx2", "fma"})


def openblas_coretype(cpuinfo: str) -> str | None:
    """The OpenBLAS kernels an Intel CPU described by /proc/cpuinfo text can run, or None to leave it."""
    vendor, flags = "", frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    if vendor != "GenuineIntel":
        return None
    if SKYLAKEX_FLAGS <= flags:
        return "SkylakeX"
    if HASWELL_FLAGS <= flags:
        return "Haswell"
    return None


def choose_openblas_kernels(
    environ: MutableMapping[str, str] = os.environ, cpuinfo: Path = Path("/proc/cpuinfo")
) -> str | None:
    """Set OPENBLAS_CORETYPE for this process when it is unset and faiss is not loaded yet; returns what
    it set, or None."""
    if "OPENBLAS_CORETYPE" in environ or "faiss" in sys.modules:
        return None
    try:
        coretype = openblas_coretype(cpuinfo.read_text())
    except OSError:  # not Linux: OpenBLAS decides
        return None
    if coretype:
        environ["OPENBLAS_CORETYPE"] = coretype
    return coretype
