"""detprune: a reproducibility pipeline for channel pruning of object detectors."""

__version__ = "0.1.0"
