"""LCP's auxiliary-network loss added during fine-tuning.

Xie et al., "Localization-aware Channel Pruning for Object Detection", Neurocomputing
2020: the pruned detector is fine-tuned with ``L_a`` (contextual-RoIAlign classification
+ m-weighted GIoU regression of an auxiliary network) added to its own losses.

The auxiliary head is trained jointly, but it is not part of the model (the checkpoint
keeps the registry architecture): the hook owns the head and a small SGD optimizer of its
own. The term ``loss_lcp_aux`` returned to the engine carries the gradient into the
model; the same backward fills the head's gradients, and the engine steps the head's
optimizer (:meth:`LCPAuxLoss.optimizers`) right after the model's, in the same
iteration: under AMP through the same GradScaler, so the head sees unscaled gradients and
a step with inf/NaN gradients is skipped.

Which head: the one the pruning trained (LCP's stage-wise procedure,
:mod:`detprune.pruning.procedures.stagewise`), which the pruned checkpoint carries
(``aux_heads``). The head reads ``feature`` (default: the deepest feature that carries a
trained head, else the deepest ``aux_features`` entry); with ``reuse_head`` (default) it
starts from that trained head when the shapes fit, otherwise (no head in the checkpoint,
or other shapes) from a fresh one, and the log says which. The head is created at the
first call, with the feature's channel count; the one trained here is not saved.

Options (``finetune.methods.lcp.distill_options``): ``weight`` of ``L_a`` (1.0), ``lr``
(0.01), ``momentum`` (0.9), ``weight_decay`` (1e-4), ``reuse_head`` (true), ``feature``
(null), ``m`` (``iou`` or a number), and the head/box settings of DCP/LCP's pruning stage:
declared in :data:`detprune.pruning.procedures.options.LCP_LOSS`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from detprune.models import MODELS
from detprune.pruning.importance.aux_net import AuxHead, aux_loss, model_targets
from detprune.pruning.procedures.options import LCP_LOSS
from detprune.train.distill_base import DistillFactory, LossHook
from detprune.utils.options import defaults

DEFAULTS: dict[str, Any] = defaults(LCP_LOSS)
log = logging.getLogger("detprune.train.lcp")


def head_feature(
    aux_features: Sequence[tuple[str, int]], feature: str | None, trained: Mapping[str, Any]
) -> tuple[str, int]:
    """The (module, stride) the fine-tuning head reads: ``feature`` if given, else the
    deepest of ``aux_features`` with a head in ``trained``, else the deepest one."""
    strides = dict(aux_features)
    if feature is not None:
        if feature not in strides:
            raise ValueError(
                f"lcp: distill_options.feature {feature!r} is not one of the detector's "
                f"aux_features {sorted(strides)}"
            )
        return feature, strides[feature]
    with_head = [p for p, _ in aux_features if p in trained]
    path = with_head[-1] if with_head else aux_features[-1][0]
    return path, strides[path]


def misfit(head: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading into ``head``: missing or unexpected keys and
    tensors of another shape (``[]``: it fits)."""
    own = head.state_dict()
    out = [f"missing {k}" for k in own if k not in state]
    out += [f"unexpected {k}" for k in state if k not in own]
    out += [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    return out


class LCPAuxLoss:
    """Loss hook adding LCP's ``L_a`` on one auxiliary feature as ``loss_lcp_aux``."""

    def __init__(
        self,
        student: nn.Module,
        spec: dict[str, Any],
        options: dict[str, Any],
        aux_heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ):
        entry = MODELS[spec["name"]]
        if entry.task != "detection":
            raise ValueError(
                f"lcp needs a detector with boxes: {spec['name']!r} is a {entry.task} model"
            )
        if not entry.aux_features:
            raise ValueError(f"lcp: detector {spec['name']!r} declares no aux_features")
        self.opts = {**DEFAULTS, **options}
        trained = dict(aux_heads or {})
        self.path, self.stride = head_feature(entry.aux_features, self.opts["feature"], trained)
        self.init = trained.get(self.path) if self.opts["reuse_head"] else None
        if self.opts["reuse_head"] and self.init is None:
            log.warning(
                "lcp: the checkpoint carries no auxiliary head on %s (heads: %s); "
                "fine-tuning starts from a fresh head",
                self.path,
                sorted(trained) or "none",
            )
        self.reused = False
        self.num_classes = int(spec["num_classes"])
        self.head: AuxHead | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.feature: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(int(self.opts["seed"]))
        self.handle = student.get_submodule(self.path).register_forward_hook(self._grab)

    def _grab(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.feature = out

    def _build(self, feature: torch.Tensor) -> None:
        o = self.opts
        self.head = AuxHead(
            feature.shape[1],
            self.num_classes,
            self.stride,
            context=True,
            regress=True,
            channels=int(o["aux_channels"]),
            roi_size=int(o["roi_size"]),
        )
        if self.init is not None:
            self._start_from(self.head, self.init)
        self.head.to(feature.device)
        self.optimizer = torch.optim.SGD(
            self.head.parameters(),
            lr=float(o["lr"]),
            momentum=float(o["momentum"]),
            weight_decay=float(o["weight_decay"]),
        )

    def _start_from(self, head: AuxHead, state: Mapping[str, torch.Tensor]) -> None:
        problems = misfit(head, state)
        if problems:
            log.warning(
                "lcp: the auxiliary head trained while pruning does not fit the fine-tuning "
                "head on %s (%s); fine-tuning starts from a fresh head",
                self.path,
                "; ".join(problems[:4]),
            )
            return
        head.load_state_dict(dict(state))
        self.reused = True
        log.info("lcp: fine-tuning starts from the auxiliary head trained on %s", self.path)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The head's optimizer (once the head exists), which the engine steps."""
        return [self.optimizer] if self.optimizer is not None else []

    def __call__(
        self, model: nn.Module, images: list, targets: list, losses: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if self.feature is None:
            raise RuntimeError(f"lcp: {self.path} did not run in the forward pass")
        if self.head is None:
            self._build(self.feature)
        assert self.head is not None
        self.head.train(model.training)
        o = self.opts
        terms = aux_loss(
            self.head,
            self.feature,
            model_targets(model, images, targets),
            self.generator,
            m=o["m"] if o["m"] == "iou" else float(o["m"]),
            scales=tuple(o["anchor_scales"]),
            ratios=tuple(o["anchor_ratios"]),
            max_pos=int(o["max_pos"]),
            neg_ratio=float(o["neg_ratio"]),
        )
        self.feature = None
        out = dict(losses)
        out["loss_lcp_aux"] = float(o["weight"]) * sum(terms.values())
        return out


def lcp_aux_loss(
    student: nn.Module,
    teacher: nn.Module,
    spec: dict[str, Any],
    options: dict[str, Any],
    aux_heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> LossHook:
    """LCP fine-tuning: ``L_a`` of a jointly trained auxiliary head (no teacher needed),
    starting from the pruning's trained head in ``aux_heads`` (see the module)."""
    return LCPAuxLoss(student, spec, options, aux_heads)


LCP_LOSSES: dict[str, DistillFactory] = {"lcp": lcp_aux_loss}
