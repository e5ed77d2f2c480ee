"""GFL (Li et al., NeurIPS 2020): QFL, DFL with the integral box representation, ATSS."""

from __future__ import annotations

from detprune.models.base import ModelEntry

GFL_MODELS: dict[str, ModelEntry] = {}
