"""IRI, MIEP's intra-layer redundancy-aware importance.

Each channel of a group is described by the Frobenius norms of its producing filters
(one per input channel of every conv / linear whose outputs the group removes) and of its
consuming input slices (one per output channel of every layer reading it); the channels
of the group are clustered and a channel in a large cluster is redundant:
``I~(i) = C / |cluster(i)|``, ``I_IRI(i) = exp(lambda_scale * minmax(I~)(i))``.

Each descriptor is scaled to unit L2 norm before clustering (``normalize``, the paper's
distance threshold 0.8 reads as one on unit-scale descriptors): the clustering then
compares the shapes of the channels, not their magnitudes. With one global scale instead
(``normalize=False``, this module's former behaviour) the channels of lowest norm lie
closest to each other and are merged first, so IRI discounts a layer's weakest channels,
a magnitude prior re-applied at every progressive step; :func:`lowest_l1_overlap`
measures how much of that happens.

MIEP: "Channel Pruning with Multi-granular Importance Estimation for Object Detection",
ACM MM 2023 (doi 10.1145/3581783.3612563).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from sklearn.cluster import AgglomerativeClustering, KMeans
from threadpoolctl import threadpool_limits
from torch import nn

from detprune.pruning.importance.fisher import PRUNABLE, GroupInfo, is_out_pruning


@dataclass(frozen=True)
class IRIConfig:
    """Clustering of IRI: ``algorithm`` hierarchical | kmeans, ``stop`` ratio | distance
    (hierarchical only), ``ratio`` share of channels merged, ``distance`` merge threshold,
    ``linkage`` of the hierarchical clustering; ``normalize``: each descriptor to unit L2
    norm (else all of a group's descriptors by one scale, to unit mean norm)."""

    algorithm: str = "hierarchical"
    stop: str = "ratio"
    ratio: float = 0.1
    distance: float = 0.8
    linkage: str = "ward"
    lambda_scale: float = 2.0
    seed: int = 0
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in ("hierarchical", "kmeans"):
            raise ValueError(
                f"iri_algorithm must be hierarchical or kmeans, not {self.algorithm!r}"
            )
        if self.stop not in ("ratio", "distance"):
            raise ValueError(f"iri_stop must be ratio or distance, not {self.stop!r}")
        if self.algorithm == "kmeans" and self.stop == "distance":
            raise ValueError("iri_stop 'distance' needs iri_algorithm 'hierarchical'")


def _slice_norms(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Frobenius norm of each kernel, rows indexed by ``dim`` of ``weight``: (size, other)."""
    w = weight.detach().transpose(0, dim) if dim else weight.detach()
    w = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w.unsqueeze(-1)
    return w.pow(2).sum(-1).sqrt().double().cpu()


def channel_descriptors(
    dg: tp.DependencyGraph, info: GroupInfo, skip: Collection[nn.Module] = ()
) -> torch.Tensor:
    """(width, D): per channel, norms of its producing filters and consuming input slices;
    the layers in ``skip`` (FOI's adapters, not part of the detector) are left out."""
    parts = []
    for item in info.group:
        module = item.dep.target.module
        if not isinstance(module, PRUNABLE) or getattr(module, "groups", 1) != 1:
            continue
        if module in skip:
            continue
        out = is_out_pruning(dg, item.dep)
        norms = _slice_norms(module.weight, 0 if out else 1)  # (pruned dim, other dim)
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        sq = torch.zeros(info.width, norms.shape[1], dtype=torch.float64)
        sq.index_add_(0, root, norms[idxs].pow(2))  # several indices per channel: one slice
        parts.append(sq.sqrt())
    if not parts:
        return torch.zeros(info.width, 1, dtype=torch.float64)
    return torch.cat(parts, dim=1)


def scaled(desc: np.ndarray, normalize: bool) -> np.ndarray:
    """The descriptors the clustering sees: each row at unit L2 norm (rows of norm 0 stay
    0), or with ``normalize=False`` all rows divided by their mean norm."""
    norms = np.linalg.norm(desc, axis=1)
    if normalize:
        return desc / np.where(norms > 0, norms, 1.0)[:, None]
    scale = norms.mean()
    return desc / scale if scale > 0 else desc


def cluster_labels(desc: np.ndarray, cfg: IRIConfig) -> np.ndarray:
    """Cluster label of each channel (rows of ``desc``)."""
    n = desc.shape[0]
    if n < 2:
        return np.zeros(n, dtype=int)
    x = scaled(desc, cfg.normalize)
    if cfg.stop == "distance":
        algo = AgglomerativeClustering(
            n_clusters=None, distance_threshold=cfg.distance, linkage=cfg.linkage
        )
        return algo.fit_predict(x)
    clusters = n - int(round(cfg.ratio * n))
    if clusters >= n:
        return np.arange(n)
    clusters = max(clusters, 1)
    if cfg.algorithm == "kmeans":
        # k-means++ init; sklearn's OpenMP threads kept to torch's budget (Snakemake threads)
        with warnings.catch_warnings(), threadpool_limits(torch.get_num_threads()):
            warnings.simplefilter("ignore")  # duplicate points: fewer distinct clusters
            return KMeans(clusters, n_init=1, random_state=cfg.seed).fit_predict(x)
    return AgglomerativeClustering(n_clusters=clusters, linkage=cfg.linkage).fit_predict(x)


def iri_from_labels(labels: np.ndarray, lambda_scale: float) -> torch.Tensor:
    """``exp(lambda_scale * minmax(C / cluster size))``; if every channel scores the same,
    minmax is 1 when all are unique (nothing redundant) and 0 otherwise."""
    n = len(labels)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sizes = torch.as_tensor(counts[inverse], dtype=torch.float64)
    raw = n / sizes
    lo, hi = float(raw.min()), float(raw.max())
    if math.isclose(lo, hi):
        norm = torch.full_like(raw, 1.0 if float(sizes.max()) == 1 else 0.0)
    else:
        norm = (raw - lo) / (hi - lo)
    return torch.exp(lambda_scale * norm)


def iri_scores(
    dg: tp.DependencyGraph, info: GroupInfo, cfg: IRIConfig, skip: Collection[nn.Module] = ()
) -> torch.Tensor:
    """I_IRI of every channel of a group (``skip``: layers left out of the descriptors)."""
    desc = channel_descriptors(dg, info, skip).numpy()
    return iri_from_labels(cluster_labels(desc, cfg), cfg.lambda_scale)


def lowest_l1_overlap(info: GroupInfo, iri: torch.Tensor, lambda_scale: float) -> tuple[int, int]:
    """(discounted, overlap): how many channels of a group IRI discounts (``I_IRI`` below
    its maximum ``exp(lambda_scale)``) and how many of them are among the same number of
    channels of lowest L1 norm of the group's root layer (its output filters)."""
    discounted = iri < math.exp(lambda_scale) * (1 - 1e-9)
    k = int(discounted.sum())
    if k == 0:
        return 0, 0
    weight = info.root_module.weight.detach()
    rows = torch.as_tensor(list(info.group[0].idxs), dtype=torch.long)
    l1 = weight.flatten(1).abs().sum(1).double().cpu()[rows]
    lowest = torch.zeros_like(discounted)
    lowest[torch.argsort(l1, stable=True)[:k]] = True
    return k, int((discounted & lowest).sum())
