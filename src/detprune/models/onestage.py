"""One-stage FPN detectors: RetinaNet, FCOS, FSAF, GFL."""

from __future__ import annotations

from detprune.models.base import ModelEntry

ONESTAGE_MODELS: dict[str, ModelEntry] = {}
