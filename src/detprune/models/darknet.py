"""YOLOv4's backbones and neck (Bochkovskiy et al., "YOLOv4: Optimal Speed and Accuracy of
Object Detection", 2020), layer by layer after darknet's ``yolov4.cfg`` and
``yolov4-tiny.cfg``: CSPDarknet53 (Mish), SPP, the PANet neck (leaky ReLU), and
CSPDarknet53-tiny.

``width`` scales every channel count (rounded to a multiple of 8, at least 8) and
``depth`` every residual-block count (rounded, at least 1): ``width = depth = 1`` is the
paper's graph, smaller values give the same graph narrower and shallower for CPU runs.
Darknet layer numbers of ``yolov4.cfg`` are given in brackets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8, at least 8."""
    return max(8, int(round(channels * width / 8)) * 8)


class ConvBNAct(nn.Module):
    """Darknet's ``[convolutional]`` with ``batch_normalize=1``: conv (no bias), BN, activation."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, act: str = "mish") -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.Mish() if act == "mish" else nn.LeakyReLU(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def identity_init_(layer: ConvBNAct, offset: int, noise: float) -> None:
    """Start ``layer``'s conv as the identity from input channel ``offset + i`` to output
    channel ``i`` (centre tap, for as many channels as both sides have) plus ``noise`` times
    its default initialisation; the other output channels keep ``noise`` times theirs."""
    w = layer.conv.weight
    n = min(w.shape[0], w.shape[1] - offset)
    with torch.no_grad():
        w.mul_(noise)
        idx = torch.arange(n)
        w[idx, offset + idx, w.shape[2] // 2, w.shape[3] // 2] += 1.0


class ResBlock(nn.Module):
    """1x1 conv to ``hidden``, 3x3 conv back to ``channels``, shortcut (darknet ``from=-3``)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.cv1 = ConvBNAct(channels, hidden, 1)
        self.cv2 = ConvBNAct(hidden, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class CSPStage(nn.Module):
    """A CSPDarknet53 stage: 3x3/2 ``down`` conv; a ``short`` 1x1 branch (the cross-stage
    partial) and a ``main`` 1x1 branch through ``blocks`` and ``post``; concat [main, short];
    ``fuse`` 1x1. The first stage keeps full width in both branches, the others half."""

    def __init__(self, c_in: int, c_out: int, n: int, first: bool) -> None:
        super().__init__()
        part = c_out if first else c_out // 2
        self.down = ConvBNAct(c_in, c_out, 3, 2)
        self.short = ConvBNAct(c_out, part, 1)
        self.main = ConvBNAct(c_out, part, 1)
        hidden = c_out // 2 if first else part
        self.blocks = nn.Sequential(*(ResBlock(part, hidden) for _ in range(n)))
        self.post = ConvBNAct(part, part, 1)
        self.fuse = ConvBNAct(2 * part, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return self.fuse(torch.cat((self.post(self.blocks(self.main(x))), self.short(x)), 1))


class CSPDarknet53(nn.Module):
    """CSPDarknet53 [0-104]; returns the stride-8, -16 and -32 stage outputs [54, 85, 104]."""

    def __init__(self, width: float = 1.0, depth: float = 1.0) -> None:
        super().__init__()
        chans = [scaled(c, width) for c in (32, 64, 128, 256, 512, 1024)]
        blocks = [max(1, round(n * depth)) for n in (1, 2, 8, 8, 4)]
        self.stem = ConvBNAct(3, chans[0], 3)
        self.stages = nn.ModuleList(
            CSPStage(chans[i], chans[i + 1], blocks[i], first=i == 0) for i in range(5)
        )
        self.out_channels = chans[3:]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 2:
                outs.append(x)
        return outs


def _five(c_in: int, c: int, act: str = "leaky") -> nn.Sequential:
    """Darknet's five-conv block: 1x1 c, 3x3 2c, 1x1 c, 3x3 2c, 1x1 c."""
    return nn.Sequential(
        ConvBNAct(c_in, c, 1, act=act),
        ConvBNAct(c, 2 * c, 3, act=act),
        ConvBNAct(2 * c, c, 1, act=act),
        ConvBNAct(c, 2 * c, 3, act=act),
        ConvBNAct(2 * c, c, 1, act=act),
    )


class SPPBlock(nn.Module):
    """[105-116]: three convs, spatial pyramid pooling (max-pool 5, 9, 13, stride 1,
    concat [13, 9, 5, input]), three convs."""

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.pre = nn.Sequential(
            ConvBNAct(c_in, c, 1, act="leaky"),
            ConvBNAct(c, 2 * c, 3, act="leaky"),
            ConvBNAct(2 * c, c, 1, act="leaky"),
        )
        self.post = nn.Sequential(
            ConvBNAct(4 * c, c, 1, act="leaky"),
            ConvBNAct(c, 2 * c, 3, act="leaky"),
            ConvBNAct(2 * c, c, 1, act="leaky"),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        pools = [F.max_pool2d(x, k, 1, k // 2) for k in (13, 9, 5)]
        return self.post(torch.cat((*pools, x), 1))


class TopDown(nn.Module):
    """PANet's top-down path [117-136]: reduce + upsample, lateral 1x1 from the backbone,
    concat [lateral, upsampled], five convs; twice (stride 16, then stride 8)."""

    def __init__(self, c3: int, c4: int, c5: int) -> None:
        super().__init__()
        self.reduce5 = ConvBNAct(c5 // 2, c4 // 2, 1, act="leaky")
        self.lateral4 = ConvBNAct(c4, c4 // 2, 1, act="leaky")
        self.block4 = _five(c4, c4 // 2)
        self.reduce4 = ConvBNAct(c4 // 2, c3 // 2, 1, act="leaky")
        self.lateral3 = ConvBNAct(c3, c3 // 2, 1, act="leaky")
        self.block3 = _five(c3, c3 // 2)

    def forward(self, b3: Tensor, b4: Tensor, n5: Tensor) -> tuple[Tensor, Tensor]:
        up = F.interpolate(self.reduce5(n5), scale_factor=2.0, mode="nearest")
        t4 = self.block4(torch.cat((self.lateral4(b4), up), 1))
        up = F.interpolate(self.reduce4(t4), scale_factor=2.0, mode="nearest")
        return self.block3(torch.cat((self.lateral3(b3), up), 1)), t4


class BottomUp(nn.Module):
    """PANet's bottom-up path [141-147, 152-158]: 3x3/2 conv, concat with the top-down
    feature of that scale, five convs; twice (stride 16, then stride 32)."""

    def __init__(self, c3: int, c4: int, c5: int) -> None:
        super().__init__()
        self.down3 = ConvBNAct(c3 // 2, c4 // 2, 3, 2, act="leaky")
        self.block4 = _five(c4, c4 // 2)
        self.down4 = ConvBNAct(c4 // 2, c5 // 2, 3, 2, act="leaky")
        self.block5 = _five(c5, c5 // 2)

    def forward(self, n3: Tensor, t4: Tensor, n5: Tensor) -> tuple[Tensor, Tensor]:
        n4 = self.block4(torch.cat((self.down3(n3), t4), 1))
        return n4, self.block5(torch.cat((self.down4(n4), n5), 1))


class YOLOv4Neck(nn.Module):
    """SPP + PANet; returns the stride-8, -16, -32 features the heads read [136, 147, 158]."""

    def __init__(self, in_channels: Sequence[int]) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        self.spp = SPPBlock(c5, c5 // 2)
        self.topdown = TopDown(c3, c4, c5)
        self.bottomup = BottomUp(c3, c4, c5)
        self.out_channels = [c3 // 2, c4 // 2, c5 // 2]

    def pass_through_(self, noise: float) -> None:
        """Initialise the neck so that each output starts as the backbone feature of its
        scale: every conv on the path backbone -> SPP / top-down / bottom-up -> output is
        an identity on its first channels (from the backbone's or the same-scale branch of
        each concatenation) plus ``noise`` times its default initialisation; the reduce and
        down-sampling convs feeding the other branches keep their default initialisation.
        """
        c = self.spp.pre[2].conv.out_channels
        td, bu = self.topdown, self.bottomup
        plan = [(m, 0) for m in self.spp.pre]
        plan += [(self.spp.post[0], 3 * c)]  # concat [13, 9, 5, input]: the input part
        plan += [(m, 0) for m in self.spp.post[1:]]
        plan += [(td.lateral4, 0), (td.lateral3, 0), *((m, 0) for m in (*td.block4, *td.block3))]
        for block, down in ((bu.block4, bu.down3), (bu.block5, bu.down4)):
            plan += [(block[0], down.conv.out_channels)]  # concat [down, same scale]
            plan += [(m, 0) for m in block[1:]]
        for layer, offset in plan:
            identity_init_(layer, offset, noise)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        b3, b4, b5 = feats
        n5 = self.spp(b5)
        n3, t4 = self.topdown(b3, b4, n5)
        n4, n5 = self.bottomup(n3, t4, n5)
        return [n3, n4, n5]


class CSPTinyBlock(nn.Module):
    """A CSPDarknet53-tiny block (``yolov4-tiny.cfg`` layers 2-8, 10-16, 18-24).

    Darknet runs a 3x3 conv of ``c`` channels and routes its second half (``groups=2,
    group_id=1``) into two 3x3 convs; here that conv is written as its two halves
    ``part_a`` and ``part_b`` (the same function, parameters and MACs), so that
    torch-pruning sees two convs instead of a channel slice it cannot keep aligned.
    Returns concat [part_a, part_b, fuse] (``2c`` channels, before the max-pool) and
    ``fuse``'s output (the tiny neck's stride-16 lateral).
    """

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        half = c // 2
        self.part_a = ConvBNAct(c_in, half, 3, act="leaky")
        self.part_b = ConvBNAct(c_in, c - half, 3, act="leaky")
        self.conv1 = ConvBNAct(c - half, half, 3, act="leaky")
        self.conv2 = ConvBNAct(half, half, 3, act="leaky")
        self.fuse = ConvBNAct(2 * half, c, 1, act="leaky")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b = self.part_b(x)
        y1 = self.conv1(b)
        fused = self.fuse(torch.cat((self.conv2(y1), y1), 1))
        return torch.cat((self.part_a(x), b, fused), 1), fused


class CSPDarknetTiny(nn.Module):
    """CSPDarknet53-tiny [0-26]; returns the stride-16 ``fuse`` output [23] and the final
    stride-32 conv [26]."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c = [scaled(v, width) for v in (32, 64, 128, 256, 512)]
        self.stem0 = ConvBNAct(3, c[0], 3, 2, act="leaky")
        self.stem1 = ConvBNAct(c[0], c[1], 3, 2, act="leaky")
        self.blocks = nn.ModuleList(
            (CSPTinyBlock(c[1], c[1]), CSPTinyBlock(2 * c[1], c[2]), CSPTinyBlock(2 * c[2], c[3]))
        )
        self.final = ConvBNAct(2 * c[3], c[4], 3, act="leaky")
        self.out_channels = [c[3], c[4]]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem1(self.stem0(x))
        x = F.max_pool2d(self.blocks[0](x)[0], 2, 2)
        x = F.max_pool2d(self.blocks[1](x)[0], 2, 2)
        x, lateral = self.blocks[2](x)
        return [lateral, self.final(F.max_pool2d(x, 2, 2))]


class TinyNeck(nn.Module):
    """``yolov4-tiny.cfg`` [27-34]: 1x1 ``reduce`` of the stride-32 feature; its 1x1
    ``lateral`` upsampled and concatenated with the backbone's stride-16 lateral.
    Returns the stride-16 and stride-32 features the two heads read [34, 27]."""

    def __init__(self, in_channels: Sequence[int]) -> None:
        super().__init__()
        c4, c5 = in_channels
        self.reduce = ConvBNAct(c5, c5 // 2, 1, act="leaky")
        self.lateral = ConvBNAct(c5 // 2, c5 // 4, 1, act="leaky")
        self.out_channels = [c5 // 4 + c4, c5 // 2]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        b4, b5 = feats
        n5 = self.reduce(b5)
        up = F.interpolate(self.lateral(n5), scale_factor=2.0, mode="nearest")
        return [torch.cat((up, b4), 1), n5]


class YOLOHead(nn.Module):
    """Per scale a 3x3 conv (``convs.i``, leaky) and the 1x1 prediction conv (``preds.i``)."""

    def __init__(
        self, in_channels: Sequence[int], mid_channels: Sequence[int], outputs: int
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBNAct(c, m, 3, act="leaky") for c, m in zip(in_channels, mid_channels, strict=True)
        )
        self.preds = nn.ModuleList(nn.Conv2d(m, outputs, 1) for m in mid_channels)

    def pass_through_(self, noise: float) -> None:
        """Each 3x3 conv starts as an identity on its first channels plus ``noise`` times
        its default initialisation (see :func:`identity_init_`)."""
        for layer in self.convs:
            identity_init_(layer, 0, noise)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [p(c(f)) for f, c, p in zip(feats, self.convs, self.preds, strict=True)]


def init_neck_(neck: YOLOv4Neck, head: YOLOHead, identity: float | None, bn_bias: float) -> None:
    """Start SPP + PANet (and the heads' 3x3 convs) close to a linear pass-through of the
    backbone features, so that deep plain conv-BN-activation chains do not scramble them
    before training has begun: with ``identity`` (a number) every conv on the pass-through
    paths is an identity plus ``identity`` times its default initialisation
    (:meth:`YOLOv4Neck.pass_through_`; DiracNets' identity parametrisation, Zagoruyko &
    Komodakis 2017), and every BN bias of the neck starts at ``bn_bias``, which puts the
    leaky ReLUs after them in their linear part (Yang et al., ICLR 2019: batch-normalised
    plain stacks explode gradients the less linear their activations are). The heads' BN
    biases stay 0: positive features there would shift the prediction priors.
    ``identity=None, bn_bias=0`` is PyTorch's default initialisation."""
    if identity is not None:
        neck.pass_through_(identity)
        head.pass_through_(identity)
    for m in neck.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, bn_bias)


def yolov4_darknet_convs(depth: float = 1.0) -> dict[int, str]:
    """Darknet layer number of every conv of YOLOv4 -> its module path here.

    Walks ``yolov4.cfg`` in order (routes, shortcuts, pools, upsamples and yolo layers take
    numbers too); with ``depth < 1`` the numbering is that of the shallower graph.
    """
    out: dict[int, str] = {0: "backbone.stem"}
    i = 1
    for s, n in enumerate(max(1, round(n * depth)) for n in (1, 2, 8, 8, 4)):
        p = f"backbone.stages.{s}"
        out.update({i: f"{p}.down", i + 1: f"{p}.short", i + 3: f"{p}.main"})
        i += 4
        for b in range(n):
            out.update({i: f"{p}.blocks.{b}.cv1", i + 1: f"{p}.blocks.{b}.cv2"})
            i += 3  # the shortcut
        out.update({i: f"{p}.post", i + 2: f"{p}.fuse"})
        i += 3
    names = ["neck.spp.pre.0", "neck.spp.pre.1", "neck.spp.pre.2", *[None] * 6]
    names += ["neck.spp.post.0", "neck.spp.post.1", "neck.spp.post.2"]
    names += ["neck.topdown.reduce5", None, None, "neck.topdown.lateral4", None]
    names += [f"neck.topdown.block4.{j}" for j in range(5)]
    names += ["neck.topdown.reduce4", None, None, "neck.topdown.lateral3", None]
    names += [f"neck.topdown.block3.{j}" for j in range(5)]
    names += ["head.convs.0", "head.preds.0", None, None, "neck.bottomup.down3", None]
    names += [f"neck.bottomup.block4.{j}" for j in range(5)]
    names += ["head.convs.1", "head.preds.1", None, None, "neck.bottomup.down4", None]
    names += [f"neck.bottomup.block5.{j}" for j in range(5)]
    names += ["head.convs.2", "head.preds.2", None]
    out.update({i + j: name for j, name in enumerate(names) if name is not None})
    return out


# GCP's five groups of YOLOv4 (darknet layers [0, 56), [56, 86), [86, 117), [117, 137),
# [137, 162) of yolov4.cfg) as module prefixes: the backbone up to stride 8 with the
# stride-16 down-sampling conv [55]; the rest of the stride-16 stage; the stride-32 stage
# with SPP [86-116]; PANet's top-down path [117-136]; the heads with PANet's bottom-up
# path [137-161]. The narrow configuration keeps the same modules in the same groups.
_S3 = "backbone.stages.3"
YOLOV4_GROUPS = {
    "backbone_early": (
        "backbone.stem",
        "backbone.stages.0",
        "backbone.stages.1",
        "backbone.stages.2",
        f"{_S3}.down",
    ),
    "backbone_late": (f"{_S3}.short", f"{_S3}.main", f"{_S3}.blocks", f"{_S3}.post", f"{_S3}.fuse"),
    "spp": ("backbone.stages.4", "neck.spp"),
    "pan": ("neck.topdown",),
    "heads": ("neck.bottomup", "head"),
}
