"""Model cost: parameters and MACs at a recorded input size (latency: :mod:`.latency`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(
    model: nn.Module,
    image_size: int,
    *,
    per_roi_modules: tuple[str, ...] = (),
    rois_per_image: int = 0,
) -> dict[str, Any]:
    """Multiply-accumulates of conv and linear layers for one ``image_size`` square image.

    Modules under ``per_roi_modules`` run once per region of interest; their cost is
    counted per RoI and multiplied by a fixed ``rois_per_image``, so the figure does not
    depend on how many proposals survive NMS for a given input.
    """
    totals = {"dense": 0, "per_roi": 0}
    per_layer: dict[str, int] = {}
    handles = []

    def hook(name: str, per_roi: bool):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                macs = output.numel() * (module.in_channels // module.groups) * k
            else:
                macs = output.numel() * module.in_features
            if per_roi:
                rows = max(output.shape[0], 1)
                macs = macs // rows * rois_per_image
                totals["per_roi"] += macs
            else:
                totals["dense"] += macs
            per_layer[name] = per_layer.get(name, 0) + macs

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            per_roi = any(name.startswith(p) for p in per_roi_modules)
            handles.append(module.register_forward_hook(hook(name, per_roi)))
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    try:
        model([torch.rand(3, image_size, image_size, generator=gen).to(device)])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        "macs": totals["dense"] + totals["per_roi"],
        "macs_per_roi_part": totals["per_roi"],
        "input_size": [image_size, image_size],
        "rois_per_image": rois_per_image,
        "per_layer": per_layer,
    }
