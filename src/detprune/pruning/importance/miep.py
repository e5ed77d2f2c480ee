"""GroupFisher (progressive) and MIEP methods."""

from __future__ import annotations

from detprune.pruning.base import Method

MIEP_METHODS: dict[str, Method] = {}
