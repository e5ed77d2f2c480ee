"""DCP and LCP methods."""

from __future__ import annotations

from detprune.pruning.base import Method

DCP_METHODS: dict[str, Method] = {}
