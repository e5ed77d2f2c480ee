"""Named augmentation presets for detection training (torchvision-references style).

A transform takes and returns ``(image, target)``: ``image`` a float tensor [C, H, W],
``target`` a dict with "boxes" (xyxy, float [N, 4]). Random choices come from torch's
global generator, so seeding torch (as the training engine does) fixes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


class Identity:
    """Return the image and target unchanged."""

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return image, target

    def __repr__(self) -> str:
        return "Identity()"


class RandomHorizontalFlip:
    """Flip the image and its boxes left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(1).item() >= self.p:
            return image, target
        return hflip(image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Flip ``image`` [C, H, W] left-right; boxes become x1' = W - x2, x2' = W - x1.

    Returns a new target dict; the input target is not changed.
    """
    width = image.shape[-1]
    out = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, 0] = width - target["boxes"][:, 2]
        boxes[:, 2] = width - target["boxes"][:, 0]
        out["boxes"] = boxes
    return image.flip(-1), out


PRESETS: dict[str, Transform] = {
    "none": Identity(),
    "hflip": RandomHorizontalFlip(0.5),
}
"""Training augmentation by preset name."""


def get_transform(preset: str, train: bool) -> Transform:
    """The transform for ``preset``; evaluation (``train=False``) always gets the identity."""
    if preset not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown augmentation preset {preset!r}; known presets: {known}")
    return PRESETS[preset] if train else Identity()
