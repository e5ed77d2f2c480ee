"""SSD with a ResNet backbone: the CPU configuration trains, evaluates, prunes and reloads;
the ResNet-50 configurations have the published architecture's size."""

from pathlib import Path

import pytest
import torch

from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model
from tests.unit.detector_checks import check_prunes_and_reloads, check_trains_and_evaluates

torch.set_num_threads(1)

SSD_NAMES = ("ssd300_r50", "ssd512_r50", "ssd_narrow")


def test_ssd_narrow_overfits_a_batch_and_is_scored_by_pycocotools(tmp_path: Path):
    check_trains_and_evaluates("ssd_narrow", tmp_path, iters=60, lr=0.01, min_ap50=0.5)


def test_ssd_narrow_prunes_to_half_the_flops_and_reloads(tmp_path: Path):
    report = check_prunes_and_reloads("ssd_narrow", tmp_path)
    # the backbone and the extra blocks lost channels; the predictors kept theirs
    assert report["layers"]["backbone.body.layer2.0.conv1"][0] < 64
    assert any(report["layers"][f"backbone.extra.{i}.0"][0] < 64 for i in range(4))


@pytest.mark.parametrize("name", SSD_NAMES)
def test_declared_modules_exist(name: str):
    entry = MODELS[name]
    model = build_model(name, 4)
    paths = [*entry.ignored_layers, *entry.neck_outputs, *entry.cls_logits, *entry.distill_taps]
    paths += [p for p, _ in entry.aux_features]
    paths += [p for prefixes in entry.groups.values() for p in prefixes]
    for path in paths:
        model.get_submodule(path)
    assert entry.per_roi_modules == ()
    # background + K softmax columns per default box: labels 1..K round-trip
    cls = model.get_submodule(entry.cls_logits[0])
    assert cls.out_channels % (4 + 1) == 0


def _levels(model: torch.nn.Module, size: int) -> list[tuple[int, int]]:
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.zeros(1, 3, size, size))
    return [tuple(f.shape[-2:]) for f in feats.values()]


def test_ssd300_r50_is_nvidia_ssd300_v1_1():
    """NVIDIA DeepLearningExamples, PyTorch/Detection/SSD/ssd/model.py (SSD300 v1.1):
    ResNet-50 conv1..conv4_x with conv4_x at stride 1, out channels [1024, 512, 512, 256,
    256, 256], extra blocks of 1x1 (256, 256, 128, 128, 128) + 3x3 convs with BN,
    [4, 6, 6, 6, 4, 4] default boxes per position, 81 classes (COCO + background).
    """
    model = build_model("ssd300_r50", 80)
    assert _levels(model, 300) == [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    # the SSD paper's 8732 default boxes
    per_position = model.anchor_generator.num_anchors_per_location()
    assert per_position == [4, 6, 6, 6, 4, 4]
    assert (
        sum(n * h * w for n, (h, w) in zip(per_position, _levels(model, 300), strict=True)) == 8732
    )
    # parameters of NVIDIA's definition, by hand: torchvision resnet50 (25,557,032) minus
    # layer4 (14,964,736) and fc (2,049,000); five extra blocks; 3x3 loc + conf heads
    resnet_to_conv4 = 25_557_032 - 14_964_736 - 2_049_000
    extras = sum(
        i * m + 2 * m + m * o * 9 + 2 * o
        for i, m, o in [(1024, 256, 512), (512, 256, 512), (512, 128, 256)] + [(256, 128, 256)] * 2
    )
    heads = sum(
        (c * 9 + 1) * n * (4 + 81)
        for c, n in zip((1024, 512, 512, 256, 256, 256), (4, 6, 6, 6, 4, 4), strict=True)
    )
    assert resnet_to_conv4 + extras + heads == 22_894_902
    assert count_params(model) == 22_894_902
    # FLOPs: LCP (Neurocomputing 2020, quoted in MIEP's table) reports its pruned SSD R50
    # at 10.7 GFLOPs (multiply-accumulates) keeping 53% of them: 10.7 / 0.53 = 20.19 G
    macs = count_macs(model, 300)["macs"]
    assert macs == pytest.approx(10.7e9 / 0.53, rel=0.05)
    assert macs == pytest.approx(20.15e9, rel=0.001)


def test_ssd512_r50_has_seven_levels_and_the_ssd512_default_boxes():
    model = build_model("ssd512_r50", 80)
    levels = _levels(model, 512)
    assert levels == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    per_position = model.anchor_generator.num_anchors_per_location()
    assert per_position == [4, 6, 6, 6, 6, 4, 4]
    assert sum(n * h * w for n, (h, w) in zip(per_position, levels, strict=True)) == 24564
    # for information (no published SSD512-ResNet-50 figure): 24.40 M params, 57.2 GMACs
    assert count_params(model) == pytest.approx(24.40e6, rel=0.01)
