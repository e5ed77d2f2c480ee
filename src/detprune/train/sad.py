"""Spatial-attention distillation (SAD) from the unpruned teacher while fine-tuning.

Niu et al., "Group channel pruning and spatial attention distilling for object
detection", Applied Intelligence 2022 (arXiv 2306.01526). At every tapped layer
(the registry entry's ``distill_taps``; a tap returning a dict or a list, such as the
FPN, gives one tap per level) A(F) = L2-normalise(flatten(mean over channels of F^2))
for teacher and student, and

    loss_sad = sum_l w_l * mean((A_t - A_s)^2),   w_l = weights[group of tap l]

which needs no adapter: A does not depend on the channel count. Optional output
distillation (``output: true``): binary KL at temperature T between the sigmoid class
logits of the ``cls_logits`` taps (times T^2) and an L2 between the decoded boxes
(the RPN's proposals for detectors with torchvision's RPN, or the raw outputs of
``box_taps``), each weighted 1e-3 as in the authors' code.

The teacher runs its own forward in eval mode, without gradients, on the same list of
images as the student, and is stopped as soon as every tapped module has produced as
many outputs as the student's did. With the registry's single training size, the
teacher's eval transform builds the same batch tensor as the student's train transform.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.rpn import concat_box_prediction_layers

from detprune.models import MODELS
from detprune.train.distill_base import DistillFactory, LossHook
from detprune.train.options import SAD_OPTIONS
from detprune.utils.options import defaults

log = logging.getLogger("detprune.distill")

# The authors weight early backbone taps 1e6 and neck taps 1e3..1e4 (YOLOv4, 416 px, a
# batch-summed detection loss). The per-tap loss here is a mean over the H*W positions
# of maps whose squared entries sum to 1 (it scales as 1/(H*W)), next to torchvision's
# batch-mean detection loss. We keep the authors' 100:1 backbone:neck ratio and set the
# scale on the default detector (GCP-pruned, 2 x 60 fine-tuning iterations), chosen on the
# val split (benchmarks/method_fidelity.md). Scale s means backbone taps 1e2 * s, neck and
# head s. mAP at 50 / 25 % FLOPs: plain fine-tuning 58.2 / 48.0; s = 10: 48.6 / 9.0; s = 1:
# 59.2 / 45.0; s = 0.1: 58.3 / 47.2 (val, before the test split existed). At 10 %, val AP
# (2026-12-07, paired image interval against s = 1): plain 27.9, s = 1 23.2, s = 0.1 26.3
# (+3.2 [1.9, 4.4]), s = 0.01 27.1 (+3.9 [2.3, 5.4]). s = 0.1: best at 25 %, within noise of
# the best at 10 % while SAD still acts; no scale beat plain fine-tuning at 10 %.
DEFAULT_WEIGHTS: dict[str, float] = {
    "stride2": 10.0,
    "stride4": 10.0,
    "stride8": 10.0,
    "stride16": 10.0,
    "stride32": 10.0,
    "stride64": 10.0,
    "neck": 0.1,
    "head": 0.1,
}
FALLBACK_WEIGHT = 1.0


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """A(F): the L2-normalised, flattened channel mean of F^2, shape (B, H*W)."""
    if feature.ndim != 4:
        raise ValueError(f"attention_map: expected (B, C, H, W), got {tuple(feature.shape)}")
    return F.normalize(feature.float().pow(2).mean(1).flatten(1), p=2, dim=1)


def attention_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """mean((A(teacher) - A(student))^2); the channel counts may differ."""
    if teacher.shape[0] != student.shape[0] or teacher.shape[-2:] != student.shape[-2:]:
        raise ValueError(
            f"SAD: teacher map {tuple(teacher.shape)} and student map {tuple(student.shape)} "
            "differ in batch or spatial size"
        )
    return (attention_map(teacher) - attention_map(student)).pow(2).mean()


def sigmoid_kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean binary KL(p_t || p_s), p = sigmoid(logit / T), times T^2 (Hinton et al. 2015)."""
    t, s = teacher.float() / temperature, student.float() / temperature
    pt = torch.sigmoid(t)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.mean() * temperature**2


def _tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a module output: a tensor, or a dict / list / tuple of them."""
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Iterable) and not isinstance(output, str):
        return [t for o in output for t in _tensors(o)]
    return []


class _TapsDone(Exception):
    """Raised inside the teacher's forward once every tap has its outputs."""


class _Recorder:
    """Forward hooks collecting the outputs of named modules (one list per module)."""

    def __init__(self, model: nn.Module, paths: Sequence[str], *, always: bool) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.out: dict[str, list[Any]] = {p: [] for p in self.paths}
        self.stop_at: dict[str, int] | None = None
        self.always = always  # record without gradients too (the teacher)
        self.handles = [
            model.get_submodule(p).register_forward_hook(self._hook(p)) for p in self.paths
        ]

    def _hook(self, path: str):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            if not self.always and not torch.is_grad_enabled():
                return
            self.out[path].append(output)
            if self.stop_at is not None and all(
                len(self.out[p]) >= n for p, n in self.stop_at.items()
            ):
                raise _TapsDone

        return fn

    def clear(self) -> None:
        for p in self.paths:
            self.out[p] = []

    def tensors(self, path: str) -> list[torch.Tensor]:
        return [t for o in self.out[path] for t in _tensors(o)]


def _rpn_boxes(rpn: nn.Module, head_output: tuple, anchors: list[torch.Tensor]) -> torch.Tensor:
    """The RPN's decoded proposals (before NMS) from its head's (objectness, deltas)."""
    objectness, deltas = head_output
    _, regression = concat_box_prediction_layers(list(objectness), list(deltas))
    return rpn.box_coder.decode(regression.float(), anchors).view(-1, 4)


def sad(
    student: nn.Module,
    teacher: nn.Module,
    spec: dict[str, Any],
    options: dict[str, Any],
    aux_heads: Mapping[str, Any] | None = None,
) -> LossHook:
    """SAD loss hook: ``loss_sad`` (+ ``loss_sad_kl``, ``loss_sad_box`` with ``output``).
    (``aux_heads``, the pruned checkpoint's auxiliary heads, are not used.)

    Options (``finetune.methods.<m>.distill_options``): ``weights`` {group: w},
    ``taps`` {module: group} (default: the entry's ``distill_taps``), ``output``
    (false), ``temperature`` (3), ``kl_weight`` (1e-3), ``box_weight`` (1e-3),
    ``box_taps`` (modules for the box L2 when the detector has no RPN).
    """
    entry = MODELS[spec["name"]]
    opts = {**defaults(SAD_OPTIONS), **options}
    taps: dict[str, str] = dict(opts["taps"] or entry.distill_taps)
    if not taps:
        raise ValueError(f"SAD: {spec['name']} declares no distill_taps")
    weights = {**DEFAULT_WEIGHTS, **(opts["weights"] or {})}
    output = bool(opts["output"])
    temperature = float(opts["temperature"])
    kl_weight = float(opts["kl_weight"])
    box_weight = float(opts["box_weight"])
    logit_taps = list(entry.cls_logits) if output else []
    use_rpn = output and hasattr(student, "rpn") and hasattr(student.rpn, "box_coder")
    box_taps = list(opts["box_taps"] or []) if output and not use_rpn else []
    paths = list(taps) + logit_taps + box_taps + (["rpn.head"] if use_rpn else [])

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    s_rec = _Recorder(student, paths, always=False)
    t_rec = _Recorder(teacher, paths, always=True)
    rpn_inputs: list[tuple] = []

    def keep_rpn_inputs(module: nn.Module, args: tuple) -> None:
        rpn_inputs[:] = [args]

    student.register_forward_pre_hook(lambda module, args: s_rec.clear())
    if use_rpn:
        student.rpn.register_forward_pre_hook(keep_rpn_inputs)

    def run_teacher(images: list[torch.Tensor]) -> None:
        device = images[0].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.eval()
        t_rec.clear()
        t_rec.stop_at = {p: len(s_rec.out[p]) for p in paths}
        try:
            with torch.no_grad():
                teacher(images)
        except _TapsDone:
            pass
        finally:
            t_rec.stop_at = None

    def hook(model: nn.Module, images: list, targets: list, losses: dict) -> dict:
        if not all(s_rec.out[p] for p in paths):
            raise RuntimeError(f"SAD: the student's forward did not reach every tap {paths}")
        run_teacher(images)
        total = None
        for path, group in taps.items():
            w = float(weights.get(group, FALLBACK_WEIGHT))
            t_maps, s_maps = t_rec.tensors(path), s_rec.tensors(path)
            if len(t_maps) != len(s_maps):
                raise RuntimeError(
                    f"SAD: tap {path}: teacher {len(t_maps)} maps, student {len(s_maps)}"
                )
            for t, s in zip(t_maps, s_maps, strict=True):
                term = w * attention_loss(t, s)
                total = term if total is None else total + term
        losses = dict(losses)
        losses["loss_sad"] = total
        if output:
            kl = [
                sigmoid_kl(t, s, temperature)
                for p in logit_taps
                for t, s in zip(t_rec.tensors(p), s_rec.tensors(p), strict=True)
            ]
            if kl:
                losses["loss_sad_kl"] = kl_weight * torch.stack(kl).mean()
            box = []
            if use_rpn:
                image_list, features = rpn_inputs[-1][:2]
                anchors = student.rpn.anchor_generator(image_list, list(features.values()))
                s_boxes = _rpn_boxes(student.rpn, s_rec.out["rpn.head"][-1], anchors)
                t_boxes = _rpn_boxes(teacher.rpn, t_rec.out["rpn.head"][-1], anchors)
                box.append(F.mse_loss(s_boxes, t_boxes))
            for p in box_taps:
                for t, s in zip(t_rec.tensors(p), s_rec.tensors(p), strict=True):
                    box.append(F.mse_loss(s.float(), t.float()))
            if box:
                losses["loss_sad_box"] = box_weight * torch.stack(box).mean()
        s_rec.clear()
        t_rec.clear()
        return losses

    return hook


SAD_LOSSES: dict[str, DistillFactory] = {"sad": sad}
