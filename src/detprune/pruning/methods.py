"""The ``METHODS`` registry: a method is an importance factory plus how it is applied."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch_pruning as tp

from detprune.pruning.importance.magnitude import l1_importance


@dataclass(frozen=True)
class Method:
    """A pruning method.

    ``importance(**options)`` returns a torch-pruning importance callable that scores
    the channels of a coupled group; ``global_pruning`` says whether channels compete
    across layers (True) or every layer keeps the same share (False).
    """

    importance: Callable[..., tp.importance.Importance]
    description: str
    global_pruning: bool = True
    needs_gradients: bool = False
    options: tuple[tuple[str, Any], ...] = ()


METHODS: dict[str, Method] = {
    "l1": Method(l1_importance, "group L1 magnitude (Li et al. 2017; DepGraph grouping)"),
}


def get_method(name: str) -> Method:
    """Look up a method; unknown names get a clear error."""
    if name not in METHODS:
        raise KeyError(f"prune.methods: unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
