"""GCP and GCP+SAD methods."""

from __future__ import annotations

from detprune.pruning.base import Method

GCP_METHODS: dict[str, Method] = {}
