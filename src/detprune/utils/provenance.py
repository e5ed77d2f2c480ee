"""What every output records about where it came from."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

_PACKAGES = ("torch", "torchvision", "torch-pruning", "pycocotools", "numpy", "detprune")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide the numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A record of versions, the config used and any extra fields (inputs, command)."""
    record: dict[str, Any] = {"versions": versions()}
    if config is not None:
        record["config"] = config
    record.update(extra)
    return record
