"""Fisher information of channel masks over coupled torch-pruning groups (GroupFisher).

A virtual all-ones mask ``m`` multiplies the output of each tap layer (the BatchNorm after
a pruned conv, or the conv / linear itself when there is none). Its per-sample gradient is
``g_nc = sum_hw F * dL/dF``; coupled channels of a group share one mask, so their gradients
add up before squaring: ``Fisher_c = sum_n (sum_layers g_nc)^2 / 2N``.

Liu et al., "Group Fisher Pruning for Practical Network Compression", ICML 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class Tap:
    """One layer whose output channels carry a group's mask: ``idxs`` in the layer map to
    ``root`` channel positions of the group."""

    name: str
    idxs: torch.Tensor
    root: torch.Tensor


@dataclass
class GroupInfo:
    """A prunable group: its root layer, pruning function, width and mask taps."""

    group: tp.Group
    root_name: str
    width: int
    taps: list[Tap] = field(default_factory=list)
    channel_groups: int = 1  # GroupNorm / grouped conv: prune the same slot in every block

    @property
    def root_module(self) -> nn.Module:
        return self.group[0].dep.target.module

    @property
    def pruning_fn(self) -> Callable:
        return self.group[0].dep.handler


def is_out_pruning(dg: tp.DependencyGraph, dep: tp.Dependency) -> bool:
    """Whether ``dep`` removes output channels of a conv / linear layer."""
    module = dep.target.module
    if not isinstance(module, PRUNABLE):
        return False
    pruner = dg.get_pruner_of_module(module)
    return dep.handler != getattr(pruner, "prune_in_channels", None)


def group_taps(dg: tp.DependencyGraph, group: tp.Group) -> list[Tap]:
    """Mask tap points of a group: for every conv / linear whose output channels the group
    removes, the BatchNorm right after it (when that BN is in the group), else the layer."""
    names = dg._module2name
    bns = {item.dep.target.module: (item.idxs, item.root_idxs) for item in group}
    taps = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        if not is_out_pruning(dg, dep):
            continue
        module, layer_idxs, root = dep.target.module, idxs, item.root_idxs
        for out in dg.module2node[module].outputs:
            if isinstance(out.module, _BN) and out.module in bns:
                module = out.module
                layer_idxs, root = bns[module]
                break
        taps.append(
            Tap(
                names[module],
                torch.as_tensor(list(layer_idxs), dtype=torch.long),
                torch.as_tensor(list(root), dtype=torch.long),
            )
        )
    return taps


def prunable_groups(
    dg: tp.DependencyGraph,
    model: nn.Module,
    ignored: Iterable[str],
    keep: Iterable[nn.Module] = (),
) -> list[GroupInfo]:
    """All groups torch-pruning may prune (conv / linear roots, ``ignored`` layers of
    ``model`` and the modules ``keep`` of the graph outside it keep their outputs), with
    their mask taps; rebuild after every pruning step (indices change)."""
    skip = [model.get_submodule(n) for n in ignored] + list(keep)
    out = []
    for group in dg.get_all_groups(ignored_layers=skip, root_module_types=PRUNABLE):
        root = group[0].dep.target.module
        name, width = dg._module2name[root], len(group[0].idxs)
        out.append(GroupInfo(group, name, width, group_taps(dg, group), channel_groups(dg, group)))
    return out


def channel_groups(dg: tp.DependencyGraph, group: tp.Group) -> int:
    """The channel groups of a coupled group (GroupNorm's ``num_groups``, a grouped conv's
    ``groups``; depthwise convs excluded), as torch-pruning's pruners count them: channels
    must go as the same slot of every one of the equal blocks, or GroupNorm breaks."""
    n = 1
    for item in group:
        mod = item.dep.target.module
        if isinstance(mod, nn.Conv2d) and mod.groups == mod.out_channels:
            continue
        pruner = dg.get_pruner_of_module(mod)
        if pruner is None:
            continue
        if dg.is_out_channel_pruning_fn(item.dep.handler):
            n = max(n, int(pruner.get_out_channel_groups(mod)))
        else:
            n = max(n, int(pruner.get_in_channel_groups(mod)))
    return n


def slots(scores: torch.Tensor, groups: int) -> list[tuple[float, list[int]]]:
    """The removable units of a group and their scores: single channels, or with
    ``groups`` channel groups the same slot of every block, scored by the mean over the
    blocks as torch-pruning does, so that GroupNorm keeps equal groups."""
    width = len(scores)
    if groups <= 1 or width % groups:
        return [(float(v), [i]) for i, v in enumerate(scores)]
    block = width // groups
    mean = scores.reshape(groups, block).mean(0)
    return [(float(mean[j]), [j + k * block for k in range(groups)]) for j in range(block)]


class MaskFisher:
    """Accumulates the mask Fisher of every group, separately per loss (``key``).

    Use :meth:`masks` around the forward pass: each tap layer's output is multiplied by a
    leaf all-ones mask (per sample, per channel) whose ``.grad`` is ``g_nc``. After a
    ``backward`` of one loss, :meth:`collect` folds the mask gradients into the Fisher of
    that loss and clears them for the next loss.
    """

    def __init__(self, model: nn.Module, groups: list[GroupInfo], coupling: str = "shared_mask"):
        if coupling not in ("shared_mask", "sum"):
            raise ValueError(f"fisher coupling must be 'shared_mask' or 'sum', got {coupling!r}")
        self.model = model
        self.groups = groups
        self.coupling = coupling
        self.fisher: dict[str, dict[str, torch.Tensor]] = {}
        self.samples: dict[str, int] = {}
        self._masks: dict[str, list[torch.Tensor]] = {}
        self._batch = 1

    @contextmanager
    def masks(self, batch_size: int) -> Iterator[None]:
        """Insert the masks for one forward pass of ``batch_size`` images."""
        self._masks = {}
        self._batch = batch_size
        handles = []
        for name in sorted({t.name for g in self.groups for t in g.taps}):
            module = self.model.get_submodule(name)
            handles.append(module.register_forward_hook(self._hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            shape = output.shape[:2] + (1,) * (output.dim() - 2)
            mask = torch.ones(shape, device=output.device, dtype=output.dtype, requires_grad=True)
            self._masks.setdefault(name, []).append(mask)
            return output * mask

        return fn

    def mask_tensors(self) -> list[torch.Tensor]:
        """Every mask of the last forward pass (leaves for ``backward(inputs=...)``)."""
        return [m for ms in self._masks.values() for m in ms]

    def _per_image(self, name: str) -> torch.Tensor | None:
        """Sum over the calls of a tap of its mask gradients, per image: (batch, C).

        Rows of a linear layer are RoIs; they are summed per image when they split evenly
        over the batch, else their total is spread evenly over the images.
        """
        total = None
        for mask in self._masks.get(name, []):
            if mask.grad is None:
                continue
            g = mask.grad.detach().flatten(1).double()
            rows, n = g.shape[0], self._batch
            if rows != n:
                if rows % n == 0:
                    g = g.reshape(n, rows // n, g.shape[1]).sum(1)
                else:
                    g = (g.sum(0, keepdim=True) / n).expand(n, -1)
            total = g if total is None else total + g
        return None if total is None else total.cpu()

    def collect(self, key: str) -> None:
        """Fold the current mask gradients into the Fisher of ``key``; clear them."""
        per_tap = {name: self._per_image(name) for name in self._masks}
        store = self.fisher.setdefault(key, {})
        for info in self.groups:
            acc = store.setdefault(info.root_name, torch.zeros(info.width, dtype=torch.float64))
            shared = torch.zeros(self._batch, info.width, dtype=torch.float64)
            for tap in info.taps:
                tg = per_tap.get(tap.name)
                if tg is None:
                    continue
                if self.coupling == "shared_mask":
                    shared.index_add_(1, tap.root, tg[:, tap.idxs])
                else:
                    acc.index_add_(0, tap.root, tg[:, tap.idxs].pow(2).sum(0) / 2)
            if self.coupling == "shared_mask":
                acc += shared.pow(2).sum(0) / 2
        self.samples[key] = self.samples.get(key, 0) + self._batch
        for ms in self._masks.values():
            for m in ms:
                m.grad = None

    def scores(self, key: str, root_name: str, width: int) -> torch.Tensor:
        """Mean Fisher per image of ``key`` for a group's channels (zeros if never seen)."""
        acc = self.fisher.get(key, {}).get(root_name)
        if acc is None:
            return torch.zeros(width, dtype=torch.float64)
        return acc / max(self.samples.get(key, 1), 1)


def channel_costs(dg: tp.DependencyGraph, info: GroupInfo, layer_macs: dict[str, int]) -> float:
    """MACs removed (first order) when one channel of the group goes: for every conv /
    linear in the group, its MACs divided by the width of the pruned dimension, times the
    number of its indices per group channel."""
    names = dg._module2name
    cost = 0.0
    for item in info.group:
        module = item.dep.target.module
        if not isinstance(module, PRUNABLE) or names.get(module) not in layer_macs:
            continue
        if is_out_pruning(dg, item.dep):
            dim = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        else:
            dim = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
        cost += layer_macs[names[module]] / max(dim, 1) * len(item.idxs) / max(info.width, 1)
    return cost


def combine(
    tli: torch.Tensor | None, foi: torch.Tensor | None, iri: torch.Tensor | None
) -> torch.Tensor:
    """MIEP's combination ``I = (I_TLI + I_FOI) * I_IRI``; absent terms are left out."""
    parts = [t for t in (tli, foi) if t is not None]
    if not parts:
        raise ValueError("combine needs I_TLI or I_FOI")
    total = sum(parts[1:], parts[0])
    return total * iri if iri is not None else total


class ProgressiveImportance(tp.importance.Importance):
    """torch-pruning importance that reads the accumulated mask Fisher of a group:
    ``(I_TLI + foi_scale * I_FOI) * I_IRI``, divided by the MACs of one channel when
    ``costs`` is given (GroupFisher's normalisation). Scores the channels ``group[0].idxs``
    of the root layer. ``foi_scale`` is 1 in the paper (MIEP, ACM MM 2023); the terms of a
    group are computed once (the scores of one pruning step).
    """

    def __init__(
        self,
        fisher: MaskFisher,
        dg: tp.DependencyGraph,
        groups: list[GroupInfo],
        *,
        tli: bool = True,
        foi: bool = False,
        iri: Callable[[GroupInfo], torch.Tensor] | None = None,
        costs: Mapping[str, float] | None = None,
        foi_scale: float = 1.0,
    ) -> None:
        self.fisher, self.dg, self.tli, self.foi, self.iri, self.costs = (
            fisher,
            dg,
            tli,
            foi,
            iri,
            costs,
        )
        self.foi_scale = foi_scale
        self.groups = {g.root_name: g for g in groups}
        self._parts: dict[str, dict[str, torch.Tensor]] = {}

    def components(self, root_name: str) -> dict[str, torch.Tensor]:
        """I_TLI, I_FOI (unscaled) and I_IRI over the full width of a group (those
        switched on)."""
        if root_name in self._parts:
            return self._parts[root_name]
        info = self.groups[root_name]
        out = {}
        if self.tli:
            out["tli"] = self.fisher.scores("tli", root_name, info.width)
        if self.foi:
            out["foi"] = self.fisher.scores("foi", root_name, info.width)
        if self.iri is not None:
            out["iri"] = self.iri(info)
        self._parts[root_name] = out
        return out

    @torch.no_grad()
    def __call__(self, group: tp.Group) -> torch.Tensor:
        root_name = self.dg._module2name[group[0].dep.target.module]
        parts = self.components(root_name)
        foi = parts.get("foi")
        foi = foi * self.foi_scale if foi is not None else None
        score = combine(parts.get("tli"), foi, parts.get("iri"))
        if self.costs is not None:
            cost = self.costs[root_name]
            score = score / cost if cost > 0 else torch.full_like(score, math.inf)
        return score[torch.as_tensor(list(group[0].idxs), dtype=torch.long)]
