"""Backbones with ordinary (prunable) BatchNorm, wrapped with torchvision's FPN."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

_RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
#: The narrow ResNet's stage widths and block counts when a config gives none.
NARROW_WIDTHS, NARROW_BLOCKS = (16, 32, 64, 128), (1, 1, 1, 1)


class NarrowResNet(nn.Module):
    """A ResNet of BasicBlocks with configurable stage widths, sized for CPU runs.

    Same graph as torchvision's ResNet (stem, four residual stages at strides 4..32),
    so every pruning method sees the coupled residual groups of the papers' ResNets.
    """

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], stem_width: int) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError("NarrowResNet needs four stage widths and four block counts")
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = stem_width
        for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers: list[nn.Module] = []
            for j in range(count):
                down = None
                s = stride if j == 0 else 1
                if s != 1 or in_ch != width:
                    down = nn.Sequential(
                        nn.Conv2d(in_ch, width, 1, stride=s, bias=False), nn.BatchNorm2d(width)
                    )
                layers.append(resnet.BasicBlock(in_ch, width, stride=s, downsample=down))
                in_ch = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - FPN uses children
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def key_list(keys: Sequence[str], limit: int = 20) -> str:
    """``keys`` comma separated, the first ``limit`` of them and how many more."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_state(
    model: nn.Module, path: str | None, *, optional: tuple[str, ...] = ("fc.",)
) -> None:
    """Load a backbone's weights from a local state_dict file (never downloaded), strictly:
    ``torch.load(weights_only=True)``; every parameter and buffer of ``model`` must be in
    the file and every key of the file in ``model``, but keys under ``optional`` (a
    classifier's ``fc.``, which detectors do not use). A ``{"state_dict": ...}`` wrapper
    is unwrapped. Missing and unexpected keys are named, with the file."""
    if not path:
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained_backbone: {p} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained_backbone: {p} is not a state_dict")
    own = model.state_dict()
    missing = [
        k
        for k in own
        if k not in state
        and not k.startswith(optional)
        and not k.endswith("num_batches_tracked")  # older files lack them; BN fills them in
    ]
    unexpected = [k for k in state if k not in own and not k.startswith(optional)]
    problems = []
    if missing:
        problems.append(f"lacks keys the backbone needs: {key_list(missing)}")
    if unexpected:
        problems.append(f"has keys the backbone lacks: {key_list(unexpected)}")
    if problems:
        raise ValueError(
            f"model.pretrained_backbone: {p} does not fit {type(model).__name__}: "
            + "; ".join(problems)
        )
    state = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(state, strict=False)


_load_pretrained = load_backbone_state


def resnet_fpn(
    arch: str,
    fpn_channels: int,
    *,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    pretrained_backbone: str | None = None,
) -> BackboneWithFPN:
    """ResNet (``resnet18``, ``resnet50`` or ``narrow``) + FPN with P2-P6 outputs."""
    if arch == "narrow":
        body: nn.Module = NarrowResNet(widths or NARROW_WIDTHS, blocks or NARROW_BLOCKS, stem_width)
        in_channels = list(widths or NARROW_WIDTHS)
    elif arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
        body = getattr(resnet, arch)(weights=None, norm_layer=nn.BatchNorm2d)
        _load_pretrained(body, pretrained_backbone)
        expansion = 4 if arch in ("resnet50", "resnet101") else 1
        in_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
    else:
        raise ValueError(f"model.backbone: unknown backbone {arch!r}")
    if arch == "narrow" and pretrained_backbone:
        _load_pretrained(body, pretrained_backbone)
    return BackboneWithFPN(
        body,
        return_layers=_RETURN_LAYERS,
        in_channels_list=in_channels,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=None,
    )


def resnet_body(
    arch: str,
    *,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    pretrained_backbone: str | None = None,
) -> tuple[nn.Module, list[int]]:
    """A ResNet (``narrow``, ``resnet18`` ... ``resnet101``) and its four stage widths."""
    if arch == "narrow":
        widths = list(widths or NARROW_WIDTHS)
        body: nn.Module = NarrowResNet(widths, blocks or NARROW_BLOCKS, stem_width)
        _load_pretrained(body, pretrained_backbone)
        return body, widths
    if arch not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ValueError(f"model.backbone: unknown backbone {arch!r}")
    body = getattr(resnet, arch)(weights=None, norm_layer=nn.BatchNorm2d)
    _load_pretrained(body, pretrained_backbone)
    expansion = 4 if arch in ("resnet50", "resnet101") else 1
    return body, [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]


def resnet_fpn_p3p7(
    arch: str,
    fpn_channels: int,
    *,
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    pretrained_backbone: str | None = None,
) -> BackboneWithFPN:
    """ResNet + FPN on C3-C5 with P6, P7 from P5: torchvision's RetinaNet/FCOS neck (P3-P7)."""
    body, channels = resnet_body(
        arch,
        widths=widths,
        blocks=blocks,
        stem_width=stem_width,
        pretrained_backbone=pretrained_backbone,
    )
    return BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=channels[1:],
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
        norm_layer=None,
    )
