"""DCP's stage-wise procedure, with DCP's or LCP's auxiliary network.

Zhuang et al., "Discrimination-aware Channel Pruning for Deep Neural Networks", NeurIPS
2018; Xie et al., "Localization-aware Channel Pruning for Object Detection",
Neurocomputing 2020 (LCP).

1. Budgets: the ``allocation`` criterion (default ``l1``) is pruned to the FLOPs target on
   a copy (:func:`~detprune.pruning.procedures.oneshot.allocate_widths`); its per-layer
   widths are the channel budgets, so DCP and LCP sit at the FLOPs of the other rows.
   DCP/LCP then choose *which* channels each group keeps.
2. Stages: ``num_aux_losses`` of the registry's ``aux_features`` (evenly spaced) carry an
   auxiliary head; the layers after the last one form the final stage, whose auxiliary
   loss is the detector's own loss. A group belongs to the stage of its first consumer.
3. Stage by stage, shallow to deep: train the stage's auxiliary head on the current
   features (model frozen), then for each group in forward order minimise
   ``mse_weight * L_re + alpha * L_aux`` by greedy selection and SGD
   (:func:`~detprune.pruning.importance.dcp.greedy_select`), and remove the unselected
   channels through the torch-pruning group (masked slices are zero, so this changes
   nothing). ``L_re`` compares each consumer's output with the unpruned model's output
   of that layer, each consumer's error relative to its own output energy
   (``recon_normalize``; :mod:`~detprune.pruning.procedures.reconstruction`).

The selection budget (``batches``, ``select_steps`` or ``channels_per_round``,
``sgd_iters``, ``aux_batches``, ``aux_iters``) is recorded in the report (``dcp.budget``),
with each group's consumers, their output energies and raw errors.

The auxiliary heads are attached to the model only while it is pruned (``_dcp_aux``),
traced into the dependency graph, so their input channels follow the pruning; they are
removed before the model is returned and never appear in the pruning history. Their
trained state_dicts come back in :attr:`PruneResult.aux_heads` (the checkpoint's
``aux_heads``), where LCP's fine-tuning loss picks its head up
(:mod:`detprune.pruning.lcp_loss`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.base import PruneContext, PruneResult
from detprune.pruning.importance.aux_net import (
    aux_positions,
    capture,
    forward_order,
    model_targets,
    run_until,
    stage_of,
)
from detprune.pruning.importance.dcp import (
    Consumer,
    consumer_of,
    fixed_rng,
    greedy_select,
    round_size,
)
from detprune.pruning.procedures.oneshot import allocate_widths, make_report
from detprune.pruning.procedures.options import SHARED, STAGEWISE
from detprune.pruning.procedures.reconstruction import (
    KeptOutputs,
    Reconstruction,
    is_per_roi,
    log_energies,
    teacher_outputs,
)
from detprune.pruning.procedures.stage_heads import fit_head, head_loss, head_states, make_heads
from detprune.utils.options import defaults

if TYPE_CHECKING:
    from detprune.pruning.base import Method

#: The defaults of DCP's and LCP's own options (the shared ``prune`` keys come with the
#: context's options).
DEFAULTS: dict[str, Any] = {k: v for k, v in defaults(STAGEWISE).items() if k not in SHARED}

log = logging.getLogger("detprune.prune.dcp")
AUX = "_dcp_aux"


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if torch.is_tensor(x) else [t.to(device) for t in x]


def _bn_frozen_train(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class _Run:
    """The state of one stage-wise pruning run."""

    def __init__(self, ctx: PruneContext, opts: dict[str, Any], head: str) -> None:
        self.ctx, self.opts, self.dev = ctx, opts, ctx.device
        self.student = copy.deepcopy(ctx.model).to(self.dev).eval()
        teacher = ctx.teacher if ctx.teacher is not None else ctx.model
        if next(teacher.parameters()).device != self.dev:
            teacher = copy.deepcopy(teacher).to(self.dev)
        self.teacher = teacher.eval()
        self.example = _to(ctx.example, self.dev)
        self.order, self.calls = forward_order(self.student, self.example)
        cands = list(ctx.entry.aux_features)
        self.aux = [cands[i] for i in aux_positions(len(cands), int(opts["num_aux_losses"]))]
        self.aux_ends = [self.order[p] for p, _ in self.aux]
        n_cal = max(int(opts["batches"]), int(opts["aux_batches"]))
        self.batches = list(islice(ctx.batches(), n_cal))
        self.targets = [model_targets(self.student, im, t) for im, t in self.batches]
        with torch.no_grad(), capture(self.student, [p for p, _ in self.aux]) as st:
            self.student(self.example)
        # a classifier's auxiliary networks classify the image (DCP's own ResNet setting)
        self.classify = getattr(ctx.entry, "task", "detection") == "classification"
        self.heads = make_heads(
            [st[p][-1].shape[1] for p, _ in self.aux],
            self.aux,
            int(ctx.spec["num_classes"]),
            opts,
            lcp=head == "lcp",
            classify=self.classify,
        ).to(self.dev)
        self.student.add_module(AUX, self.heads)
        self.dg = tp.DependencyGraph().build_dependency(
            self.student, example_inputs=(self.example,), forward_fn=self._trace
        )
        self.kept = KeptOutputs()
        self.records: list[dict[str, Any]] = []

    def _trace(self, model: nn.Module, inputs: tuple) -> tuple:
        with capture(model, [p for p, _ in self.aux]) as st:
            out = model(*inputs)
        return out, [h.proj(st[p][-1]) for h, (p, _) in zip(self.heads, self.aux, strict=True)]

    def gen(self, key: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.ctx.seed) * 100003 + key)

    def aux_terms(self, s: int, feature: torch.Tensor, b: int, key: int) -> torch.Tensor:
        return head_loss(
            self.heads[s],
            feature,
            self.targets[b],
            self.gen(key),
            self.opts,
            classify=self.classify,
        )

    def train_head(self, s: int) -> float:
        """Train stage ``s``'s auxiliary head on the current (frozen) features."""
        path = self.aux[s][0]
        feats = []
        self.student.eval()
        for images, _ in self.batches[: int(self.opts["aux_batches"])]:
            with torch.no_grad(), capture(self.student, [path], stop=path) as st:
                run_until(lambda images=images: self.student(images))
            feats.append(st[path][0])
        return fit_head(
            self.heads[s],
            len(feats),
            lambda it, b: self.aux_terms(s, feats[b], b, 1000 + it),
            self.opts,
        )

    def plan(self, widths: dict[str, list[int]]) -> list[dict[str, Any]]:
        """The groups to prune with their budget, stage and forward position."""
        names = self.dg._module2name
        ignored = [self.student.get_submodule(n) for n in self.ctx.ignored]
        ignored += [h.proj[0] for h in self.heads]
        plans = []
        for group in self.dg.get_all_groups(ignored_layers=ignored):
            root = group[0].dep.target.module
            n = len(group[0].idxs)
            outs = [
                names[it.dep.target.module]
                for it in group
                if self.dg.is_out_channel_pruning_fn(it.dep.handler)
                and names.get(it.dep.target.module) in widths
            ]
            if not outs or widths[outs[0]][0] >= n:
                continue
            pos = [
                self.order[names[it.dep.target.module]]
                for it in group
                if self.dg.is_in_channel_pruning_fn(it.dep.handler)
                and isinstance(it.dep.target.module, (nn.Linear, nn.modules.conv._ConvNd))
                and names.get(it.dep.target.module, AUX).split(".")[0] != AUX
                and names.get(it.dep.target.module) in self.order
            ]
            first = min(pos) if pos else max(self.order.values()) + 1
            plans.append(
                {
                    "root": names[root],
                    "module": root,
                    "handler": group[0].dep.handler,
                    "n": n,
                    "budget": max(1, int(widths[outs[0]][0])),
                    "stage": stage_of(first, self.aux_ends),
                    "first": first,
                }
            )
        return sorted(plans, key=lambda p: (p["stage"], p["first"]))

    def _consumers(self, plan: dict[str, Any]) -> list[Consumer]:
        group = self.dg.get_pruning_group(plan["module"], plan["handler"], list(range(plan["n"])))
        names = self.dg._module2name
        consumers = []
        for it in group:
            if self.dg.is_in_channel_pruning_fn(it.dep.handler):
                mod = it.dep.target.module
                c = consumer_of(names.get(mod, ""), mod, it.idxs, it.root_idxs)
                if c is not None:
                    consumers.append(c)
        return consumers

    def _forward(
        self, b: int, s: int, scored: list[Consumer], per_roi: list[Consumer]
    ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
        """Batch ``b`` through the student as far as stage ``s``'s loss needs: the outputs
        of the scored consumers (and inputs of the per-RoI ones), and the stage's
        auxiliary loss (the detector's own loss in the final stage)."""
        images, targets = self.batches[b]
        final = s == len(self.aux)
        outs = [c.name for c in scored] + ([] if final else [self.aux[s][0]])
        stop = None if final else max(outs, key=lambda n: self.order.get(n, 0))
        ins = [c.name for c in per_roi]
        with capture(self.student, outs, ins, stop, self.calls.get(stop, 1)) as st:
            if final:
                _bn_frozen_train(self.student)
                l_aux = sum(self.student(images, targets).values())
            else:
                self.student.eval()
                run_until(lambda: self.student(images))
                l_aux = self.aux_terms(s, st[self.aux[s][0]][0], b, b)
        self.student.eval()
        return st, l_aux

    def _remove(self, plan: dict[str, Any], keep: torch.Tensor) -> None:
        """Remove the group's channels not in ``keep``, noting the layers' kept outputs."""
        removed = sorted(set(range(plan["n"])) - set(keep.tolist()))
        pruning = self.dg.get_pruning_group(plan["module"], plan["handler"], removed)
        for it in pruning:
            mod = it.dep.target.module
            if self.dg.is_out_channel_pruning_fn(it.dep.handler) and isinstance(
                mod, (nn.Linear, nn.modules.conv._ConvNd)
            ):
                width = mod.weight.shape[1 if getattr(mod, "transposed", False) else 0]
                self.kept.remove(self.dg._module2name[mod], width, it.idxs)
        pruning.prune()

    def prune_group(self, plan: dict[str, Any]) -> None:
        """Select, fit and remove the channels of one group."""
        t0 = time.perf_counter()
        o, s, n_batches = self.opts, plan["stage"], int(self.opts["batches"])
        for p in self.student.parameters():
            p.requires_grad_(False)
        consumers = self._consumers(plan)
        scored = [c for c in consumers if c.scored]
        for c in scored:
            c.weight.requires_grad_(True)
        per_roi = [c for c in scored if is_per_roi(c.name, self.ctx.entry.per_roi_modules)]
        spatial = [c.name for c in scored if c not in per_roi]
        teacher = teacher_outputs(
            self.teacher, spatial, self.batches[:n_batches], self.order, self.calls, self.kept
        )
        recon = Reconstruction(
            spatial, per_roi, teacher, normalize=bool(o["recon_normalize"]), device=self.dev
        )

        def unpruned(b: int) -> dict[str, list[torch.Tensor]]:
            with fixed_rng(b):  # leaves the global RNG as it was
                return self._forward(b, s, scored, per_roi)[0]

        recon.calibrate(unpruned, n_batches)

        def loss_fn(b: int) -> torch.Tensor:
            st, l_aux = self._forward(b, s, scored, per_roi)
            return float(o["mse_weight"]) * recon.error(st, b) + float(o["alpha"]) * l_aux

        per_round = round_size(plan["budget"], int(o["select_steps"]), o["channels_per_round"])
        keep, last = greedy_select(
            consumers,
            plan["n"],
            plan["budget"],
            loss_fn,
            n_batches,
            steps=int(o["select_steps"]),
            sgd_iters=int(o["sgd_iters"]),
            lr=float(o["layer_lr"]),
            per_round=per_round,
        )
        self._remove(plan, keep)
        self._record(plan, per_round, last, recon, time.perf_counter() - t0)

    def _record(
        self, plan: dict[str, Any], per_round: int, loss: float, recon: Reconstruction, secs: float
    ) -> None:
        """The group's entry of the report (``dcp.groups``), and its log line."""
        record = {
            "root": plan["root"],
            "stage": plan["stage"],
            "kept": plan["budget"],
            "channels": plan["n"],
            "rounds": math.ceil(plan["budget"] / per_round),
            "per_round": per_round,
            "loss": loss,
            "consumers": recon.records(),
            "seconds": round(secs, 2),
        }
        self.records.append(record)
        log.info(
            "dcp: %s stage %d kept %d/%d; consumers (output energy -> relative error): %s",
            plan["root"],
            plan["stage"],
            plan["budget"],
            plan["n"],
            ", ".join(
                f"{c['name']} {c['energy']:.3g} -> {c['relative_error_last']:.3g}"
                for c in record["consumers"]
            ),
        )


def _budget(opts: dict[str, Any], run: _Run) -> dict[str, Any]:
    """The selection budget used (the report's ``dcp.budget``)."""
    n = int(opts["batches"])
    keys = ("select_steps", "channels_per_round", "sgd_iters", "aux_batches", "aux_iters")
    return {
        "batches": n,
        "images": sum(len(images) for images, _ in run.batches[:n]),
        **{k: opts[k] for k in keys},
        "recon_normalize": bool(opts["recon_normalize"]),
    }


def stagewise(
    ctx: PruneContext,
    method: Method,
    target: float,
    *,
    head: str,
    lookup: Callable[[str], Method],
) -> PruneResult:
    """Prune ``ctx.model`` to ``target`` of its MACs with DCP (``head="dcp"``) or LCP;
    ``lookup`` finds the ``allocation`` method by name (the registry's ``get_method``)."""
    if head == "lcp" and getattr(ctx.entry, "task", "detection") != "detection":
        raise ValueError(
            f"lcp needs a detector with boxes: {ctx.spec.get('name')!r} is a "
            f"{ctx.entry.task} model (use dcp, whose auxiliary networks classify images)"
        )
    t0 = time.perf_counter()
    opts = {**DEFAULTS, **ctx.options}
    alloc = allocate_widths(ctx, target, opts, lookup)
    t_alloc = time.perf_counter() - t0
    widths = alloc["layers"]
    run = _Run(ctx, opts, head)
    plans = run.plan(widths)
    aux_loss_end = []
    for s in range(len(run.aux) + 1):
        if s < len(run.aux):
            aux_loss_end.append(run.train_head(s))
        for plan in (p for p in plans if p["stage"] == s):
            run.prune_group(plan)
    log_energies(log, run.records, bool(opts["recon_normalize"]))
    student = run.student
    del student._modules[AUX]
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval().cpu()
    history = [list(h) for h in run.dg.pruning_history()]
    if any(h[0].split(".")[0] == AUX for h in history):
        raise RuntimeError("dcp: an auxiliary head entered the pruning history")
    report = make_report(
        ctx.model,
        student,
        target,
        alloc["macs_before"],
        ctx.macs_fn(student),
        float(opts.get("tolerance", 0.02)),
        allocation=f"{opts['allocation']} widths ({alloc['allocation']})",
        dcp={
            "head": head,
            "aux_features": [p for p, _ in run.aux],
            "aux_loss_after_training": aux_loss_end,
            "budget": _budget(opts, run),
            "groups": run.records,
            "allocation_seconds": round(t_alloc, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    return PruneResult(student, history, report, aux_heads=head_states(run.heads, run.aux))
