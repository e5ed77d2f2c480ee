"""The ``pretrain_backbone`` stage: a detector's backbone trained as a classifier.

The backbone is the very module the detector builds (same class, same architecture
keyword arguments, :func:`build_backbone`), followed by global average pooling and a
linear layer; it is trained on the embedded synthetic classification set
(:func:`detprune.data.classification.synthetic_arrays`: shapes and textures on the
detection set's backgrounds, at ``pretrain.image_size``), seeded, on the CPU or GPU the
schedule allows. Only the backbone's state_dict is saved (the file the detector builders
load strictly with ``weights_only=True``), with a JSON record beside it: family,
architecture, schedule, the classifier's accuracy on the set's val split, versions.
Inputs are normalised as the detector normalises them: ImageNet mean/std for the ResNets
(torchvision's detection transform), none for the darknets (YOLO's letterbox in [0, 1]).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detprune import backbone_init
from detprune.config import ConfigError
from detprune.utils.io import torch_save, write_json
from detprune.utils.provenance import provenance
from detprune.utils.seed import seed_everything

log = logging.getLogger("detprune.pretrain")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_backbone(kind: str, arch: Mapping[str, Any]) -> nn.Module:
    """The backbone module a detector of ``kind`` / ``arch`` builds (see
    :func:`detprune.backbone_init.backbone_arch`)."""
    from torchvision.models import resnet

    from detprune.models.backbones import NARROW_BLOCKS, NARROW_WIDTHS, NarrowResNet
    from detprune.models.darknet import CSPDarknet53, CSPDarknetTiny

    if kind == "resnet":
        if arch["backbone"] == "narrow":  # as backbones.resnet_fpn / resnet_body build it
            return NarrowResNet(
                arch.get("widths") or NARROW_WIDTHS,
                arch.get("blocks") or NARROW_BLOCKS,
                arch.get("stem_width") or 16,
            )
        return getattr(resnet, arch["backbone"])(weights=None, norm_layer=nn.BatchNorm2d)
    if kind == "cspdarknet53":
        return CSPDarknet53(arch["width"], arch["depth"])
    if kind == "cspdarknet53_tiny":
        return CSPDarknetTiny(arch["width"])
    raise ValueError(f"unknown backbone kind {kind!r}")


def features(body: nn.Module, x: Tensor) -> Tensor:
    """The backbone's deepest feature map (stride 32) for a normalised batch."""
    from torchvision.models.resnet import ResNet

    if isinstance(body, ResNet):  # its forward would run the ImageNet fc
        x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
        return body.layer4(body.layer3(body.layer2(body.layer1(x))))
    out = body(x)
    return out[-1] if isinstance(out, (list, tuple)) else out


def backbone_state(body: nn.Module) -> dict[str, Tensor]:
    """What the pretrained file holds: the backbone's state_dict (a torchvision ResNet's
    unused ImageNet ``fc`` left out)."""
    return {k: v.detach().clone() for k, v in body.state_dict().items() if not k.startswith("fc.")}


class BackboneClassifier(nn.Module):
    """``body`` -> global average pooling -> linear, on images in [0, 1]."""

    def __init__(self, kind: str, arch: Mapping[str, Any], num_classes: int) -> None:
        super().__init__()
        self.body = build_backbone(kind, arch)
        resnet = kind == "resnet"
        self.mean = IMAGENET_MEAN if resnet else (0.0, 0.0, 0.0)
        self.std = IMAGENET_STD if resnet else (1.0, 1.0, 1.0)
        was = self.body.training
        with torch.no_grad():
            channels = features(self.body.eval(), torch.zeros(1, 3, 64, 64)).shape[1]
        self.body.train(was)
        self.fc = nn.Linear(channels, num_classes)

    def normalize(self, x: Tensor) -> Tensor:
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def features(self, x: Tensor) -> Tensor:
        return features(self.body, self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _device(sched: Mapping[str, Any]) -> torch.device:
    want = sched.get("device", "auto")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


def _to_tensor(images: Any) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, S, S)


def accuracy(model: BackboneClassifier, images: Tensor, labels: Tensor, batch: int) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 ``images``."""
    device = next(model.parameters()).device
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].to(device).float() / 255
            right += int((model(x).argmax(1).cpu() == labels[i : i + batch]).sum())
    return right / max(1, len(images))


def train_classifier(
    kind: str, arch: Mapping[str, Any], sched: Mapping[str, Any]
) -> tuple[BackboneClassifier, dict[str, Any]]:
    """Train the classifier of ``kind`` / ``arch`` on the synthetic set of ``sched``
    (``pretrain``'s keys); deterministic for a seed on the CPU. Returns it and a record."""
    from detprune.data.classification import synthetic_arrays

    seed = int(sched["seed"])
    k, size = int(sched["num_classes"]), int(sched["image_size"])
    t0 = time.perf_counter()
    tr_x, tr_y = synthetic_arrays("train", int(sched["num_train"]), size, k, seed)
    va_x, va_y = synthetic_arrays("val", int(sched["num_val"]), size, k, seed)
    log.info("synthetic classification set: %d train, %d val images", len(tr_y), len(va_y))
    train_x, train_y = _to_tensor(tr_x), torch.from_numpy(tr_y)
    val_x, val_y = _to_tensor(va_x), torch.from_numpy(va_y)
    gen = seed_everything(seed)
    device = _device(sched)
    model = BackboneClassifier(kind, arch, k).to(device)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=float(sched["lr"]),
        momentum=float(sched["momentum"]),
        weight_decay=float(sched["weight_decay"]),
    )
    batch = int(sched["batch_size"])
    steps_per_epoch = max(1, len(train_y) // batch)  # full batches only (BatchNorm)
    total = steps_per_epoch * int(sched["epochs"])
    lr0, step, loss = float(sched["lr"]), 0, float("nan")
    for epoch in range(int(sched["epochs"])):
        model.train()
        order = torch.randperm(len(train_y), generator=gen)
        flips = torch.rand(len(train_y), generator=gen) < 0.5
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            x = train_x[idx].float() / 255
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
            for group in opt.param_groups:  # cosine decay over the whole schedule
                group["lr"] = 0.5 * lr0 * (1 + math.cos(math.pi * step / total))
            out = F.cross_entropy(model(x.to(device)), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            loss, step = float(out.detach()), step + 1
        log.info("pretrain epoch %d/%d: loss %.4f", epoch + 1, sched["epochs"], loss)
    val_acc = accuracy(model, val_x, val_y, batch)
    record = {
        "val_accuracy": val_acc,
        "final_train_loss": loss,
        "iterations": total,
        "seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
    }
    log.info("classifier val accuracy %.4f (%d classes)", val_acc, k)
    return model.cpu().eval(), record


def pretrain(config: dict[str, Any], out: str, meta_out: str) -> dict[str, Any]:
    """Pretrain the backbone of ``config``'s detector; write ``out`` (its state_dict) and
    ``meta_out`` (the record). ``out`` must be the file ``config`` plans
    (:func:`detprune.backbone_init.pretrained_path`), by name."""
    arch = backbone_init.backbone_arch(config)
    if arch is None:
        raise ConfigError(f"model {config['model']['name']!r} declares no backbone to pretrain")
    bid = backbone_init.backbone_id(config)
    if Path(out).name != f"{bid}.pt":
        raise ConfigError(
            f"pretrain: {out} is not the file this config plans for its backbone ({bid}.pt)"
        )
    sched = backbone_init.schedule(config)
    missing = [k for k in backbone_init.SCHEDULE_KEYS if k not in sched]
    if missing:
        raise ConfigError(f"config field 'pretrain': missing {missing}")
    model, record = train_classifier(arch["kind"], arch["arch"], sched)
    torch_save(out, backbone_state(model.body))
    meta = provenance(
        None,
        stage="pretrain",
        backbone=bid,
        family=arch["family"],
        kind=arch["kind"],
        arch=arch["arch"],
        schedule=sched,
        classes=int(sched["num_classes"]),
        **record,
    )
    write_json(meta_out, meta)
    log.info("wrote %s (val accuracy %.4f)", out, record["val_accuracy"])
    return meta
