"""OPENBLAS_CORETYPE is chosen from the CPU's flags before faiss loads, only on Intel, never over the user's."""

import os
import subprocess
import sys
from pathlib import Path

from tilecore.runtime.openblas_kernels import choose_openblas_kernels, openblas_coretype

AVX512 = "fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"


def cpuinfo(vendor: str, flags: str) -> str:
    core = f"processor\t: 0\nvendor_id\t: {vendor}\nmodel\t\t: 207\nflags\t\t: {flags}\n"
    return core + core.replace(": 0", ": 1")


def test_kernels_follow_the_cpus_flags_on_intel_only() -> None:
    assert openblas_coretype(cpuinfo("GenuineIntel", AVX512)) == "SkylakeX"
    assert openblas_coretype(cpuinfo("GenuineIntel", "sse2 avx avx2 fma")) == "Haswell"  # e.g. Alder Lake-N
    assert openblas_coretype(cpuinfo("GenuineIntel", "sse2 avx")) is None
    assert openblas_coretype(cpuinfo("GenuineIntel", "avx2 fma avx512f")) == "Haswell"  # not all of SkylakeX's
    assert openblas_coretype(cpuinfo("AuthenticAMD", AVX512)) is None  # OpenBLAS knows its Zen cores
    assert openblas_coretype("") is None


def test_the_users_choice_and_a_missing_cpuinfo_are_respected(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(cpuinfo("GenuineIntel", AVX512))
    environ = {"OPENBLAS_CORETYPE": "Haswell"}
    assert choose_openblas_kernels(environ, info) is None and environ == {"OPENBLAS_CORETYPE": "Haswell"}
    environ = {}
    assert choose_openblas_kernels(environ, tmp_path / "missing") is None and environ == {}


def test_importing_tilecore_sets_it_before_faiss_loads() -> None:
    code = "import os, tilecore.runtime.knn, faiss; print(os.environ.get('OPENBLAS_CORETYPE'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    try:
        expected = openblas_coretype(Path("/proc/cpuinfo").read_text())
    except OSError:
        expected = None
    assert out.strip() == str(expected)
