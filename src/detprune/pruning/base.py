"""The vocabulary of pruning: what a method is (:class:`Method`), what a procedure is
given (:class:`PruneContext`) and what it returns (:class:`PruneResult`).

The package is layered, each layer importing only the ones below it:

- ``base`` (this module): the vocabulary; imports nothing else of pruning, and torch only
  for type checking;
- ``importance/``: criteria, callables that score the channels of a coupled group;
- ``procedures/``: how channels leave (one shot, progressive, stage-wise, GCP, from
  scratch) and the options each declares (:mod:`~detprune.pruning.procedures.options`);
- ``methods``: the registry on top, every entry and family table, and what the workflow
  asks of a method (its sparse stage, its distillation, its options), without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detprune.utils.options import Option

if TYPE_CHECKING:
    import torch
    from torch import nn

    from detprune.models import ModelEntry

    Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]

#: Names of the from-scratch controls (Liu et al., ICLR 2019): ``scratch-<m>`` retrains
#: method ``<m>``'s pruned architecture from a random initialisation.
SCRATCH_PREFIX = "scratch-"


def scratch_source(method: str) -> str | None:
    """The method whose architecture ``scratch-<m>`` retrains from scratch, else None."""
    return method[len(SCRATCH_PREFIX) :] if method.startswith(SCRATCH_PREFIX) else None


@dataclass
class PruneResult:
    """The pruned model, its torch-pruning history and what was measured.

    ``aux_heads``: the state_dicts of auxiliary networks trained while pruning (DCP/LCP),
    keyed by the module whose output each reads; the checkpoint carries them (optional key
    ``aux_heads``) for LCP's fine-tuning loss to start from.
    """

    model: nn.Module
    history: list
    report: dict[str, Any]
    aux_heads: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class PruneContext:
    """Everything a pruning procedure may use.

    ``options`` is the config's ``prune`` section with ``prune.options[<method>]``
    merged in; ``batches()`` yields training batches (images, targets) on ``device``
    for data-dependent criteria and progressive procedures; ``macs_fn`` counts the MACs
    the way every table does; ``history`` is the torch-pruning history ``model`` was
    rebuilt with (the input checkpoint's ``pruning_history``: empty for the baseline,
    the source method's for a from-scratch control, which rebuilds those widths).
    """

    model: nn.Module
    spec: dict[str, Any]
    entry: ModelEntry
    options: dict[str, Any]
    seed: int
    device: torch.device
    batches: Callable[[], Iterator[Batch]]
    example: torch.Tensor
    macs_fn: Callable[[nn.Module], int]
    ignored: list[str] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)
    teacher: nn.Module | None = None
    history: list = field(default_factory=list)


ImportanceFactory = Callable[[PruneContext], Any]
Procedure = Callable[[PruneContext, "Method", float], PruneResult]


def resolve(ref: Any) -> Any:
    """The object a ``"package.module:name"`` reference names (imported now); anything
    else as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


#: The fields of :class:`Method` that may be given as ``"module:name"`` references.
LAZY_FIELDS = frozenset({"importance", "procedure"})


@dataclass(frozen=True)
class Method:
    """A pruning method and the stages around it.

    ``importance(ctx)`` returns a torch-pruning importance callable; ``procedure`` prunes
    (``None``: one shot to the FLOPs target, see
    :func:`detprune.pruning.methods.procedure_of`); ``global_pruning`` False makes every
    layer keep the same share; ``needs_gradients`` makes the procedure accumulate
    task-loss gradients first; ``sparsity`` names a regularizer of
    :data:`detprune.train.sparsity.REGULARIZERS` trained in its own cached stage before
    pruning; ``distill`` is the default distillation of its fine-tuning; ``family``
    groups a method with its ablations.

    ``importance`` and ``procedure`` may be given as ``"package.module:name"`` strings:
    they are imported when first read, so the registry (and the workflow, which asks it
    only for the plain fields) loads without torch.

    ``options`` declares the keys ``prune.options.<name>`` accepts, with defaults and
    types (checked when the config loads); ``preset`` holds this entry's own values of
    some of them (an ablation's switches), which ``prune.options.<name>`` overrides.

    ``scratch_of`` names the method whose architecture this one retrains from scratch
    (Liu et al., ICLR 2019, "Rethinking the Value of Network Pruning"): its prune stage
    gets that method's *pruned* checkpoint at the same FLOPs target and seed instead of
    the baseline, keeps its widths, re-initialises every weight
    (:func:`detprune.pruning.procedures.scratch.from_scratch`), and its fine-tuning stage
    trains it with the baseline's ``train`` schedule. Such an entry is named
    ``SCRATCH_PREFIX + scratch_of`` (``scratch-l1``).
    """

    description: str
    importance: ImportanceFactory | str | None = None
    procedure: Procedure | str | None = None
    global_pruning: bool = True
    needs_gradients: bool = False
    sparsity: str | None = None
    distill: str | None = None
    family: str = "baseline"
    scratch_of: str | None = None
    options: Mapping[str, Option] = field(default_factory=dict, hash=False)
    preset: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in LAZY_FIELDS and isinstance(value, str):
            return resolve(value)
        return value
