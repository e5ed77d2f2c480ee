"""The from-scratch control of Liu et al. (ICLR 2019, "Rethinking the Value of Network
Pruning"): a pruned architecture, re-initialised randomly and trained like the baseline.

``scratch-<m>`` (see :attr:`detprune.pruning.base.Method.scratch_of`) takes method ``<m>``'s
*pruned* checkpoint at the same FLOPs target and seed, keeps its widths and nothing else:
:func:`from_scratch` builds the registry model of the same spec afresh, replays ``<m>``'s
pruning history on it (so every weight is the registry entry's own initialisation,
restricted to the kept channels), rescales the weights of layers whose input shrank, and
returns it with an empty history. The prune stage appends that to the source's history,
so the checkpoint rebuilds with exactly ``<m>``'s widths; fine-tuning then trains it with
the baseline's ``train`` schedule (:func:`detprune.config.finetune_schedule`), Liu et al.'s
Scratch-E (Scratch-B, the baseline's compute budget, is ``finetune.methods.scratch-<m>``
with more epochs).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from detprune.models import build_model
from detprune.pruning.base import PruneContext, PruneResult
from detprune.pruning.procedures.oneshot import layer_widths, make_report
from detprune.train.checkpoint import apply_history

if TYPE_CHECKING:
    from detprune.pruning.base import Method

log = logging.getLogger("detprune.prune")

#: Added to the run's seed for the scratch initialisation. With the seed itself, the draw
#: would repeat the baseline's own initialisation (``train`` seeds torch, then builds the
#: model), i.e. the lottery-ticket setting (Frankle & Carbin 2019), which Liu et al. treat
#: as a separate comparison; the control here is an independent random initialisation.
INIT_SEED_OFFSET = 7919


def _fresh_model(spec: dict[str, Any], seed: int) -> tuple[nn.Module, str | None]:
    """The unpruned registry model of ``spec``, initialised under ``seed`` (the global RNG
    is forked, so the caller's stream is untouched); a pretrained backbone is not loaded
    (it would carry trained weights). Returns the model and the dropped backbone path."""
    kwargs = dict(spec["kwargs"])
    dropped = kwargs.get("pretrained_backbone") or None
    if dropped:
        kwargs["pretrained_backbone"] = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec["name"], spec["num_classes"], kwargs)
    return model.eval(), dropped


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@torch.no_grad()
def _rescale(model: nn.Module, full: nn.Module) -> dict[str, float]:
    """Multiply the weight of every conv/linear layer whose fan-in shrank by
    ``sqrt(fan_in_full / fan_in_kept)``: its forward gain at initialisation
    (fan-in x weight variance) is then the full-width model's, whatever the registry's
    rule (He fan-in or fan-out, Xavier, fixed std). Biases (e.g. the focal-loss prior)
    are left as initialised. Returns ``{layer: factor}`` for the rescaled layers."""
    factors = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        kept = m.weight[0].numel()  # in_channels / groups x kernel area (in_features)
        orig = full.get_submodule(name).weight[0].numel()
        if kept < orig:
            factor = math.sqrt(orig / kept)
            m.weight.mul_(factor)
            factors[name] = factor
    return factors


@torch.no_grad()
def _reset_norms(model: nn.Module) -> int:
    """Fresh normalisation state: BatchNorm running statistics reset (mean 0, var 1, no
    batches tracked). The affine parameters of BN and GN are the fresh build's (the
    registry's initialisation, gamma 1 and beta 0 unless the entry sets its own, such as
    ``yolov4_narrow``'s neck biases). Returns the number of norm layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.track_running_stats:
                m.reset_running_stats()
            n += 1
        elif isinstance(m, nn.GroupNorm):
            n += 1
    return n


def from_scratch(ctx: PruneContext, method: Method, target: float) -> PruneResult:
    """Method ``method.scratch_of``'s architecture (``ctx.model``, rebuilt from
    ``ctx.history``), randomly re-initialised; reports the source's FLOPs share.

    Every weight comes from a fresh registry model built under seed
    ``ctx.seed + INIT_SEED_OFFSET`` and pruned by the source's history, so the kept
    channels carry the registry's own initialisation (no weight of ``ctx.model``
    survives); conv/linear weights are rescaled to their new fan-in (:func:`_rescale`) and
    norm layers start fresh. No channel is chosen here and nothing is bisected: the input
    must already sit at ``target`` (within ``prune.tolerance``) of the unpruned model's
    MACs, or this raises (the DAG gives ``scratch-<m>`` the wrong checkpoint).
    """
    source = method.scratch_of
    if source is None:
        raise ValueError("from_scratch: the method has no scratch_of (the method it retrains)")
    init_seed = int(ctx.seed) + INIT_SEED_OFFSET
    full, dropped = _fresh_model(ctx.spec, init_seed)
    if not ctx.history and layer_widths(ctx.model) != layer_widths(full):
        raise ValueError(
            f"from_scratch ({source}): the input model is pruned but PruneContext.history is "
            "empty; the prune stage must pass the input checkpoint's pruning_history"
        )
    scratch = apply_history(copy.deepcopy(full), ctx.spec, ctx.history)
    got, want = _shapes(scratch), _shapes(ctx.model)
    if got != want:
        diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        raise ValueError(
            f"from_scratch ({source}): the history does not rebuild the input model's widths "
            f"({len(diff)} tensors differ, e.g. {diff[:3]})"
        )
    factors = _rescale(scratch, full)
    norms = _reset_norms(scratch)
    base, macs = ctx.macs_fn(full), ctx.macs_fn(scratch)
    tolerance = float(ctx.options.get("tolerance", 0.02))
    kept = macs / base
    if abs(kept / target - 1) > tolerance:
        raise ValueError(
            f"from_scratch ({source}): the input checkpoint keeps {kept:.4f} of the unpruned "
            f"model's MACs, not {target:.3f} (within {tolerance:.0%}); scratch-{source} at "
            f"{target} must be given {source}'s pruned checkpoint at that target"
        )
    log.info(
        "scratch of %s: %d layers rescaled to their fan-in, %d norm layers reset, seed %d",
        source,
        len(factors),
        norms,
        init_seed,
    )
    report = make_report(
        full,
        scratch,
        target,
        base,
        macs,
        tolerance,
        allocation=f"{source}'s architecture (from scratch)",
        source_method=source,
        reinitialised=True,
        init="registry initialisation of the kept channels, fan-in rescaled",
        init_seed=init_seed,
        rescaled_layers=factors,
        norm_layers_reset=norms,
        pretrained_backbone_not_loaded=dropped,
        reference="Liu et al., Rethinking the Value of Network Pruning, ICLR 2019",
    )
    device = next(ctx.model.parameters()).device  # where the stage put the source
    return PruneResult(scratch.to(device).eval(), [], report)
