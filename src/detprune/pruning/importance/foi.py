"""FOI's object-sensitive feature loss L_info, with the unpruned model as guide.

``L_info = sum_s (1 - sum(Phi_obj * Phi_pre^s) / sum(Phi_obj))`` where ``Phi_pre^s`` is the
per-position cosine similarity between the guide's neck feature ``s`` and a learned 1x1
adapter of the current one, and ``Phi_obj = max(O_pre, O_cur)``, ``O`` the max over
classes of the sigmoid of the head's classification logits at each position (a weight:
no gradient flows through it). The ``|.|`` of the paper is read as the L1 norm of the
non-negative weights, with the cosine kept signed (a weighted mean of the similarity).
Variants: ``similarity="mse"`` (per-position mean squared error instead of ``1 - cos``,
divided by the guide's mean square at that level so that it does not depend on the
features' scale: on the raw features the pruning stage diverged to NaN / 1e26 losses)
and ``objectness=False`` (``Phi_obj = 1``, Phi_pre only). The guide's BatchNorm layers
normalise with the same statistics as the student's (the batch's, while it trains), so
that L_info is 0 before pruning and measures only what pruning and training change.

MIEP: "Channel Pruning with Multi-granular Importance Estimation for Object Detection",
ACM MM 2023 (doi 10.1145/3581783.3612563).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The 4-D tensors of a module output (tensor, dict of levels, list or tuple)."""
    if torch.is_tensor(out):
        return [out] if out.dim() == 4 else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def flatten_logits(out: Any) -> list[torch.Tensor]:
    """The classification logits of a module output: dense (N, K, H, W) maps, or the
    (N, K) logits of a classifier."""
    if torch.is_tensor(out) and out.dim() == 2:
        return [out]
    return flatten_outputs(out)


def objectness(logits: torch.Tensor) -> torch.Tensor:
    """``O``: max over classes (channels) of sigmoid(logits), per position: (N, H, W).

    A classifier's (N, K) logits have no positions: ``O`` is then the max softmax
    probability per image, shape (N,) (broadcast over positions by :func:`object_weights`).
    """
    if logits.dim() == 2:
        return torch.softmax(logits.detach().float(), dim=1).amax(dim=1)
    return torch.sigmoid(logits.detach().float()).amax(dim=1)


class _Done(Exception):
    """Raised by a hook to stop a guide forward once its features are recorded."""


class FeatureRecorder:
    """Records the neck outputs and the per-level classification logits of a model."""

    def __init__(self, model: nn.Module, neck: Sequence[str], cls: Sequence[str]) -> None:
        self.model = model
        self.neck = tuple(neck)
        self.cls = tuple(cls)
        self.feats: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.stop_after: int | None = None

    @contextmanager
    def record(self, stop_after: int | None = None) -> Iterator[FeatureRecorder]:
        """Hook the modules; with ``stop_after``, raise after that many logit calls (or after
        the neck when there are no logits), so a guide skips its post-processing."""
        self.feats, self.logits, self.stop_after = [], [], stop_after
        handles = []
        for i, name in enumerate(self.neck):
            last = i == len(self.neck) - 1
            handles.append(self.model.get_submodule(name).register_forward_hook(self._neck(last)))
        for name in self.cls:
            handles.append(self.model.get_submodule(name).register_forward_hook(self._cls))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _neck(self, last: bool) -> Callable[[nn.Module, tuple, Any], None]:
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            self.feats.extend(flatten_outputs(output))
            if last and not self.cls and self.stop_after is not None:
                raise _Done

        return fn

    def _cls(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        self.logits.extend(flatten_logits(output))
        if self.stop_after is not None and len(self.logits) >= self.stop_after:
            raise _Done


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics (as a training student does)
    without updating their running statistics; restored on exit."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.training, m.momentum))
            m.train()
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum


@torch.no_grad()
def run_guide(
    recorder: FeatureRecorder,
    images: Any,
    logit_calls: int | None,
    batch_stats: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Neck features and logits of the (eval-mode) guide on ``images``, stopping after
    ``logit_calls`` logit calls (after the neck when 0; never when ``None``); with
    ``batch_stats`` its BatchNorm layers use the batch's statistics."""
    recorder.model.eval()
    try:
        stats = batch_statistics(recorder.model) if batch_stats else nullcontext()
        with stats, recorder.record(stop_after=logit_calls):
            recorder.model(images)
    except _Done:
        pass
    return recorder.feats, recorder.logits


def object_weights(
    feats: Sequence[torch.Tensor],
    student_logits: Sequence[torch.Tensor],
    guide_logits: Sequence[torch.Tensor],
) -> list[torch.Tensor | None]:
    """``Phi_obj = max(O_pre, O_cur)`` per neck level, matched to the logits by spatial
    size (resized when none matches); ``None`` (uniform) when there are no logits. With a
    classifier's (N, K) logits, each image's weight is its ``O``, the same at every
    position of every level."""
    out: list[torch.Tensor | None] = []
    pairs = list(zip(student_logits, guide_logits, strict=False))
    for f in feats:
        if not pairs:
            out.append(None)
            continue
        if pairs[0][0].dim() == 2:
            s, g = pairs[0]
            o = torch.maximum(objectness(s), objectness(g))
            out.append(o[:, None, None].expand(f.shape[0], *f.shape[-2:]))
            continue
        match = next((p for p in pairs if p[0].shape[-2:] == f.shape[-2:]), None)
        s, g = match if match is not None else pairs[min(len(out), len(pairs) - 1)]
        o = torch.maximum(objectness(s), objectness(g))
        if o.shape[-2:] != f.shape[-2:]:
            o = F.interpolate(o[:, None], size=f.shape[-2:], mode="bilinear")[:, 0]
        out.append(o)
    return out


def _adapter(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 1)
    if c_in == c_out:  # start at the identity: L_info is 0 until the student departs
        with torch.no_grad():
            conv.weight.copy_(torch.eye(c_out)[:, :, None, None])
            conv.bias.zero_()
    return conv


class InfoLoss(nn.Module):
    """L_info over the neck levels, one learned 1x1 adapter per level.

    ``adapter="prune"``: the adapters are consumers of the neck like any layer, so the
    pruning procedure registers them in its dependency graph and a pruned neck channel
    takes their input column with it; a width that no longer matches is then an error.
    ``adapter="refit"`` (the former behaviour): stale adapters are refitted by least
    squares (:meth:`refit`) on the features they are next called with.
    """

    def __init__(
        self, similarity: str = "cosine", use_objectness: bool = True, adapter: str = "prune"
    ) -> None:
        super().__init__()
        if similarity not in ("cosine", "mse"):
            raise ValueError(f"foi_similarity must be cosine or mse, got {similarity!r}")
        if adapter not in ("prune", "refit"):
            raise ValueError(f"foi_adapter must be prune or refit, got {adapter!r}")
        self.similarity = similarity
        self.use_objectness = use_objectness
        self.adapter = adapter
        self.adapters = nn.ModuleList()

    def setup(self, student: Sequence[torch.Tensor], guide: Sequence[torch.Tensor]) -> None:
        """Create the adapters for these feature shapes (identity where widths agree)."""
        self.adapters = nn.ModuleList(
            _adapter(s.shape[1], g.shape[1]) for s, g in zip(student, guide, strict=True)
        ).to(student[0].device)

    @torch.no_grad()
    def refit(self, student: Sequence[torch.Tensor], guide: Sequence[torch.Tensor]) -> list[int]:
        """Refit, by ridge least squares, the adapters whose input width no longer matches
        the student (its neck was pruned); return their levels. One fit per pair of
        (student, guide) widths over the positions of all levels with those widths: every
        level of an FPN neck shares one fit, SSD's levels of different widths get their own.
        Only with ``adapter="refit"``: it discards what the adapters learned (issue 21)."""
        stale = [i for i, s in enumerate(student) if self.adapters[i].in_channels != s.shape[1]]
        by_width: dict[tuple[int, int], list[int]] = {}
        for i in stale:
            by_width.setdefault((student[i].shape[1], guide[i].shape[1]), []).append(i)
        for (c_in, c_out), levels in by_width.items():
            rows = [student[i].permute(0, 2, 3, 1).reshape(-1, c_in) for i in levels]
            x = torch.cat(rows).double()
            y = torch.cat([guide[i].permute(0, 2, 3, 1).reshape(-1, c_out) for i in levels])
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            gram = x.T @ x
            ridge = 1e-3 * gram.diagonal().mean().clamp_min(1e-12)
            eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
            w = torch.linalg.solve(gram + ridge * eye, x.T @ y.double())
            for i in levels:
                conv = nn.Conv2d(c_in, c_out, 1).to(student[i].device)
                conv.weight.copy_(w[:-1].T[:, :, None, None])
                conv.bias.copy_(w[-1])
                self.adapters[i] = conv
        return stale

    def check_widths(self, student: Sequence[torch.Tensor]) -> None:
        """Raise if an adapter's input width is not its level's (pruned without it)."""
        stale = {
            i: (self.adapters[i].in_channels, s.shape[1])
            for i, s in enumerate(student)
            if self.adapters[i].in_channels != s.shape[1]
        }
        if stale:
            raise RuntimeError(
                f"FOI adapters (level: adapter, neck width) {stale}: with foi_adapter "
                "'prune' the adapters must be pruned with the neck"
            )

    def forward(
        self,
        student: Sequence[torch.Tensor],
        guide: Sequence[torch.Tensor],
        weights: Sequence[torch.Tensor | None],
    ) -> torch.Tensor:
        """L_info summed over the levels (0 when adapted student and guide agree)."""
        if len(self.adapters) != len(student):
            self.setup(student, guide)
        if self.adapter == "refit":
            self.refit(student, guide)
        else:
            self.check_widths(student)
        total = student[0].new_zeros(())
        for adapter, s, g, w in zip(self.adapters, student, guide, weights, strict=True):
            a = adapter(s)
            g = g.detach()
            if g.shape[-2:] != a.shape[-2:]:
                g = F.interpolate(g, size=a.shape[-2:], mode="bilinear")
            if w is None or not self.use_objectness:
                w = torch.ones(a.shape[0], *a.shape[2:], device=a.device)
            w = w.detach().to(a.dtype)
            if self.similarity == "cosine":
                d = 1 - F.cosine_similarity(a, g, dim=1, eps=1e-8)
            else:  # relative to the guide's mean square: raw features' scale made it diverge
                d = (a - g).pow(2).mean(dim=1) / g.pow(2).mean().clamp_min(1e-12)
            total = total + (w * d).sum() / w.sum().clamp_min(1e-12)
        return total
