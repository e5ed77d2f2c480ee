"""The paper configuration of Faster R-CNN matches torchvision's published figures."""

import pytest

from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model

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
