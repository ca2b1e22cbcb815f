"""tilecore: ensemble visual anomaly detection from PyTorch training to lean edge runtimes."""

from tilecore.runtime.openblas_kernels import choose_openblas_kernels

choose_openblas_kernels()  # before anything imports faiss: its bundled OpenBLAS reads the choice once

__version__ = "0.1.0"
