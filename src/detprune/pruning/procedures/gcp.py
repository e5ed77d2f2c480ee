"""Group channel pruning (GCP) with beta folding.

Niu et al., "Group channel pruning and spatial attention distilling for object
detection", Applied Intelligence 2022 (arXiv 2306.01526). The detector is split into
groups by feature scale and module type (the registry entry's ``groups``); every group
has its own pruning fraction, turned into a |gamma| threshold within the group; each
layer keeps at least max(1% of its channels, ``min_channels``); coupled layers share
one mask (torch-pruning groups, scored by the max |gamma| of their BNs: the OR-merge of
the authors' masks), and the beta of removed BN channels is folded into the next layer.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.base import PruneResult
from detprune.pruning.importance.fisher import channel_groups, slots
from detprune.pruning.importance.magnitude import GammaImportance
from detprune.pruning.procedures.oneshot import make_report
from detprune.pruning.procedures.options import GCP
from detprune.utils.options import defaults

if TYPE_CHECKING:
    from detprune.pruning.base import Method, PruneContext

log = logging.getLogger("detprune.prune.gcp")
_BN = nn.modules.batchnorm._BatchNorm
ROOT_TYPES = (nn.Conv2d, nn.Linear)

# Relative fractions in the pattern of the authors' YOLOv4 setting (0.18 / 0.50 / 0.97
# for the shallow, middle and deep backbone, 0.865 / 0.68 for the neck parts): shallow
# stages lose least, deep stages most. A FLOPs target rescales them by one factor.
DEFAULT_FRACTIONS: dict[str, float] = {
    "stride2": 0.1,
    "stride4": 0.18,
    "stride8": 0.34,
    "stride16": 0.5,
    "stride32": 0.97,
    "stride64": 0.97,
    "neck": 0.865,
    "head": 0.68,
}
FALLBACK_FRACTION = 0.5  # groups whose name is not in DEFAULT_FRACTIONS


@dataclass
class Unit:
    """One coupled group: its root layer, scale group and per-channel scores."""

    root: str
    group: str
    scores: torch.Tensor
    channel_groups: int = 1  # GroupNorm / grouped conv blocks (pruned slot-wise)


def scale_group_of(name: str, groups: Mapping[str, Sequence[str]]) -> str | None:
    """The scale group whose module prefix is the longest match of ``name``."""
    best, length = None, -1
    for group, prefixes in groups.items():
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > length:
                best, length = group, len(p)
    return best


def coupled_units(
    model: nn.Module,
    inputs: tuple,
    ignored: Sequence[str],
    groups: Mapping[str, Sequence[str]],
) -> list[Unit]:
    """Score every prunable coupled group of ``model`` and assign it by its root layer."""
    was = model.training
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
    model.train(was)
    imp = GammaImportance()
    units = []
    ign = [model.get_submodule(n) for n in ignored]
    names = {m: n for n, m in model.named_modules()}
    for grp in dg.get_all_groups(ignored_layers=ign, root_module_types=ROOT_TYPES):
        root = names[grp[0].dep.target.module]
        owner = scale_group_of(root, groups)
        if owner is None:
            log.info("coupled group of %s is in no GCP group: not pruned", root)
            continue
        units.append(Unit(root, owner, imp(grp), channel_groups(dg, grp)))
    return units


def layer_minimum(channels: int, min_channels: int) -> int:
    """Channels a layer keeps at least: max(1% of C, ``min_channels``), at most C."""
    return min(channels, max(math.ceil(0.01 * channels), min_channels))


def select_channels(
    units: Sequence[Unit], fractions: Mapping[str, float], min_channels: int
) -> dict[str, list[int]]:
    """Channels to remove per coupled group (root name -> root channel indices).

    Within a scale group the ``round(fraction * N)`` lowest-scored of its N channels go
    (ties: earlier group, then lower index), i.e. everything under the group's |gamma|
    threshold, except that a coupled group keeps its ``layer_minimum`` best channels.
    """
    plan: dict[str, list[int]] = {}
    for name, frac in fractions.items():
        members = [u for u in units if u.group == name]
        if not members or frac <= 0:
            continue
        scores = torch.cat([u.scores for u in members])
        owner = torch.cat([torch.full((len(u.scores),), i) for i, u in enumerate(members)])
        chan = torch.cat([torch.arange(len(u.scores)) for u in members])
        n_remove = round(min(frac, 1.0) * len(scores))
        chosen = torch.argsort(scores, stable=True)[:n_remove]  # ascending score
        for i, unit in enumerate(members):
            picked = chan[chosen[owner[chosen] == i]]  # in ascending score order
            cap = len(unit.scores) - layer_minimum(len(unit.scores), min_channels)
            if unit.channel_groups > 1:
                picked = _slot_wise(unit, min(len(picked), max(cap, 0)))
            if cap > 0 and len(picked):
                plan[unit.root] = sorted(int(c) for c in picked[:cap])
    return plan


def _slot_wise(unit: Unit, n: int) -> torch.Tensor:
    """At most ``n`` channels of a unit with channel groups, as whole slots (the same
    position in every block, scored by the mean over the blocks); at least 2 channels stay
    per block, so GroupNorm keeps equal groups of more than one channel."""
    g, width = unit.channel_groups, len(unit.scores)
    if width % g:
        return torch.zeros(0, dtype=torch.long)
    ranked = sorted(slots(unit.scores, g), key=lambda s: s[0])  # stable: ties by position
    chosen = [i for _, idxs in ranked[: min(n // g, max(width // g - 2, 0))] for i in idxs]
    return torch.tensor(chosen, dtype=torch.long)


def _pruning_group(dg: tp.DependencyGraph, model: nn.Module, root: str, idxs: list[int]):
    layer = model.get_submodule(root)
    return dg.get_pruning_group(layer, dg.get_pruner_of_module(layer).prune_out_channels, idxs)


@torch.no_grad()
def fold_removed_channels(
    model: nn.Module, dg: tp.DependencyGraph, plan: Mapping[str, list[int]], inputs: tuple
) -> dict[str, int]:
    """Fold the constant output of the channels about to be removed into the next layers.

    A removed channel's BN scale is set to 0, so its output after BN -> activation
    (ReLU, max-pool, residual sums of such channels) is a constant, e.g. relu(beta_c).
    One probe forward (eval mode, ``inputs``) reads that constant at the input of every
    consumer layer (conv or linear whose input channels the group prunes); a consumer
    then gets W[:, c].sum((1, 2)) * const added to its bias, or, without a bias, the BN
    right after it gets running_mean -= that amount. Channels that are not constant
    (groups without BN) are left alone. Exact for 1x1 convs and linears; for k x k convs
    exact away from zero-padded borders, where the missing constant is part of the
    padding (the approximation of the authors' code as well).
    """
    consumers: dict[nn.Module, set[int]] = {}
    for root, idxs in plan.items():
        for item in _pruning_group(dg, model, root, idxs):
            layer = item.dep.target.module
            if isinstance(layer, _BN) and layer.weight is not None:
                layer.weight[list(item.idxs)] = 0.0
            elif dg.is_in_channel_pruning_fn(item.dep.handler) and (
                isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)
            ):
                consumers.setdefault(layer, set()).update(int(i) for i in item.idxs)
    cols = {m: sorted(c) for m, c in consumers.items()}
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in cols}

    def probe(module: nn.Module, args: tuple) -> None:
        x = args[0]
        idx = cols[module]
        part = x[:, idx] if isinstance(module, nn.Conv2d) else x[..., idx]
        flat = part.transpose(0, 1) if isinstance(module, nn.Conv2d) else part.movedim(-1, 0)
        seen[module].append(flat.reshape(len(idx), -1).float())

    handles = [m.register_forward_pre_hook(probe) for m in cols]
    was = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    stats = {"folded": 0, "not_constant": 0, "no_target": 0}
    for module, idx in cols.items():
        if not seen[module]:
            stats["not_constant"] += len(idx)
            continue
        values = torch.cat(seen[module], dim=1)
        lo, hi = values.amin(1), values.amax(1)
        const = (hi - lo) <= 1e-6 * (1 + hi.abs())
        if not const.any():
            stats["not_constant"] += len(idx)
            continue
        stats["not_constant"] += int((~const).sum())
        use = [c for c, ok in zip(idx, const.tolist(), strict=True) if ok]
        value = hi[const].to(module.weight.dtype)
        w = module.weight[:, use]
        delta = (w.sum((2, 3)) if w.ndim == 4 else w) @ value
        target = _bias_target(dg, module)
        if target is None:
            stats["no_target"] += len(use)
        elif isinstance(target, nn.Parameter):
            target += delta
            stats["folded"] += len(use)
        else:
            target.running_mean -= delta
            stats["folded"] += len(use)
    return stats


def _bias_target(dg: tp.DependencyGraph, module: nn.Module) -> nn.Parameter | _BN | None:
    """The consumer's bias, else the BN directly after it (conv -> BN), else None."""
    if module.bias is not None:
        return module.bias
    outs = dg.module2node[module].outputs
    if (
        len(outs) == 1
        and isinstance(outs[0].module, _BN)
        and outs[0].module.running_mean is not None
    ):
        return outs[0].module
    return None


def apply_plan(
    model: nn.Module, inputs: tuple, plan: Mapping[str, list[int]], *, fold: bool = True
) -> tuple[nn.Module, list, dict[str, int]]:
    """Prune a copy of ``model`` by ``plan`` through torch-pruning groups.

    Returns the pruned copy, the DependencyGraph's pruning history (replayable by
    :func:`detprune.train.checkpoint.load_model`) and the folding counts.
    """
    pruned = copy.deepcopy(model)
    was = pruned.training
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=inputs)
    stats = fold_removed_channels(pruned, dg, plan, inputs) if fold else {}
    for root, idxs in plan.items():
        _pruning_group(dg, pruned, root, idxs).prune()
    pruned.train(was)
    return pruned, dg.pruning_history(), stats


def default_min_channels(model: nn.Module) -> int:
    """16 (the authors') for paper-sized models with 512+ channel layers, else 4."""
    widest = max((m.num_features for m in model.modules() if isinstance(m, _BN)), default=0)
    return 16 if widest >= 512 else 4


def group_fractions(groups: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
    """The defaults for the entry's groups, overridden by ``options['fractions']``."""
    given = dict(options.get("fractions") or {})
    unknown = sorted(set(given) - set(groups))
    if unknown:
        raise KeyError(
            f"prune.options.<gcp>.fractions: unknown groups {unknown}; known: {sorted(groups)}"
        )
    out = {g: float(given.get(g, DEFAULT_FRACTIONS.get(g, FALLBACK_FRACTION))) for g in groups}
    bad = {g: f for g, f in out.items() if not 0 <= f <= 1}
    if bad:
        raise ValueError(f"prune.options.<gcp>.fractions: not in [0, 1]: {bad}")
    return out


def gcp_prune(ctx: PruneContext, method: Method, target: float | None) -> PruneResult:
    """GCP's procedure: group thresholds, scaled by one bisected factor to ``target``.

    Options (``prune.options.<method>``, declared in
    :data:`detprune.pruning.procedures.options.GCP`): ``fractions`` {group: fraction},
    ``min_channels``, ``fold_beta`` (true), ``max_trials`` (30); ``tolerance`` (2%)
    is the shared one. Without a target the fractions are used as given.
    """
    opts = {**defaults(GCP), **ctx.options}
    if not ctx.entry.groups:
        raise ValueError(f"{ctx.spec['name']}: the registry entry declares no GCP groups")
    fractions = group_fractions(ctx.entry.groups, opts)
    given_min = opts["min_channels"]
    min_ch = int(given_min) if given_min is not None else default_min_channels(ctx.model)
    tolerance = float(opts["tolerance"])
    inputs = (ctx.example,)
    ctx.model.eval()
    units = coupled_units(ctx.model, inputs, ctx.ignored, ctx.entry.groups)
    base = ctx.macs_fn(ctx.model)

    def scaled(k: float) -> dict[str, float]:
        return {g: min(1.0, f * k) for g, f in fractions.items()}

    cache: dict[str, float] = {}

    def kept_at(k: float) -> float:
        plan = select_channels(units, scaled(k), min_ch)
        key = repr(sorted(plan.items()))
        if key not in cache:
            trial, _, _ = apply_plan(ctx.model, inputs, plan, fold=False)
            cache[key] = ctx.macs_fn(trial) / base
        return cache[key]

    trials: list[dict[str, float]] = []
    scale = 1.0
    if target is not None:
        lo, hi = 0.0, 1.0 / max(min([f for f in fractions.values() if f > 0], default=1), 1e-6)
        best = (math.inf, 1.0)
        for _ in range(int(opts["max_trials"])):
            k = (lo + hi) / 2
            kept = kept_at(k)
            err = abs(kept / target - 1)
            trials.append({"scale": k, "kept": kept})
            log.info("GCP scale %.4f keeps %.4f of MACs (target %.3f)", k, kept, target)
            if err < best[0]:
                best = (err, k)
            if err <= tolerance / 4:
                break
            lo, hi = (k, hi) if kept > target else (lo, k)
        scale = best[1]
    plan = select_channels(units, scaled(scale), min_ch)
    pruned, history, folded = apply_plan(ctx.model, inputs, plan, fold=opts["fold_beta"])
    macs = ctx.macs_fn(pruned)
    removed = {
        g: [
            sum(len(plan.get(u.root, [])) for u in units if u.group == g),
            sum(len(u.scores) for u in units if u.group == g),
        ]
        for g in fractions
    }
    # a group scaled to a fraction of 1 keeps only the per-layer minimum: the relative
    # fractions do not suit this detector at this target (set prune.options.<m>.fractions)
    saturated = sorted(g for g, f in scaled(scale).items() if f >= 1.0 and fractions[g] < 1.0)
    if saturated:
        log.warning(
            "GCP: groups %s scaled to fraction 1 keep only %d channels per layer",
            saturated,
            min_ch,
        )
    report = make_report(
        ctx.model,
        pruned,
        target if target is not None else macs / base,
        base,
        macs,
        tolerance,
        allocation="gcp-groups",
        scale=scale,
        fractions=scaled(scale),
        saturated_groups=saturated,
        min_channels=min_ch,
        removed_per_group=removed,
        beta_folding=folded,
        trials=trials,
    )
    return PruneResult(pruned, history, report)
