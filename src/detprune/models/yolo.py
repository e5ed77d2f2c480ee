"""YOLOv4 (CSPDarknet53, SPP, PANet) and YOLOv4-tiny."""

from __future__ import annotations

from detprune.models.base import ModelEntry

YOLO_MODELS: dict[str, ModelEntry] = {}
