"""SSD (ResNet-50 backbone, 300/512) and its CPU-sized configuration."""

from __future__ import annotations

from detprune.models.base import ModelEntry

SSD_MODELS: dict[str, ModelEntry] = {}
