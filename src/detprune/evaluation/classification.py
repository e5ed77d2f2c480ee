"""Top-1 / top-5 accuracy of a classifier (the detectors' COCO AP counterpart)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from detprune.data.coco import collate


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 8
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` on ``dataset``, as fractions in [0, 1].

    ``model(images)`` (eval mode) returns one dict per image with ``scores`` (K class
    scores); the dataset yields ``(image, {"labels": tensor([c]), ...})``. With fewer than
    5 classes, top-5 is top-K (1.0).
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    n = top1 = top5 = 0
    for images, targets in tqdm(loader, desc="evaluate", leave=False, disable=None):
        outputs = model([im.to(device) for im in images])
        for out, target in zip(outputs, targets, strict=True):
            scores = out["scores"].detach().float().cpu().reshape(-1)
            label = int(target["labels"].reshape(-1)[0])
            ranked = torch.topk(scores, min(5, scores.numel())).indices.tolist()
            top1 += ranked[0] == label
            top5 += label in ranked
            n += 1
    if n == 0:
        raise ValueError("evaluate_classifier: the dataset is empty")
    return {"top1": top1 / n, "top5": top5 / n}


def summary_text(metrics: dict[str, float], num_images: int) -> str:
    """A short text summary, the counterpart of pycocotools' printed table."""
    return (
        f"Top-1 accuracy = {metrics['top1']:.4f}\n"
        f"Top-5 accuracy = {metrics['top5']:.4f}\n"
        f"images = {num_images}\n"
    )
