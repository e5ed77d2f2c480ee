"""Group channel pruning (GCP) with beta folding.

Niu et al., "Group channel pruning and spatial attention distilling for object
detection", Applied Intelligence 2022 (arXiv 2306.01526). The detector is split into
groups by feature scale and module type (the registry entry's ``groups``); every group
has its own pruning fraction (:mod:`detprune.pruning.procedures.gcp_alloc` spreads a
FLOPs target over them, each at most ``max_layer_ratio``), turned into a |gamma|
threshold within the group; each layer keeps at least max(1% of its channels,
``min_channels``) (the authors' floor) and ceil((1 - ``max_layer_ratio``) * C) (every
other method's); coupled layers share one mask (torch-pruning groups, scored by the max
|gamma| of their BNs: the OR-merge of the authors' masks), and the beta of removed BN
channels is folded into the next layer.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.base import PruneResult
from detprune.pruning.importance.fisher import channel_groups, slots
from detprune.pruning.importance.magnitude import GammaImportance
from detprune.pruning.procedures.gcp_alloc import (
    bisect_scale,
    floor_share,
    fraction_ceiling,
    group_fractions,
    group_report,
    saturated,
    scale_fractions,
    summary_line,
)
from detprune.pruning.procedures.oneshot import make_report
from detprune.pruning.procedures.options import GCP
from detprune.utils.options import defaults

if TYPE_CHECKING:
    from detprune.pruning.base import Method, PruneContext

log = logging.getLogger("detprune.prune.gcp")
_BN = nn.modules.batchnorm._BatchNorm
ROOT_TYPES = (nn.Conv2d, nn.Linear)
Plan = dict[str, list[int]]  # root layer -> the channel indices it loses


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
    """The authors' floor: max(1% of C, ``min_channels``) channels, at most C."""
    return min(channels, max(math.ceil(0.01 * channels), min_channels))


def layer_floor(channels: int, min_channels: int, max_layer_ratio: float = 1.0) -> int:
    """Channels a layer keeps at least: the authors' :func:`layer_minimum` and, as in every
    other method, ceil((1 - ``max_layer_ratio``) * C); at most C. ``max_layer_ratio`` 1
    leaves the authors' floor alone."""
    share = floor_share(channels, max_layer_ratio)
    return min(channels, max(layer_minimum(channels, min_channels), share))


def select_channels(
    units: Sequence[Unit],
    fractions: Mapping[str, float],
    min_channels: int,
    *,
    max_layer_ratio: float = 1.0,
) -> dict[str, list[int]]:
    """Channels to remove per coupled group (root name -> root channel indices).

    Within a scale group the ``round(fraction * N)`` lowest-scored of its N channels go
    (ties: earlier group, then lower index), i.e. everything under the group's |gamma|
    threshold, except that a coupled group keeps its :func:`layer_floor` best channels.
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
            width = len(unit.scores)
            cap = width - layer_floor(width, min_channels, max_layer_ratio)
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


def _kept_counter(
    ctx: PruneContext, inputs: tuple, plan_at: Callable[[float], Plan], base: int
) -> Callable[[float], float]:
    """``kept_at(k)``: the MACs share the plan of factor k keeps (cached by plan)."""
    cache: dict[str, float] = {}

    def kept_at(k: float) -> float:
        plan = plan_at(k)
        key = repr(sorted(plan.items()))
        if key not in cache:
            trial, _, _ = apply_plan(ctx.model, inputs, plan, fold=False)
            cache[key] = ctx.macs_fn(trial) / base
        return cache[key]

    return kept_at


def _settings(ctx: PruneContext) -> dict[str, Any]:
    """The GCP options of ``ctx`` over their defaults, resolved: the entry's group
    ``fractions``, ``min_channels``, and the fraction ``ceiling`` of the ``allocation``."""
    opts = {**defaults(GCP), **ctx.options}
    if not ctx.entry.groups:
        raise ValueError(f"{ctx.spec['name']}: the registry entry declares no GCP groups")
    given, ratio = opts["min_channels"], float(opts["max_layer_ratio"])
    min_ch = int(given) if given is not None else default_min_channels(ctx.model)
    return {
        **opts,
        "fractions": group_fractions(ctx.entry.groups, opts),
        "min_channels": min_ch,
        "max_layer_ratio": ratio,
        "ceiling": fraction_ceiling(str(opts["allocation"]), ratio),
        "tolerance": float(opts["tolerance"]),
    }


def gcp_prune(ctx: PruneContext, method: Method, target: float | None) -> PruneResult:
    """GCP's procedure: group thresholds, scaled by one bisected factor to ``target``.

    Options (``prune.options.<method>``, declared in
    :data:`detprune.pruning.procedures.options.GCP`): ``fractions`` {group: fraction},
    ``allocation`` ("capped": no group above ``max_layer_ratio``, the rest water-filled;
    "saturating": groups up to 1, the earlier rule), ``min_channels``, ``fold_beta``
    (true), ``max_trials`` (30); ``max_layer_ratio`` (0.9: the fraction cap and the
    per-layer floor) and ``tolerance`` (2%) are the shared ones. Without a target the
    fractions are used as given (at most the cap).
    """
    s = _settings(ctx)
    fractions, ceiling, ratio = s["fractions"], s["ceiling"], s["max_layer_ratio"]
    inputs = (ctx.example,)
    ctx.model.eval()
    units = coupled_units(ctx.model, inputs, ctx.ignored, ctx.entry.groups)
    base = ctx.macs_fn(ctx.model)

    def plan_at(k: float) -> Plan:
        scaled = scale_fractions(fractions, k, ceiling)
        return select_channels(units, scaled, s["min_channels"], max_layer_ratio=ratio)

    scale, trials = 1.0, []
    if target is not None:
        kept_at = _kept_counter(ctx, inputs, plan_at, base)
        scale, trials = bisect_scale(
            kept_at,
            fractions,
            target,
            ceiling=ceiling,
            tolerance=s["tolerance"],
            max_trials=int(s["max_trials"]),
        )
    plan = plan_at(scale)
    pruned, history, folded = apply_plan(ctx.model, inputs, plan, fold=s["fold_beta"])
    macs = ctx.macs_fn(pruned)
    scaled = scale_fractions(fractions, scale, ceiling)
    at_cap = saturated(fractions, scaled, ceiling)
    groups = group_report(units, plan, scaled, at_cap)
    log.info("%s", summary_line(groups, ceiling, macs / base))
    if at_cap and ceiling >= 1.0:
        log.warning("GCP: groups %s at fraction 1 keep only the per-layer floor", at_cap)
    report = make_report(
        ctx.model,
        pruned,
        target if target is not None else macs / base,
        base,
        macs,
        s["tolerance"],
        allocation=f"gcp-groups ({s['allocation']}, fractions at most {ceiling:g})",
        fraction_allocation=s["allocation"],
        fraction_cap=ceiling,
        scale=scale,
        fractions_given=fractions,
        fractions=scaled,
        saturated_groups=at_cap,
        min_channels=s["min_channels"],
        max_layer_ratio=ratio,
        removed_per_group={g: [v["removed"], v["total"]] for g, v in groups.items()},
        groups=groups,
        beta_folding=folded,
        trials=trials,
    )
    return PruneResult(pruned, history, report)
