"""Auxiliary networks on a detector's intermediate features, for DCP and LCP.

DCP (Zhuang et al., "Discrimination-aware Channel Pruning for Deep Neural Networks",
NeurIPS 2018) attaches a classification network to each pruning stage; for detection its
auxiliary loss is classification of default boxes. LCP (Xie et al., "Localization-aware
Channel Pruning for Object Detection", Neurocomputing 2020) replaces it by a
localization-aware head: contextual RoIAlign ``F_O = RoIAlign(F, B) + RoIAlign(F, C)``
over a default box ``B`` and the smallest box ``C`` enclosing ``B`` and its matched ground
truth ``A``, a classification loss and a GIoU regression loss weighted by ``m``.

"Default boxes" are a fixed grid of anchors per feature map (stride-sized, a few scales and
ratios), matched to the ground truth as SSD does (IoU >= 0.5, plus each ground truth's
best anchor). Hard-negative mining over every anchor would need RoIAlign on all of them,
so negatives are sampled at random (``neg_ratio`` per positive) instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss, roi_align

_MAX_DWH = math.log(1000.0 / 16)


def anchor_grid(
    height: int,
    width: int,
    stride: int,
    scales: Sequence[float] = (2.0, 4.0, 8.0),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    device: torch.device | None = None,
) -> torch.Tensor:
    """Default boxes (xyxy, image pixels) of a ``height`` x ``width`` map at ``stride``.

    Each position (centre ``(j + 0.5) * stride``) gets one box per (scale, ratio): side
    ``stride * scale``, aspect ``h / w = ratio``. Rows are position-major, boxes clipped to
    the map's extent. Shape ``(height * width * len(scales) * len(ratios), 4)``.
    """
    sizes = torch.tensor(
        [(stride * s / math.sqrt(r), stride * s * math.sqrt(r)) for s in scales for r in ratios],
        dtype=torch.float32,
        device=device,
    )  # (A, 2): w, h
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)
    half = sizes[None] / 2
    boxes = torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4)
    limit = boxes.new_tensor([width * stride, height * stride] * 2)
    return torch.minimum(boxes.clamp(min=0), limit)


def match_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, iou_threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD matching: the ground truth index of each anchor (-1: background) and its IoU.

    An anchor whose best IoU with any ground truth reaches ``iou_threshold`` is matched to
    it; every ground truth also claims its best anchor, whatever that IoU.
    """
    n = anchors.shape[0]
    if gt_boxes.numel() == 0:
        return (
            torch.full((n,), -1, dtype=torch.long, device=anchors.device),
            anchors.new_zeros(n),
        )
    iou = box_iou(gt_boxes, anchors)  # (G, A)
    best_iou, matched = iou.max(dim=0)
    matched = torch.where(best_iou >= iou_threshold, matched, torch.full_like(matched, -1))
    best_anchor = iou.argmax(dim=1)
    matched[best_anchor] = torch.arange(gt_boxes.shape[0], device=anchors.device)
    ious = iou.gather(0, matched.clamp(min=0)[None])[0]
    return matched, torch.where(matched >= 0, ious, torch.zeros_like(ious))


def enclosing_boxes(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The smallest box containing box ``b`` and box ``a`` (row-wise, xyxy)."""
    return torch.cat([torch.minimum(b[:, :2], a[:, :2]), torch.maximum(b[:, 2:], a[:, 2:])], 1)


def contextual_roi_align(
    feature: torch.Tensor,
    boxes: list[torch.Tensor],
    context: list[torch.Tensor],
    output_size: int,
    spatial_scale: float,
) -> torch.Tensor:
    """LCP's contextual RoIAlign: ``RoIAlign(F, B) + RoIAlign(F, C)`` (torchvision roi_align)."""

    def pool(rois: list[torch.Tensor]) -> torch.Tensor:
        return roi_align(feature, rois, output_size, spatial_scale, 2, True)

    return pool(boxes) + pool(context)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) offsets to ``boxes`` (xyxy), as Faster R-CNN's box coder."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    pcx, pcy = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    pw = w * deltas[:, 2].clamp(max=_MAX_DWH).exp()
    ph = h * deltas[:, 3].clamp(max=_MAX_DWH).exp()
    return torch.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], dim=1)


def giou_regression_loss(
    pred: torch.Tensor, gt: torch.Tensor, m: torch.Tensor | float
) -> torch.Tensor:
    """LCP's ``L_ar = sum m * (1 - GIoU(pred, gt))`` (torchvision's GIoU loss), summed."""
    return (m * generalized_box_iou_loss(pred, gt, reduction="none")).sum()


@dataclass
class BoxSample:
    """Default boxes sampled on a batch: per image B (and C), and over the batch the
    class labels (0 = background), matched ground truth A, IoU(B, A) and positive mask."""

    boxes: list[torch.Tensor]
    context: list[torch.Tensor]
    labels: torch.Tensor
    gt: torch.Tensor
    iou: torch.Tensor
    positive: torch.Tensor


def sample_boxes(
    anchors: torch.Tensor,
    targets: Sequence[dict[str, torch.Tensor]],
    generator: torch.Generator,
    max_pos: int = 32,
    neg_ratio: float = 3.0,
    min_neg: int = 8,
) -> BoxSample:
    """Sample matched default boxes per image: up to ``max_pos`` positives and
    ``neg_ratio`` random negatives per positive (at least ``min_neg``).

    C is the box enclosing B and its matched ground truth A for positives; a negative has
    no A, so its C is B itself.
    """
    boxes, context, labels, gts, ious, pos = [], [], [], [], [], []
    for t in targets:
        gt_boxes = t["boxes"].to(anchors)
        matched, iou = match_anchors(anchors, gt_boxes)
        p = torch.nonzero(matched >= 0).flatten()
        q = torch.nonzero(matched < 0).flatten()
        p = p[torch.randperm(len(p), generator=generator)[:max_pos].to(p.device)]
        n_neg = max(int(neg_ratio * len(p)), min_neg)
        q = q[torch.randperm(len(q), generator=generator)[:n_neg].to(q.device)]
        idx = torch.cat([p, q])
        b = anchors[idx]
        a = b.clone()
        if len(p):
            a[: len(p)] = gt_boxes[matched[p]]
        lab = torch.zeros(len(idx), dtype=torch.long, device=anchors.device)
        if len(p):
            lab[: len(p)] = t["labels"].to(anchors.device)[matched[p]]
        boxes.append(b)
        context.append(enclosing_boxes(b, a))
        labels.append(lab)
        gts.append(a)
        ious.append(iou[idx])
        pos.append(lab > 0)
    return BoxSample(
        boxes, context, torch.cat(labels), torch.cat(gts), torch.cat(ious), torch.cat(pos)
    )


class AuxHead(nn.Module):
    """An auxiliary network on one feature map.

    ``proj`` (1x1 conv + BN + ReLU) is the only layer reading the detector's channels, so
    it is the one whose input channels follow the pruning; then RoIAlign of the default
    boxes (plus the enclosing boxes when ``context``), two FC layers, a (K+1)-way
    classifier and, when ``regress``, box offsets.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        stride: int,
        *,
        context: bool,
        regress: bool,
        channels: int = 64,
        roi_size: int = 3,
        hidden: int = 128,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.context = context
        self.roi_size = roi_size
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * roi_size * roi_size, hidden),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Linear(hidden, num_classes + 1)
        self.reg = nn.Linear(hidden, 4) if regress else None
        if self.reg is not None:
            nn.init.zeros_(self.reg.weight)
            nn.init.zeros_(self.reg.bias)

    def forward(
        self, feature: torch.Tensor, boxes: list[torch.Tensor], context: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits (and box offsets) of the boxes, from ``proj(feature)``."""
        x = self.proj(feature)
        scale = 1.0 / self.stride
        if self.context:
            pooled = contextual_roi_align(x, boxes, context, self.roi_size, scale)
        else:
            pooled = roi_align(x, boxes, self.roi_size, scale, 2, True)
        h = self.fc(pooled)
        return self.cls(h), (self.reg(h) if self.reg is not None else None)


def aux_loss(
    head: AuxHead,
    feature: torch.Tensor,
    targets: Sequence[dict[str, torch.Tensor]],
    generator: torch.Generator,
    *,
    m: str | float = "iou",
    scales: Sequence[float] = (2.0, 4.0, 8.0),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    max_pos: int = 32,
    neg_ratio: float = 3.0,
) -> dict[str, torch.Tensor]:
    """The auxiliary losses of ``head`` on ``feature`` (N, C, H, W) for ``targets``.

    ``cls``: cross-entropy over the sampled default boxes (DCP's and LCP's ``L_ac``);
    ``reg`` (heads that regress): ``sum m * (1 - GIoU)`` over the positives divided by
    their number (LCP's ``L_ar``), ``m`` the IoU of B with its ground truth (``"iou"``) or
    a constant. Boxes are in the pixels of the image the feature was computed from.
    """
    anchors = anchor_grid(
        feature.shape[-2], feature.shape[-1], head.stride, scales, ratios, feature.device
    )
    s = sample_boxes(anchors, targets, generator, max_pos, neg_ratio)
    logits, deltas = head(feature, s.boxes, s.context)
    out = {"cls": F.cross_entropy(logits, s.labels)}
    if deltas is not None:
        pos = s.positive
        weight = s.iou[pos] if m == "iou" else float(m)
        pred = decode_boxes(deltas[pos], torch.cat(s.boxes)[pos])
        reg = giou_regression_loss(pred, s.gt[pos], weight)
        out["reg"] = reg / max(int(pos.sum()), 1)
    return out


class ClassAuxHead(nn.Module):
    """DCP's auxiliary network for a classifier (the paper's ResNet setting): the stage's
    feature map through ``proj`` (1x1 conv + BN + ReLU, the only layer reading the
    network's channels), global average pooling and a K-way linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, stride: int, channels: int = 64):
        super().__init__()
        self.stride = stride
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.cls = nn.Linear(channels, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Class logits (N, K) of the images of ``feature`` (N, C, H, W)."""
        return self.cls(torch.flatten(F.adaptive_avg_pool2d(self.proj(feature), 1), 1))


def class_aux_loss(
    head: ClassAuxHead, feature: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """DCP's auxiliary loss on a classifier: cross-entropy of ``head`` with each image's
    label (``targets[i]["labels"]`` = tensor([c]))."""
    labels = torch.cat([t["labels"].reshape(-1)[:1] for t in targets]).to(feature.device)
    return {"cls": F.cross_entropy(head(feature), labels)}


def model_targets(model: nn.Module, images: list, targets: list) -> list[dict]:
    """The targets in the coordinates of the model's input (after its own resize)."""
    transform = getattr(model, "transform", None)
    if not isinstance(transform, nn.Module):
        return list(targets)
    was = transform.training
    transform.eval()
    with torch.no_grad():
        out = transform(list(images), [dict(t) for t in targets])
    transform.train(was)
    return list(out[1])


class StopForward(Exception):
    """Raised by a hook to end a forward pass once every needed output was recorded."""


@contextlib.contextmanager
def capture(
    model: nn.Module,
    outputs: Sequence[str] = (),
    inputs: Sequence[str] = (),
    stop: str | None = None,
    stop_calls: int = 1,
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the outputs (key ``name``) and first inputs (``name:in``) of named modules,
    one entry per call; raise :class:`StopForward` once ``stop`` ran ``stop_calls`` times
    (see :func:`run_until`)."""
    store: dict[str, list[torch.Tensor]] = {}
    calls = {"stop": 0}
    handles = []
    for name in set(outputs) | set(inputs) | ({stop} if stop else set()):

        def hook(mod: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            if name in outputs:
                store.setdefault(name, []).append(out[0] if isinstance(out, tuple) else out)
            if name in inputs:
                store.setdefault(f"{name}:in", []).append(args[0])
            if name == stop:
                calls["stop"] += 1
                if calls["stop"] >= stop_calls:
                    raise StopForward

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` (a forward pass); ``None`` when a :func:`capture` hook stopped it."""
    try:
        return fn()
    except StopForward:
        return None


def forward_order(model: nn.Module, example: Any) -> tuple[dict[str, int], dict[str, int]]:
    """In one eval forward: the position at which each named module last finished, and
    how many times it ran."""
    order: dict[str, int] = {}
    calls: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple, out: Any) -> None:
            order[name] = sum(calls.values())
            calls[name] = calls.get(name, 0) + 1

        return fn

    handles = [mod.register_forward_hook(hook(n)) for n, mod in model.named_modules() if n]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return order, calls


def aux_positions(n_candidates: int, n_aux: int) -> list[int]:
    """Which ``n_aux`` of ``n_candidates`` aux features carry a head: evenly spaced, the
    network split into ``n_aux + 1`` stages, the last ending at the detector's own loss
    (4 ResNet stages, 3 losses: after stages 1-3, DCP's ResNet setting)."""
    if n_aux >= n_candidates:
        return list(range(n_candidates))
    return sorted({max(1, round((i + 1) * n_candidates / (n_aux + 1))) - 1 for i in range(n_aux)})


def stage_of(position: int, aux_ends: Sequence[int]) -> int:
    """Stage of a layer finishing at ``position``: the first aux feature finishing at or
    after it, else ``len(aux_ends)`` (the final stage)."""
    for s, end in enumerate(aux_ends):
        if end >= position:
            return s
    return len(aux_ends)
