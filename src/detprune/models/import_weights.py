"""Weights of a whole detector from a local file: torchvision's published state_dicts.

torchvision's COCO detectors (``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn``,
``fcos_resnet50_fpn``) share their module names with the registry's entries built on the
same classes, with two differences this module bridges:

* their backbones use ``FrozenBatchNorm2d``, whose buffers lack ``num_batches_tracked``;
  the registry uses ordinary (prunable) ``BatchNorm2d``, so the statistics are loaded
  into it and ``num_batches_tracked`` is filled with 0;
* their class channels are indexed by the COCO category id (91 channels: 0 and the ids
  of no category never trained positive), the registry's by the contiguous label 1..K
  of the dataset (:class:`detprune.data.coco.CocoDetection`): the rows of category id
  ``category_ids[i]`` become those of label ``i + 1`` (Faster R-CNN keeps its background
  row 0; RetinaNet and FCOS, whose channel k is label k + 1, drop channel 0).

Loading is strict: every key missing from the file, every key the model lacks and every
mis-shaped tensor is reported at once, with the file named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from detprune.utils.io import torch_load

StateDict = dict[str, torch.Tensor]


def read_weights(path: str | Path) -> dict:
    """The dict stored at ``path`` (``weights_only=True``); a truncated file, a file that
    is no torch archive, or one that holds anything but a dict fails naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.checkpoint: {p} does not exist")
    try:
        obj = torch_load(p)
    except ValueError as exc:
        raise ValueError(f"model.checkpoint: {exc}") from exc
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"model.checkpoint: {p} is not a checkpoint (holds a {type(obj).__name__}, "
            "expected a detprune checkpoint or a state_dict)"
        )
    return dict(obj)


def is_state_dict(obj: Mapping) -> bool:
    """Whether ``obj`` is a bare state_dict (names -> tensors), as torchvision ships."""
    return all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _class_rows(model: nn.Module) -> dict[str, tuple[int, bool, bool]]:
    """The class-indexed parameters of ``model``: key -> (block, anchor_major, background).

    ``block`` rows per class, class-major (R-CNN's box deltas: 4 rows per class), or
    ``anchor_major`` (a one-stage head's A x K channels, anchor by anchor); ``background``
    whether row block 0 is the background class."""
    if isinstance(model, FasterRCNN):
        pred = "roi_heads.box_predictor"
        rows = {f"{pred}.cls_score": (1, False, True), f"{pred}.bbox_pred": (4, False, True)}
    elif isinstance(model, (RetinaNet, FCOS)):
        head = model.head.classification_head
        rows = {"head.classification_head.cls_logits": (head.num_anchors, True, False)}
    else:
        raise ValueError(
            f"model.checkpoint: torchvision weights fit Faster R-CNN, RetinaNet and FCOS "
            f"entries only, not {type(model).__name__}"
        )
    return {f"{k}.{p}": v for k, v in rows.items() for p in ("weight", "bias")}


def _select(t: torch.Tensor, ids: Sequence[int], block: int, anchor_major: bool) -> torch.Tensor:
    """The rows of classes ``ids`` (file channels) of a class-indexed tensor ``t``."""
    if anchor_major:  # ``block`` anchors of k_src channels each
        k_src = t.shape[0] // block
        idx = [a * k_src + c for a in range(block) for c in ids]
    else:
        idx = [c * block + j for c in ids for j in range(block)]
    return t[torch.tensor(idx, dtype=torch.long)]


def _remap_classes(
    state: StateDict, model: nn.Module, category_ids: Sequence[int], path: Path
) -> StateDict:
    """``state`` with its class channels reordered to the model's labels 1..K."""
    out = dict(state)
    for key, (block, anchor_major, background) in _class_rows(model).items():
        if key not in state:
            continue  # reported as missing by check_fits
        t = state[key]
        n_src = t.shape[0] // block
        if n_src * block != t.shape[0]:
            continue  # reported as mis-shaped
        ids = [0, *category_ids] if background else list(category_ids)
        bad = [c for c in ids if not 0 <= c < n_src]
        if bad:
            raise ValueError(
                f"model.checkpoint: {path}: key '{key}' holds {n_src} classes; the dataset's "
                f"category ids {bad} have no channel there"
            )
        out[key] = _select(t, ids, block, anchor_major)
    return out


def _fill_batchnorm(state: StateDict, model: nn.Module) -> StateDict:
    """FrozenBatchNorm2d buffers -> BatchNorm2d's: ``num_batches_tracked`` = 0 where the
    file has the layer's running statistics but no counter."""
    out = dict(state)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            key = f"{name}.num_batches_tracked"
            if f"{name}.running_mean" in state and key not in state:
                out[key] = torch.tensor(0, dtype=torch.long)
    return out


def check_fits(state: Mapping[str, torch.Tensor], model: nn.Module, path: str | Path) -> None:
    """Fail listing every missing, unexpected and mis-shaped key of ``state`` at once."""
    want = model.state_dict()
    missing = sorted(k for k in want if k not in state)
    unexpected = sorted(k for k in state if k not in want)
    shapes = [
        f"'{k}' {tuple(state[k].shape)} (the model's: {tuple(want[k].shape)})"
        for k in want
        if k in state and tuple(state[k].shape) != tuple(want[k].shape)
    ]
    problems = []
    if missing:
        problems.append("missing keys " + ", ".join(f"'{k}'" for k in missing))
    if unexpected:
        problems.append("unexpected keys " + ", ".join(f"'{k}'" for k in unexpected))
    if shapes:
        problems.append("mis-shaped keys " + ", ".join(shapes))
    if problems:
        raise ValueError(f"model.checkpoint: {path} does not fit the model: " + "; ".join(problems))


def load_torchvision(
    model: nn.Module, state: Mapping[str, torch.Tensor], category_ids: Sequence[int], path
) -> nn.Module:
    """Load torchvision's state_dict ``state`` (read from ``path``) into the registry
    ``model`` whose labels 1..K are the COCO ``category_ids`` (sorted, one per label)."""
    p = Path(path)
    converted = _fill_batchnorm(dict(state), model)
    converted = _remap_classes(converted, model, category_ids, p)
    check_fits(converted, model, p)
    model.load_state_dict(converted, strict=True)
    return model
