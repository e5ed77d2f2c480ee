"""DCP's channel-selection criterion (the ``dcp`` and ``lcp`` methods' procedure is
:mod:`detprune.pruning.procedures.stagewise`).

Zhuang et al., "Discrimination-aware Channel Pruning for Deep Neural Networks", NeurIPS
2018 (DCP); Xie et al., "Localization-aware Channel Pruning for Object Detection",
Neurocomputing 2020 (LCP).

A channel is kept or removed for a whole torch-pruning group; the layers reading the
group's channels (its *consumers*: the next conv, or every layer after a residual sum)
are the layers whose input channels DCP selects. Given a loss ``L`` of the consumers'
weights (reconstruction + auxiliary loss, see
:mod:`detprune.pruning.procedures.stagewise`), selection
starts from no channel and repeatedly adds the channels with the largest
``||dL/dW_k||_F^2`` (summed over the consumers' input slices ``W_k``), then takes SGD
steps on the selected weights, until the budget.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

LossFn = Callable[[int], torch.Tensor]


@dataclass
class Consumer:
    """A layer reading a group's channels: which weight slices along ``dim`` belong to
    which group channel (``owner``, -1 for slices of other channels). ``scored`` consumers
    rank the channels and take SGD steps; the others (auxiliary heads) are only masked."""

    name: str
    module: nn.Module
    dim: int
    owner: torch.Tensor
    scored: bool = True

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def slots(self, channels: torch.Tensor) -> torch.Tensor:
        """Boolean mask (broadcastable to the weight) of the slices of ``channels``."""
        owner = self.owner.to(channels.device)
        m = (owner >= 0) & channels[owner.clamp(min=0)]
        shape = [1] * self.weight.ndim
        shape[self.dim] = -1
        return m.view(shape).to(self.weight.device)

    def slot_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """1 for the slices of kept channels (and of other channels), 0 for the others."""
        return (~self.slots(~keep)).to(self.weight.dtype)

    def channel_scores(self, n: int) -> torch.Tensor:
        """``||dL/dW_k||_F^2`` of each of the group's ``n`` channels, from ``weight.grad``."""
        g = self.weight.grad
        if g is None:
            return torch.zeros(n)
        dims = [d for d in range(g.ndim) if d != self.dim]
        per_slot = g.detach().pow(2).sum(dim=dims).cpu()
        valid = self.owner >= 0
        return torch.zeros(n).index_add_(0, self.owner[valid], per_slot[valid])


def consumer_of(
    name: str, module: nn.Module, idxs: Sequence[int], root_idxs: Sequence[int]
) -> Consumer | None:
    """A :class:`Consumer` for input slices ``idxs`` (group channels ``root_idxs``) of a
    conv or linear layer; ``None`` for other layers. Auxiliary heads (``_dcp_aux``) are
    masked, not scored."""
    if isinstance(module, nn.Linear):
        dim = 1
    elif isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        if module.groups > 1 and not depthwise:
            raise NotImplementedError(f"{name}: grouped convolutions are not supported")
        dim = 0 if (module.transposed or depthwise) else 1
    else:
        return None
    owner = torch.full((module.weight.shape[dim],), -1, dtype=torch.long)
    owner[torch.as_tensor(list(idxs), dtype=torch.long)] = torch.as_tensor(
        list(root_idxs), dtype=torch.long
    )
    return Consumer(name, module, dim, owner, scored=not name.startswith("_dcp_aux"))


def apply_masks(consumers: Sequence[Consumer], keep: torch.Tensor) -> None:
    """Zero the input slices of the channels not in ``keep``."""
    with torch.no_grad():
        for c in consumers:
            c.weight.mul_(c.slot_mask(keep))


def _zero_grads(consumers: Sequence[Consumer]) -> None:
    for c in consumers:
        c.weight.grad = None


def make_optimizer(consumers: Sequence[Consumer], lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 over the scored consumers' weights (DCP's layer-wise step)."""
    return torch.optim.SGD([c.weight for c in consumers if c.scored], lr=lr, momentum=0.9)


@contextlib.contextmanager
def fixed_rng(key: int) -> Iterator[None]:
    """The same random draws (the detector's RoI sampling) inside every block of one key."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(key)
        yield


def fit_selected(
    consumers: Sequence[Consumer],
    keep: torch.Tensor,
    loss_fn: LossFn,
    n_batches: int,
    iters: int,
    optimizer: torch.optim.Optimizer,
    start: int = 0,
) -> float:
    """``iters`` SGD steps on the selected input weights of the scored consumers (the
    other slices stay zero), batch ``(start + i) % n_batches`` at step ``i``.

    A step that raises the loss of its own batch (same random draws), or makes it
    non-finite, is undone, the momentum is dropped and the lr halved for the rest of the
    group: DCP's fixed layer lr diverged on layers fed by large activations (the RPN head
    of the default detector: loss 1.6e5 after selection, NaN in fine-tuning). Returns the
    loss of the last step's batch after it (or before it, if undone)."""
    last = float("nan")
    for it in range(iters):
        b = (start + it) % n_batches
        _zero_grads(consumers)
        with fixed_rng(start + it):
            loss = loss_fn(b)
        loss.backward()
        before = float(loss.detach())
        saved = [c.weight.detach().clone() for c in consumers]
        with torch.no_grad():
            for c in consumers:
                if c.scored and c.weight.grad is not None:
                    c.weight.grad.mul_(c.slot_mask(keep))
        optimizer.step()
        apply_masks(consumers, keep)
        with torch.no_grad(), fixed_rng(start + it):
            after = float(loss_fn(b))
        if math.isfinite(after) and after <= before:
            last = after
            continue
        with torch.no_grad():
            for c, w in zip(consumers, saved, strict=True):
                c.weight.copy_(w)
        optimizer.state.clear()
        for g in optimizer.param_groups:
            g["lr"] *= 0.5
        last = before
    _zero_grads(consumers)
    return last


def round_size(budget: int, steps: int, per_round: int | None = None) -> int:
    """Channels added per greedy round: ``per_round`` when given (1: DCP's one channel per
    greedy step), else ``ceil(budget / steps)`` (``steps`` rounds; one channel per round
    when ``steps >= budget``)."""
    if per_round is not None:
        return max(1, int(per_round))
    return max(1, math.ceil(budget / max(steps, 1)))


def greedy_select(
    consumers: Sequence[Consumer],
    n: int,
    budget: int,
    loss_fn: LossFn,
    n_batches: int,
    *,
    steps: int = 4,
    sgd_iters: int = 2,
    lr: float = 0.01,
    per_round: int | None = None,
) -> tuple[torch.Tensor, float]:
    """DCP's greedy selection of ``budget`` of a group's ``n`` channels.

    All input slices of the group start at zero. Each round sums ``||dL/dW_k||_F^2`` over
    the scored consumers and ``n_batches`` batches, adds the :func:`round_size` best
    unselected channels (``ceil(budget / steps)``, or ``per_round``; one per round is the
    paper's), restores their baseline weights (a warm start: only a few SGD steps are
    affordable) and takes ``sgd_iters`` SGD steps on the selected weights. Returns the kept
    channel indices (sorted) and the last loss.
    """
    originals = [c.weight.detach().clone() for c in consumers]
    keep = torch.zeros(n, dtype=torch.bool)
    apply_masks(consumers, keep)
    optimizer = make_optimizer(consumers, lr)
    per_round = round_size(budget, steps, per_round)
    last, done = float("nan"), 0
    while int(keep.sum()) < budget:
        _zero_grads(consumers)
        for b in range(n_batches):
            loss_fn(b).backward()
        score = sum((c.channel_scores(n) for c in consumers if c.scored), torch.zeros(n))
        score[keep] = -math.inf
        new = torch.zeros(n, dtype=torch.bool)
        new[torch.topk(score, min(per_round, budget - int(keep.sum()))).indices] = True
        keep |= new
        with torch.no_grad():
            for c, w0 in zip(consumers, originals, strict=True):
                c.weight.copy_(torch.where(c.slots(new), w0, c.weight))
        last = fit_selected(consumers, keep, loss_fn, n_batches, sgd_iters, optimizer, done)
        done += sgd_iters
    _zero_grads(consumers)
    return torch.nonzero(keep).flatten(), last
