"""Image classifiers (ResNets) behind the detectors' API, for MIEP's ImageNet table.

:class:`Classifier` wraps a ResNet (``net``: torchvision's attribute names ``conv1`` ...
``layer4``, ``avgpool``, ``fc``) so that the training engine, the pruning core and the
methods treat it like a registry detector:

- ``model(images, targets)`` in train mode (``images`` a list of [3, H, W] tensors in
  [0, 1], ``targets`` dicts with ``labels`` = tensor([c]), c in 0..K-1) returns
  ``{"loss_classifier": cross-entropy}``;
- ``model(images)`` in eval mode returns one dict per image: ``scores`` (the K softmax
  probabilities) and ``labels`` (their argmax, a 0-d tensor);
- ``model(x)`` with one batched tensor (N, 3, H, W) returns the logits (N, K): the dense
  forward the pruning core traces (see ``checkpoint.example_inputs``).

A list of images is resized inside the model, like ``GeneralizedRCNNTransform``: each
image to ``image_size`` x ``image_size``, then ImageNet mean/std normalisation; a batched
tensor is only normalised. The crops come before, from the data transforms
(:func:`detprune.data.classification.classification_transform`): training takes a random
crop of ``crop_scale`` of the area, evaluation the centre square of ``crop_ratio`` of the
shorter side (torchvision's ImageNet evaluation: resize to 256, centre 224, ratio 0.875).
Train and eval mode thus build the same batch from the same images, so a teacher or guide
in eval mode sees what the training student sees (SAD, MIEP's FOI).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet

from detprune.models.backbones import NarrowResNet, key_list
from detprune.models.base import ModelEntry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` [3, H, W] resized (bilinear, antialiased) to [3, size, size]."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return F.interpolate(
        image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]


class Classifier(nn.Module):
    """A ResNet classifier with the detectors' calling conventions (module docstring)."""

    def __init__(
        self,
        net: nn.Module,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.net = net
        self.image_size = int(image_size)
        # plain tuples, not buffers: the state_dict holds the network's weights only
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def preprocess(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """A batch (N, 3, S, S) from a list of [3, H, W] images, each resized to S x S."""
        return torch.stack([resize_square(im, self.image_size) for im in images])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The ResNet's class logits for a normalised batch."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return n.fc(torch.flatten(n.avgpool(x), 1))

    def forward(self, images, targets=None):  # type: ignore[override]
        if isinstance(images, torch.Tensor):
            return self.logits(self.normalize(images))
        logits = self.logits(self.normalize(self.preprocess(images)))
        if self.training:
            if targets is None:
                raise ValueError("Classifier: targets are needed in train mode")
            labels = torch.cat([t["labels"].reshape(-1)[:1] for t in targets]).to(logits.device)
            return {"loss_classifier": F.cross_entropy(logits, labels)}
        probs = logits.float().softmax(dim=1)
        return [{"scores": p, "labels": p.argmax()} for p in probs]


def _load_weights(net: nn.Module, path: str) -> None:
    """Load a local state_dict (never downloaded); an ``fc`` of another class count is
    left out (the classifier keeps its fresh one)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained_backbone: {p} does not exist")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = net.state_dict()
    if any(k.startswith("fc.") and k in own and v.shape != own[k].shape for k, v in state.items()):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if unexpected:
        raise ValueError(
            f"model.pretrained_backbone: {p} has unexpected keys {key_list(unexpected)}"
        )
    if missing:
        raise ValueError(f"model.pretrained_backbone: {p} lacks keys {key_list(missing)}")


def build_classifier(
    num_classes: int,
    *,
    backbone: str = "resnet50",
    image_size: int = 224,
    crop_ratio: float = 0.875,
    crop_scale: Sequence[float] = (0.08, 1.0),
    widths: Sequence[int] | None = None,
    blocks: Sequence[int] | None = None,
    stem_width: int = 16,
    pretrained_backbone: str | None = None,
) -> Classifier:
    """A ResNet classifier with ordinary BatchNorm for ``num_classes`` classes.

    ``backbone``: a torchvision ResNet name (``resnet18`` ... ``resnet101``, the
    architecture only: nothing is downloaded) or ``narrow`` (the detectors'
    :class:`~detprune.models.backbones.NarrowResNet` with ``widths``, ``blocks``,
    ``stem_width``, plus global pooling and a linear classifier). ``crop_scale`` (area
    range of the training random-resized crop) and ``crop_ratio`` (centre crop of the
    shorter side for evaluation) are read by the pipeline's data transforms, not by the
    network. ``pretrained_backbone``: a local state_dict file;
    its ``fc`` is loaded only when it has ``num_classes`` outputs.
    """
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"model.crop_ratio must be in (0, 1], got {crop_ratio}")
    lo, hi = (float(v) for v in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"model.crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
    if backbone == "narrow":
        widths = list(widths or (16, 32, 64, 128))
        net: nn.Module = NarrowResNet(widths, blocks or (1, 1, 1, 1), stem_width)
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        net.fc = nn.Linear(widths[-1], num_classes)
    elif backbone in ("resnet18", "resnet34", "resnet50", "resnet101"):
        net = getattr(resnet, backbone)(
            weights=None, num_classes=num_classes, norm_layer=nn.BatchNorm2d
        )
    else:
        raise ValueError(f"model.backbone: unknown classifier backbone {backbone!r}")
    if pretrained_backbone:
        _load_weights(net, pretrained_backbone)
    return Classifier(net, image_size)


# The pruning interface: the final classifier keeps its K outputs; MIEP's FOI compares the
# last stage's features, weighted by the classifier's softmax confidence; DCP's auxiliary
# classifiers sit on the stage outputs; GCP groups and SAD taps follow the strides.
_CLS_PRUNING = {
    "ignored_layers": ("net.fc",),
    "neck_outputs": ("net.layer4",),
    "cls_logits": ("net.fc",),
    "aux_features": (
        ("net.layer1", 4),
        ("net.layer2", 8),
        ("net.layer3", 16),
        ("net.layer4", 32),
    ),
    "groups": {
        "stride4": ("net.conv1", "net.bn1", "net.layer1"),
        "stride8": ("net.layer2",),
        "stride16": ("net.layer3",),
        "stride32": ("net.layer4",),
        "head": ("net.fc",),
    },
    "distill_taps": {
        "net.layer1": "stride4",
        "net.layer2": "stride8",
        "net.layer3": "stride16",
        "net.layer4": "stride32",
    },
}

# torchvision's ImageNet recipe (references/classification, ResNet-50 v1 weights): SGD
# momentum 0.9, lr 0.1 for a global batch of 256 (32 per GPU x 8), 90 epochs, lr x0.1 at
# epochs 30 and 60, weight decay 1e-4, random-resized crop + horizontal flip.
IMAGENET_SCHEDULE = {
    "epochs": 90,
    "batch_size": 256,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 0.0001,
    "warmup_iters": 0,
    "schedule": "step",
    "milestones": [30, 60],
    "gamma": 0.1,
    "augment": "hflip",
}

CLASSIFICATION_MODELS: dict[str, ModelEntry] = {
    "resnet50_cls": ModelEntry(
        build_classifier,
        "ResNet-50 classifier, torchvision architecture, 224 px (MIEP's ImageNet table)",
        {"backbone": "resnet50", "image_size": 224, "crop_ratio": 0.875},
        image_size=224,
        schedule=IMAGENET_SCHEDULE,
        task="classification",
        **_CLS_PRUNING,
    ),
    "resnet_narrow_cls": ModelEntry(
        build_classifier,
        "narrow ResNet classifier (fasterrcnn_narrow_fpn's BasicBlock backbone, 32-256 ch), "
        "64 px: the CPU classifier",
        {
            "backbone": "narrow",
            "widths": (32, 64, 128, 256),
            "blocks": (1, 1, 1, 1),
            "stem_width": 32,
            "image_size": 64,
            "crop_ratio": 1.0,
            "crop_scale": (0.5, 1.0),
        },
        image_size=64,
        schedule={"lr": 0.05, "schedule": "cosine"},
        task="classification",
        **_CLS_PRUNING,
    ),
}
