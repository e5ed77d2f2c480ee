"""DCP's reconstruction term ``L_re`` over the consumers of a group, and its bookkeeping.

Zhuang et al., "Discrimination-aware Channel Pruning for Deep Neural Networks", NeurIPS
2018: a layer's reconstruction error is the MSE between its output in the pruned and in
the unpruned network. A torch-pruning group here often has several consumers (an FPN
lateral, the next stage's convs, the BN-free RPN conv, which runs once per pyramid level)
whose outputs differ in scale by orders of magnitude (the RPN conv's error reached 1.6e5):
summed raw, the largest-scale consumer alone decides which channels stay. With
``recon_normalize: true`` each consumer's error is weighted by ``mean_E / E_c``:
``E_c = mean(Y^2)`` of its unpruned output, averaged over the calibration batches (summed
over the calls of a layer that runs more than once, as its error is), ``mean_E`` the mean
of the group's consumers' energies. Every consumer then contributes its relative error,
and the term keeps the raw sum's overall scale (it is the raw sum when the energies are
equal), so its balance with the auxiliary loss and the per-layer SGD step stay as tuned:
dividing by ``E_c`` alone scaled the term to ~1 and cost 6.5 val AP at 10 % FLOPs
(benchmarks/method_fidelity.md). ``recon_normalize: false``, the default chosen on val,
is the raw sum: at 10 % FLOPs it gave 19.0 val AP against 15.8 energy-weighted, and on the
trained default detector every consumer still ended below relative error 1 with it.

Spatial consumers are compared with the unpruned model's output of the layer (the
teacher's, sliced to the output channels the student still has, :class:`KeptOutputs`);
per-RoI layers (whose RoIs differ between the two models) with the layer's own output
before pruning, on the same input (:func:`reference_output`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detprune.pruning.importance.aux_net import capture, run_until
from detprune.pruning.importance.dcp import Consumer

#: the smallest output energy a consumer is divided by (a dead layer)
MIN_ENERGY = 1e-12


def reference_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output for input ``x`` with ``weight`` in place of its own."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def is_per_roi(name: str, prefixes: Sequence[str]) -> bool:
    """Whether module ``name`` is one of (or inside) the per-RoI modules ``prefixes``."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class KeptOutputs:
    """The output channels each pruned conv/linear still has (indices into the unpruned
    layer's), to slice the unpruned teacher's outputs to the student's."""

    def __init__(self) -> None:
        self.kept: dict[str, torch.Tensor] = {}

    def slice(self, name: str, module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The teacher output ``t`` of layer ``name`` restricted to the kept channels."""
        if name not in self.kept:
            return t
        dim = -1 if isinstance(module, nn.Linear) else 1
        return t.index_select(dim, self.kept[name].to(t.device))

    def remove(self, name: str, width: int, idxs: Sequence[int]) -> None:
        """Output channels ``idxs`` (of the current ``width``) of layer ``name`` removed."""
        mask = torch.ones(width, dtype=torch.bool)
        mask[torch.as_tensor(list(idxs), dtype=torch.long)] = False
        self.kept[name] = self.kept.get(name, torch.arange(width))[mask]


def teacher_outputs(
    teacher: nn.Module,
    names: list[str],
    batches: Sequence[tuple[list, list]],
    order: dict[str, int],
    calls: dict[str, int],
    kept: KeptOutputs,
) -> list[dict[str, list[torch.Tensor]]]:
    """Per batch, the unpruned outputs of layers ``names`` (one per call), sliced to the
    student's kept channels; the forward stops after the last of them."""
    if not names:
        return [{} for _ in batches]
    stop = max(names, key=lambda n: order.get(n, 0))
    outs = []
    for images, _ in batches:
        with torch.no_grad(), capture(teacher, names, (), stop, calls.get(stop, 1)) as st:
            run_until(lambda images=images: teacher(images))
        outs.append(
            {n: [kept.slice(n, teacher.get_submodule(n), t) for t in ts] for n, ts in st.items()}
        )
    return outs


class Reconstruction:
    """``L_re`` of one group: the MSE of each consumer's output (each call), divided by the
    consumer's unpruned output energy when ``normalize``. It records per consumer that
    energy and its raw error (summed over the calls) at the first and the last evaluation
    of each batch, for the prune report."""

    def __init__(
        self,
        spatial: list[str],
        per_roi: Sequence[Consumer],
        teacher: list[dict[str, list[torch.Tensor]]],
        *,
        normalize: bool,
        device: torch.device,
    ) -> None:
        self.spatial, self.per_roi, self.teacher = list(spatial), list(per_roi), teacher
        self.normalize, self.device = normalize, device
        self.snap = {c.name: c.weight.detach().clone() for c in self.per_roi}
        self.names = self.spatial + [c.name for c in self.per_roi]
        self.energy: dict[str, float] = {}
        self.weight: dict[str, float] = {}
        self.first: dict[int, dict[str, float]] = {}
        self.last: dict[int, dict[str, float]] = {}

    def _pairs(self, st: dict, b: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(consumer, output, unpruned output) of every call of every consumer."""
        for name in self.spatial:
            for y, f in zip(st[name], self.teacher[b][name], strict=True):
                yield name, y, f
        for c in self.per_roi:
            for y, x in zip(st[c.name], st[f"{c.name}:in"], strict=True):
                yield c.name, y, reference_output(c.module, x.detach(), self.snap[c.name])

    def calibrate(self, forward: Callable[[int], dict], n_batches: int) -> None:
        """Each consumer's energy ``sum over calls of mean(Y^2)`` of its unpruned output,
        averaged over ``n_batches`` batches. ``forward(b)`` returns what :func:`capture`
        recorded on batch ``b`` (only needed for per-RoI consumers, whose inputs come from
        the student)."""
        sums = dict.fromkeys(self.names, 0.0)
        for b in range(n_batches):
            for name in self.spatial:
                sums[name] += sum(_energy(f) for f in self.teacher[b][name])
            if not self.per_roi:
                continue
            with torch.no_grad():
                st = forward(b)
                for c in self.per_roi:
                    w = self.snap[c.name]
                    sums[c.name] += sum(
                        _energy(reference_output(c.module, x, w)) for x in st[f"{c.name}:in"]
                    )
        self.energy = {n: s / max(n_batches, 1) for n, s in sums.items()}
        mean = sum(self.energy.values()) / max(len(self.energy), 1)
        self.weight = {n: mean / max(e, MIN_ENERGY) for n, e in self.energy.items()}

    def error(self, st: dict, b: int) -> torch.Tensor:
        """``L_re`` of batch ``b`` from the captured outputs ``st``."""
        l_re = torch.zeros((), device=self.device)
        raw: dict[str, torch.Tensor] = {}
        for name, y, f in self._pairs(st, b):
            term = F.mse_loss(y, f)
            raw[name] = raw.get(name, 0.0) + term.detach()
            l_re = l_re + (term * self.weight[name] if self.normalize else term)
        floats = torch.stack(list(raw.values())).tolist() if raw else []
        values = dict(zip(raw, floats, strict=True))
        self.first.setdefault(b, values)
        self.last[b] = values
        return l_re

    def records(self) -> list[dict[str, Any]]:
        """Per consumer: its energy (the normaliser), its raw error at the first evaluation
        (no channel selected) and at the last one, and the last relative error, each
        averaged over the batches."""

        def mean(per_batch: dict[int, dict[str, float]], name: str) -> float:
            values = [v[name] for v in per_batch.values() if name in v]
            return _sig(sum(values) / len(values)) if values else float("nan")

        out = []
        for name in self.names:
            energy = self.energy.get(name, float("nan"))
            last = mean(self.last, name)
            out.append(
                {
                    "name": name,
                    "per_roi": name in self.snap,
                    "energy": _sig(energy),
                    "raw_error_first": mean(self.first, name),
                    "raw_error_last": last,
                    "relative_error_last": _sig(last / max(energy, MIN_ENERGY)),
                }
            )
        return out


def log_energies(log: logging.Logger, records: list[dict[str, Any]], normalize: bool) -> None:
    """One line: how far apart the output energies of the groups' ``consumers`` are."""
    energies = [c["energy"] for g in records for c in g["consumers"] if c["energy"] > 0]
    if energies:
        log.info(
            "dcp: L_re %s over %d consumers of %d groups; output energies %.3g to %.3g (x%.3g)",
            "relative (recon_normalize)" if normalize else "raw sum (recon_normalize false)",
            len(energies),
            len(records),
            min(energies),
            max(energies),
            max(energies) / min(energies),
        )


def _energy(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean())


def _sig(x: float) -> float:
    """``x`` to 5 significant digits (a readable report)."""
    return float(f"{x:.5g}")
