"""RetinaNet and FCOS (torchvision) on ResNet + FPN P3-P7: the CPU configurations train,
evaluate, prune and reload; the ResNet-50 configurations are torchvision's models."""

from pathlib import Path

import pytest
import torch
from torch import nn

from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model
from tests.unit.detector_checks import check_prunes_and_reloads, check_trains_and_evaluates

torch.set_num_threads(1)

NAMES = (
    "retinanet_r50_fpn",
    "retinanet_narrow_fpn",
    "fcos_r50_fpn",
    "fcos_narrow_fpn",
    "fsaf_r50_fpn",
    "fsaf_narrow_fpn",
)


def test_retinanet_narrow_overfits_a_batch_and_is_scored_by_pycocotools(tmp_path: Path):
    check_trains_and_evaluates("retinanet_narrow_fpn", tmp_path, iters=60, lr=0.02, min_ap50=0.5)


def test_fcos_narrow_overfits_a_batch_and_is_scored_by_pycocotools(tmp_path: Path):
    check_trains_and_evaluates("fcos_narrow_fpn", tmp_path, iters=40, lr=0.02, min_ap50=0.5)


def test_retinanet_narrow_prunes_to_half_the_flops_and_reloads(tmp_path: Path):
    layers = check_prunes_and_reloads("retinanet_narrow_fpn", tmp_path)["layers"]
    # the towers shared by the five levels are pruned once for all of them, and so are
    # the FPN outputs that feed them
    assert layers["head.classification_head.conv.0.0"][0] < 64
    assert layers["backbone.fpn.layer_blocks.0.0"][0] < 64


def test_fcos_narrow_prunes_to_half_the_flops_and_reloads(tmp_path: Path):
    layers = check_prunes_and_reloads("fcos_narrow_fpn", tmp_path)["layers"]
    assert layers["head.classification_head.conv.0"][0] < 64


@pytest.mark.parametrize("name", NAMES)
def test_declared_modules_exist_and_heads_have_k_channels(name: str):
    entry = MODELS[name]
    model = build_model(name, 5)
    paths = [*entry.ignored_layers, *entry.neck_outputs, *entry.cls_logits, *entry.distill_taps]
    paths += [p for p, _ in entry.aux_features]
    paths += [p for prefixes in entry.groups.values() for p in prefixes]
    for path in paths:
        model.get_submodule(path)
    assert entry.per_roi_modules == ()
    # one sigmoid channel per foreground class (no background channel): 9 anchors x 5
    cls = model.get_submodule("head.classification_head.cls_logits")
    assert cls.out_channels == (5 if name.startswith("fcos") else 9 * 5)
    towers = model.head.classification_head.conv
    convs = sum(isinstance(m, nn.Conv2d) for m in towers.modules())
    assert convs == (2 if "narrow" in name else 4)


def test_fcos_narrow_groupnorm_has_16_channels_per_group():
    model = build_model("fcos_narrow_fpn", 3)
    norms = [m for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_groups == 4 and m.num_channels == 64 for m in norms)


@pytest.mark.parametrize("name", ["retinanet_narrow_fpn", "fsaf_narrow_fpn"])
def test_cpu_retina_towers_have_groupnorm_and_the_paper_towers_do_not(name: str):
    # GroupNorm(4, 64) after each of the 2 x 2 tower convs (conv, GN, ReLU), as in
    # torchvision's RetinaNet v2; null gives the papers' plain conv + ReLU towers
    model = build_model(name, 3)
    towers = [model.head.classification_head.conv, model.head.regression_head.conv]
    for block in (b for t in towers for b in t):
        conv, norm, act = block
        assert isinstance(conv, nn.Conv2d) and conv.bias is None
        assert isinstance(norm, nn.GroupNorm) and (norm.num_groups, norm.num_channels) == (4, 64)
        assert isinstance(act, nn.ReLU)
    plain = build_model(name, 3, {"head_norm_groups": None})
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    assert count_params(model) - count_params(plain) == 4 * (2 * 64 - 64)  # GN affine - biases
    with pytest.raises(ValueError, match="model.head_norm_groups: 0"):
        build_model(name, 3, {"head_norm_groups": 0})


@pytest.mark.parametrize(
    ("name", "anchors"),
    [("retinanet_narrow_fpn", 9), ("fcos_narrow_fpn", 1), ("fsaf_narrow_fpn", 9)],
)
def test_labels_round_trip_through_the_shifted_channels(name: str, anchors: int):
    model = build_model(name, 3, {"image_size": 64}).eval()
    with torch.no_grad():  # make channel 2 (label 3) fire everywhere
        model.head.classification_head.cls_logits.bias.view(anchors, 3)[:, 2] = 10.0
        out = model([torch.rand(3, 64, 64)])[0]
    assert len(out["labels"]) > 0 and set(out["labels"].tolist()) == {3}


def _without_bn_affine(model: nn.Module) -> int:
    """torchvision's figures use FrozenBatchNorm2d, whose affine terms are buffers."""
    bn = sum(
        p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    )
    return count_params(model) - bn


def test_retinanet_r50_fpn_is_torchvisions_retinanet():
    # torchvision RetinaNet_ResNet50_FPN_Weights.COCO_V1: num_params 34,014,999 and
    # 151.54 GFLOPS (multiply-accumulates, as for resnet50's 4.09) with 91 classes at 800 px
    model = build_model("retinanet_r50_fpn", 91)
    assert _without_bn_affine(model) == 34_014_999
    assert count_macs(model, 800)["macs"] == pytest.approx(151.54e9, abs=0.005e9)


def test_fcos_r50_fpn_is_torchvisions_fcos():
    # torchvision FCOS_ResNet50_FPN_Weights.COCO_V1: num_params 32,269,600, 128.21 GFLOPS
    model = build_model("fcos_r50_fpn", 91)
    assert _without_bn_affine(model) == 32_269_600
    assert count_macs(model, 800)["macs"] == pytest.approx(128.21e9, abs=0.005e9)
