"""IRI's per-descriptor normalisation (issue 21): duplicated channels are redundant at
any norm; on one global scale (the former behaviour) the lowest-norm channels merge first.

MIEP: "Channel Pruning with Multi-granular Importance Estimation for Object Detection",
ACM MM 2023.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from detprune.pruning.importance.fisher import prunable_groups
from detprune.pruning.importance.iri import (
    IRIConfig,
    cluster_labels,
    iri_scores,
    lowest_l1_overlap,
    scaled,
)
from detprune.pruning.procedures.progressive import DEFAULTS, iri_config

E2 = math.exp(2.0)


def mixed_norm_net() -> nn.Sequential:
    """conv(3 -> 10) -> conv(10 -> 4). Channels 0 and 1 are near-duplicates (one consuming
    weight differs by 5 %) at 10x the norm; channels 2 and 3 are distinct, at 0.01x; the
    others distinct at 1x. Channels 2 and 3 are the layer's two lowest-L1 channels."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 10, 3, bias=False), nn.Conv2d(10, 4, 1))
    with torch.no_grad():
        net[0].weight[1] = net[0].weight[0]
        differ = torch.tensor([1.05, 1.0, 0.95, 1.0])[:, None, None]
        net[1].weight[:, 1] = net[1].weight[:, 0] * differ
        for sl, factor in ((slice(0, 2), 10.0), (slice(2, 4), 0.01)):
            net[0].weight[sl] *= factor
            net[1].weight[:, sl] *= factor
    return net


def group_of(net: nn.Sequential):
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.rand(1, 3, 6, 6))
    (info,) = prunable_groups(dg, net, ["1"])
    return dg, info


def test_scaled_descriptors_have_unit_norm_or_one_global_scale():
    desc = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]]).numpy()
    np.testing.assert_allclose(scaled(desc, True), [[0.6, 0.8], [0.0, 0.0], [0.6, 0.8]])
    mean = (5.0 + 0.0 + 0.5) / 3
    np.testing.assert_allclose(scaled(desc, False), desc / mean)


def test_normalised_iri_discounts_duplicates_of_any_norm_not_small_distinct_channels():
    dg, info = group_of(mixed_norm_net())
    scores = iri_scores(dg, info, IRIConfig())  # the paper's ratio 0.1: one merge of 10
    expected = torch.tensor([1.0, 1.0] + [E2] * 8, dtype=torch.float64)
    torch.testing.assert_close(scores, expected)
    # the discounted channels are the layer's largest, none of its two lowest-L1 ones
    assert lowest_l1_overlap(info, scores, 2.0) == (2, 0)


def test_global_scale_reproduces_the_old_behaviour_lowest_norm_merged_first():
    dg, info = group_of(mixed_norm_net())
    scores = iri_scores(dg, info, IRIConfig(normalize=False))
    expected = torch.tensor([E2, E2, 1.0, 1.0] + [E2] * 6, dtype=torch.float64)
    torch.testing.assert_close(scores, expected)
    assert lowest_l1_overlap(info, scores, 2.0) == (2, 2)


def test_channels_of_one_shape_merge_whatever_their_norms_and_no_discount_no_overlap():
    gen = torch.Generator().manual_seed(0)
    desc = torch.rand(6, 4, generator=gen, dtype=torch.float64).numpy()
    desc[1] = 100 * desc[0]  # same shape, other norm: one point once normalised
    labels = cluster_labels(desc, IRIConfig(ratio=1 / 6))
    assert labels[0] == labels[1] and len(set(labels.tolist())) == 5
    dg, info = group_of(mixed_norm_net())
    nothing = torch.full((10,), E2, dtype=torch.float64)
    assert lowest_l1_overlap(info, nothing, 2.0) == (0, 0)


def test_iri_normalize_option_defaults_to_the_global_scale_chosen_on_val():
    assert DEFAULTS["iri_normalize"] is False
    assert iri_config(DEFAULTS, 0).normalize is False
    assert iri_config({**DEFAULTS, "iri_normalize": True}, 0).normalize is True
