"""The paper configuration of Faster R-CNN matches torchvision's published figures, and its
dense tracing forward gives torch-pruning the same groups at any input size (800 px too)."""

import pytest
import torch
import torch_pruning as tp
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping
from torchvision.ops.poolers import initLevelMapper

from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model
from detprune.models.fasterrcnn import reference_boxes
from detprune.pruning.importance.magnitude import l1_importance
from detprune.pruning.procedures.oneshot import layer_widths, macs_counter, prune_once

# torchvision model card of fasterrcnn_resnet50_fpn (COCO, 91 outputs incl. background):
# 41,755,286 parameters and 134.38 GFLOPS (multiply-accumulates at 800x800 with the
# 1000 test-time proposals). torchvision's FrozenBatchNorm keeps scale and shift as
# buffers; ours are trainable parameters (53,120 of them), hence the small difference.
PUBLISHED_PARAMS = 41_755_286
PUBLISHED_GMACS = 134.38


def test_fasterrcnn_r50_fpn_params_and_flops_match_torchvision():
    model = build_model("fasterrcnn_r50_fpn", 90)
    params = count_params(model)
    bn = sum(
        m.weight.numel() + m.bias.numel()
        for m in model.modules()
        if m.__class__.__name__ == "BatchNorm2d"
    )
    assert params - bn == PUBLISHED_PARAMS
    assert params == pytest.approx(PUBLISHED_PARAMS, rel=0.05)
    macs = count_macs(
        model,
        800,
        per_roi_modules=MODELS["fasterrcnn_r50_fpn"].per_roi_modules,
        rois_per_image=1000,
    )["macs"]
    assert macs / 1e9 == pytest.approx(PUBLISHED_GMACS, rel=0.01)


# Reference boxes of the dense (tracing) forward: before they shared one FPN level, the
# 800 px R50-FPN trace put them on levels 4 and 5 and building torch-pruning's groups
# ran out of memory (two chained 7 x 7 flatten mappings of the RoIAlign output).
@pytest.mark.parametrize("size", [64, 128, 320, 800])
def test_reference_boxes_fall_on_one_fpn_level(size):
    boxes = reference_boxes(size, size)
    mapper = initLevelMapper(2, 5)  # FPN levels P2-P5, torchvision's canonical 224 px
    assert torch.unique(mapper([boxes])).numel() == 1


def _flatten_strides(model, size):
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=(example,))
    return sorted(
        im._stride
        for node in dg.module2node.values()
        for dep in node.dependencies
        for im in dep.index_mapping
        if isinstance(im, _FlattenIndexMapping) and not im.reverse
    )


def _pruned_widths(model, size, entry, global_pruning):
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    opts = {"global_pruning": global_pruning, "max_layer_ratio": 0.9, "round_to": None}
    pruned, _ = prune_once(model, example, l1_importance(), 0.4, list(entry.ignored_layers), opts)
    return pruned, layer_widths(pruned)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_trace_size_does_not_change_the_pruned_widths(global_pruning):
    """The default detector traced at 320 px (where the old reference boxes spanned two
    FPN levels) has one RoIAlign flatten mapping (7 x 7) and prunes to the same widths as
    traced at its own 128 px; the pruned model runs at 320 px."""
    torch.manual_seed(0)
    entry = MODELS["fasterrcnn_narrow_fpn"]
    model = build_model("fasterrcnn_narrow_fpn", 3).eval()
    assert _flatten_strides(model, 128) == [49]
    assert _flatten_strides(model, 320) == [49]
    small, w128 = _pruned_widths(model, 128, entry, global_pruning)
    big, w320 = _pruned_widths(model, 320, entry, global_pruning)
    assert w320 == w128
    assert w128["backbone.fpn.layer_blocks.0.0"] < 64  # the FPN channels were pruned
    assert w128["roi_heads.box_head.fc6"] < 256
    assert big.roi_heads.box_head.fc6.in_features == w128["backbone.fpn.layer_blocks.0.0"] * 49
    with torch.no_grad():
        out = big([torch.rand(3, 320, 320)])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_r50_fpn_prunes_at_800px():
    """One uniform l1 step of the paper's Faster R-CNN traced at its 800 px input: the
    groups build (this ran out of 23 GB before), the FLOPs at 800 px fall, and the pruned
    model still detects on an 800 x 1067 image."""
    torch.manual_seed(0)
    entry = MODELS["fasterrcnn_r50_fpn"]
    model = build_model("fasterrcnn_r50_fpn", 80, {"max_size": 1333}).eval()
    pruned, widths = _pruned_widths(model, 800, entry, False)
    assert widths["backbone.fpn.layer_blocks.0.0"] == 153  # 256 less ceil(40 %) = 103
    macs = macs_counter(800, entry.per_roi_modules, 1000)
    kept = macs(pruned) / macs(model)
    assert 0.3 < kept < 0.45  # about 0.6 ** 2 of the conv MACs
    with torch.no_grad():
        out = pruned([torch.rand(3, 480, 640)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
