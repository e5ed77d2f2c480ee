"""The auxiliary networks of the stage-wise procedure: one per stage, built on the stage's
feature, trained on the frozen features before the stage is pruned, their loss, and their
trained state, which the pruned checkpoint carries.

DCP (Zhuang et al., "Discrimination-aware Channel Pruning for Deep Neural Networks",
NeurIPS 2018) classifies (default boxes of a detector, the image for a classifier); LCP
(Xie et al., "Localization-aware Channel Pruning for Object Detection", Neurocomputing
2020) adds contextual RoIAlign and the GIoU regression
(:mod:`detprune.pruning.importance.aux_net`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from detprune.pruning.importance.aux_net import AuxHead, ClassAuxHead, aux_loss, class_aux_loss


def make_heads(
    channels: Sequence[int],
    aux: Sequence[tuple[str, int]],
    num_classes: int,
    opts: dict[str, Any],
    *,
    lcp: bool,
    classify: bool,
) -> nn.ModuleList:
    """One head per ``(feature, stride)`` of ``aux``, reading ``channels[i]`` channels: a
    classifier's image classifier, else DCP's (or, with ``lcp``, LCP's) box head."""
    heads: list[nn.Module] = [
        ClassAuxHead(c, num_classes, stride, channels=int(opts["aux_channels"]))
        if classify
        else AuxHead(
            c,
            num_classes,
            stride,
            context=lcp,
            regress=lcp,
            channels=int(opts["aux_channels"]),
            roi_size=int(opts["roi_size"]),
        )
        for c, (_, stride) in zip(channels, aux, strict=True)
    ]
    return nn.ModuleList(heads)


def head_loss(
    head: nn.Module,
    feature: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    generator: torch.Generator,
    opts: dict[str, Any],
    *,
    classify: bool,
) -> torch.Tensor:
    """The head's auxiliary loss on ``feature`` (the sum of its terms)."""
    if classify:
        return class_aux_loss(head, feature, targets)["cls"]
    losses = aux_loss(
        head,
        feature,
        targets,
        generator,
        m=opts["m"] if opts["m"] == "iou" else float(opts["m"]),
        scales=tuple(opts["anchor_scales"]),
        ratios=tuple(opts["anchor_ratios"]),
        max_pos=int(opts["max_pos"]),
        neg_ratio=float(opts["neg_ratio"]),
    )
    return sum(losses.values())


def fit_head(
    head: nn.Module, n_feats: int, loss_of: Callable[[int, int], torch.Tensor], opts: dict
) -> float:
    """``aux_iters`` SGD steps (``aux_lr``, momentum 0.9) on ``head`` alone, step ``it``
    on ``loss_of(it, it % n_feats)``; the head is left frozen in eval mode. Returns the
    last step's loss."""
    for p in head.parameters():
        p.requires_grad_(True)
    head.train()
    opt = torch.optim.SGD(
        head.parameters(), lr=float(opts["aux_lr"]), momentum=0.9, weight_decay=1e-4
    )
    last = float("nan")
    for it in range(int(opts["aux_iters"])):
        loss = loss_of(it, it % n_feats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    return last


def head_states(
    heads: nn.ModuleList, aux: Sequence[tuple[str, int]]
) -> dict[str, dict[str, torch.Tensor]]:
    """Each head's state_dict (detached CPU copies), keyed by the feature it reads."""
    return {
        path: {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        for head, (path, _) in zip(heads, aux, strict=True)
    }
