"""ONNX export of a checkpoint's dense network, validated with ONNX Runtime on real images.

What the ONNX file holds: the detector up to its dense head outputs, the forward the
pruning core traces, with a dynamic batch axis:

* input ``images``: float32 (N, 3, S, S), RGB in [0, 1], already resized to the model's
  square ``image_size`` S. The model transform's mean/std normalisation (if it has one)
  is *inside* the file; YOLO's letterbox has none.
* outputs: the head's raw per-level tensors (class logits, box regressions, centerness /
  objectness / distribution logits, whatever the family's head returns), named from
  the head's dict keys or by position. Faster R-CNN: the RPN objectness and deltas per
  FPN level, then the box head's class scores and deltas on the two fixed reference
  boxes per image of the tracing forward (the RoI stage needs proposals, which come
  from decoding + NMS: see below).

What stays outside (the usual split of deployment toolkits): anchor / point generation,
box decoding, score thresholds and NMS, and mapping boxes back to the original image,
as the registry model's own ``postprocess`` does them; for Faster R-CNN also the
proposal selection and the RoIAlign + box head on those proposals.

Validation: ONNX Runtime (CPUExecutionProvider) runs the file on real images of a split
as one batch (N >= 2, which exercises the dynamic axis); every output must match PyTorch's
eager dense forward within ``atol + rtol * max|output|`` (default 1e-4 each: float32
kernels that sum in another order differ by ~1e-6 relative; 1e-4 leaves room for deep
nets and still catches a wrong layer, whose outputs differ at order 1). A miss raises
naming the output and by how much, and no file is written.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from detprune.models import MODELS
from detprune.train import checkpoint
from detprune.utils.io import atomic_path, write_json

log = logging.getLogger(__name__)

ATOL = 1e-4
RTOL = 1e-4
OPSET = 17


class ExportError(ValueError):
    """The exported file does not reproduce PyTorch's outputs (or cannot be exported)."""


def _flatten(out: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Nested dicts/lists/tuples of tensors -> (name, tensor) in a fixed order."""
    if torch.is_tensor(out):
        return [(prefix or "output", out)]
    if isinstance(out, dict):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (list, tuple)):
        items = [(str(i) if prefix else f"output_{i}", v) for i, v in enumerate(out)]
    else:
        raise ExportError(f"dense forward returned a {type(out).__name__}, not tensors")
    flat: list[tuple[str, torch.Tensor]] = []
    for key, value in items:
        flat.extend(_flatten(value, f"{prefix}_{key}" if prefix else key))
    return flat


def dense_outputs(model: nn.Module, x: torch.Tensor, export: bool = False) -> Any:
    """The head outputs of a registry detector for a normalised batch ``x`` (N, 3, S, S).

    Faster R-CNN has its own (``trace_forward``; ``export_forward`` when exporting, the
    same outputs with a symbolic batch size); YOLO is backbone -> neck -> head; the FPN
    one-stage detectors and SSD are backbone (dict of levels) -> head.
    """
    if export and hasattr(model, "export_forward"):
        return model.export_forward(x)
    if hasattr(model, "trace_forward"):
        return model.trace_forward(x)
    if hasattr(model, "neck"):
        return model.head(model.neck(model.backbone(x)))
    features = model.backbone(x)
    if torch.is_tensor(features):
        features = [features]
    elif isinstance(features, dict):
        features = list(features.values())
    return model.head(features)


class DenseExport(nn.Module):
    """Normalisation (if the model's transform has one) + :func:`dense_outputs`, flat."""

    def __init__(self, model: nn.Module, export: bool = True) -> None:
        super().__init__()
        self.model, self.export = model, export
        transform = getattr(model, "transform", None)
        mean = getattr(transform, "image_mean", None)
        std = getattr(transform, "image_std", None)
        self.normalise = mean is not None and std is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.normalise:
            x = (x - self.mean) / self.std
        return tuple(t for _, t in _flatten(dense_outputs(self.model, x, self.export)))

    def output_names(self, x: torch.Tensor) -> list[str]:
        with torch.no_grad():
            return [n for n, _ in _flatten(dense_outputs(self.model, x))]


def report_path(out: str | Path) -> Path:
    """The JSON report beside an exported file: ``x.onnx`` -> ``x.onnx.json``."""
    return Path(out).with_suffix(".onnx.json")


def image_size(spec: dict[str, Any]) -> int:
    return int(checkpoint.example_inputs(spec).shape[-1])


def real_images(ann: str | Path, images: str | Path, size: int, count: int = 2) -> torch.Tensor:
    """The first ``count`` images of a COCO split, RGB [0, 1], resized to ``size`` square
    (bilinear, as the models' transforms resize), as one batch."""
    from detprune.data.coco import CocoDetection

    dataset = CocoDetection(ann, images)
    if len(dataset) == 0:
        raise ValueError(f"{ann}: no images to validate the export on")
    ids = [dataset.ids[i % len(dataset)] for i in range(max(count, 2))]
    batch = [
        F.interpolate(
            dataset.load_image(i)[None], size=(size, size), mode="bilinear", align_corners=False
        )
        for i in ids
    ]
    return torch.cat(batch)


def compare(
    names: list[str], ours: list[Any], ref: list[torch.Tensor], atol: float, rtol: float
) -> dict[str, dict[str, float]]:
    """Per output: max |ORT - PyTorch|, the allowance, and the output's scale."""
    import numpy as np

    out = {}
    for name, a, t in zip(names, ours, ref, strict=True):
        t_np = t.detach().cpu().numpy()
        if a.shape != t_np.shape:
            raise ExportError(f"output {name}: ONNX shape {a.shape} != PyTorch {t_np.shape}")
        scale = float(np.abs(t_np).max()) if t_np.size else 0.0
        diff = float(np.abs(a - t_np).max()) if t_np.size else 0.0
        out[name] = {"max_abs_diff": diff, "allowed": atol + rtol * scale, "scale": scale}
    return out


def export_onnx(
    ckpt_path: str | Path,
    out: str | Path,
    images: torch.Tensor,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Export the checkpoint at ``ckpt_path`` to ``out`` (.onnx) and its :func:`report_path`.

    ``images``: (N, 3, S, S) RGB [0, 1] real images at the model's size, N >= 2. Raises
    :class:`ExportError` saying by how much ONNX Runtime misses PyTorch; then nothing is
    written.
    """
    import onnx
    import onnxruntime as ort

    model, ckpt = checkpoint.load_model(ckpt_path)
    spec = ckpt["model"]
    if MODELS[spec["name"]].task != "detection":
        raise ValueError(f"{ckpt_path}: export covers detectors, not {spec['name']}")
    model.eval()
    size = image_size(spec)
    if images.shape[1:] != (3, size, size) or images.shape[0] < 2:
        raise ValueError(f"validation images {tuple(images.shape)}: need (N>=2, 3, {size}, {size})")
    wrapper = DenseExport(model).eval()
    reference = DenseExport(model, export=False).eval()
    example = images[:1]
    names = wrapper.output_names(example)
    with torch.no_grad():
        ref = list(reference(images))
        one = reference(example)
    shapes = [tuple(t.shape[1:]) for t in one]
    # the first axis is the batch, or (Faster R-CNN's box head) rois: reference boxes x batch
    rows = ["batch" if t.shape[0] == 1 else "rois" for t in one]
    out = Path(out)
    with atomic_path(out) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on Python ints (fixed sizes S, levels): constants by design
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                input_names=["images"],
                output_names=names,
                dynamic_axes={
                    "images": {0: "batch"},
                    **{n: {0: d} for n, d in zip(names, rows, strict=True)},
                },
                opset_version=opset,
                dynamo=False,
            )
        onnx.checker.check_model(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(names, {"images": images.numpy()})
        diffs = compare(names, got, ref, atol, rtol)
        worst = max(diffs, key=lambda n: diffs[n]["max_abs_diff"] / max(diffs[n]["allowed"], 1e-30))
        if diffs[worst]["max_abs_diff"] > diffs[worst]["allowed"]:
            d = diffs[worst]
            raise ExportError(
                f"{out}: ONNX Runtime misses PyTorch on output {worst} by "
                f"{d['max_abs_diff']:.3g} (allowed {d['allowed']:.3g} = {atol:g} + {rtol:g} "
                f"x scale {d['scale']:.3g})"
            )
        size_bytes = tmp.stat().st_size
    report = {
        "checkpoint": str(ckpt_path),
        "onnx": str(out),
        "model": spec["name"],
        "pruned": bool(ckpt["pruning_history"]),
        "opset": opset,
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "input": {
            "name": "images",
            "shape": ["batch", 3, size, size],
            "range": "RGB float32 in [0, 1], resized to the model's square size",
            "normalisation_inside": (
                {"mean": wrapper.mean.flatten().tolist(), "std": wrapper.std.flatten().tolist()}
                if wrapper.normalise
                else None
            ),
        },
        "outputs": {n: [r, *s] for n, r, s in zip(names, rows, shapes, strict=True)},
        "outside": "anchors/points, box decoding, score threshold, NMS, rescaling to the image",
        "validation": {
            "images": int(images.shape[0]),
            "provider": "CPUExecutionProvider",
            "atol": atol,
            "rtol": rtol,
            "max_abs_diff": diffs,
        },
        "file_bytes": size_bytes,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    write_json(report_path(out), report)
    log.info(
        "%s: %d outputs, %d bytes, worst diff %.3g on %s",
        out,
        len(names),
        size_bytes,
        diffs[worst]["max_abs_diff"],
        worst,
    )
    return report


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    ann: str | Path,
    images: str | Path,
    *,
    count: int = 2,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[str, Any]:
    """``detprune export``: the checkpoint to ``out`` (.onnx + .json report), validated on
    the first ``count`` images of the COCO split ``ann``/``images``."""
    spec = checkpoint.load(ckpt_path)["model"]
    batch = real_images(ann, images, image_size(spec), count)
    return export_onnx(ckpt_path, out, batch, atol=atol, rtol=rtol)
