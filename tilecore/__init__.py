"""tilecore: ensemble visual anomaly detection from PyTorch training to lean edge runtimes."""

__version__ = "0.1.0"
