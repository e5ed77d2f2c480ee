"""Latency as deployed: the timing step of every evaluated checkpoint of a run.

One job per experiment and seed (rule ``time_latency``, ``detprune time-latency``) times
every checkpoint its evaluation records name, one after the other in one process, and
claims all the machine's cores in the workflow, so no other job shares the CPU while it
measures. Per checkpoint, batch 1, on one real test image, after ``warmup`` runs,
``runs`` repetitions, median and interquartile range:

* ``torch``: the whole registry detector in PyTorch on the CPU (transform, network, box
  decoding, NMS), ``threads`` intra-op threads;
* ``onnxruntime``: the network alone, as ``detprune export`` writes it
  (:class:`~detprune.evaluation.export.DenseExport`: normalisation, backbone, neck, dense
  heads; no decoding or NMS), exported in memory and run by ONNX Runtime's CPU provider
  with ``threads`` intra-op threads and one inter-op thread;
* ``torch_cuda_amp``: where CUDA is available, the whole detector on the GPU under
  ``torch.autocast(float16)``, synchronised after every run.

Medians are comparable between the checkpoints of one record (same process, same
machine, same minutes); the speed-up columns of the tables are ratios within a record.
"""

from __future__ import annotations

import io
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detprune.data.classification import ImageFolderDataset
from detprune.data.coco import CocoDetection
from detprune.evaluation.export import OPSET, DenseExport
from detprune.models import MODELS
from detprune.train import checkpoint
from detprune.utils.io import file_sha256

log = logging.getLogger(__name__)


def timed(
    fn: Callable[[], object], warmup: int, runs: int, sync: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Median and interquartile range of ``runs`` timed calls of ``fn`` after ``warmup``
    untimed ones, in milliseconds (``sync`` waits for asynchronous devices)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if runs > 1 else times * 3
    return {
        "median_ms": statistics.median(times),
        "iqr_ms": q3 - q1,
        "min_ms": min(times),
        "runs": runs,
        "warmup": warmup,
    }


def onnx_session(net: nn.Module, example: torch.Tensor, threads: int) -> tuple[Any, int]:
    """An ONNX Runtime CPU session of ``net`` exported in memory (TorchScript exporter,
    opset :data:`~detprune.evaluation.export.OPSET`), and the file's size in bytes."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            net, (example,), buf, input_names=["images"], opset_version=OPSET, dynamo=False
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    data = buf.getvalue()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]), len(data)


@torch.no_grad()
def torch_latency(model: nn.Module, image: torch.Tensor, warmup: int, runs: int) -> dict:
    """The whole detector (a list of one CHW image in, detections out) on the CPU."""
    model.eval()
    return timed(lambda: model([image]), warmup, runs)


@torch.no_grad()
def cuda_amp_latency(model: nn.Module, image: torch.Tensor, warmup: int, runs: int) -> dict:
    """The whole detector on the GPU under float16 autocast; the model is moved back."""
    model.eval().cuda()
    img = image.cuda()

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            model([img])

    try:
        out = timed(run, warmup, runs, torch.cuda.synchronize)
    finally:
        model.cpu()
    return {**out, "device": torch.cuda.get_device_name(0)}


def onnx_latency(
    net: nn.Module, size: int, image: torch.Tensor, threads: int, warmup: int, runs: int
) -> dict:
    """``net`` (a tensor in, tensors out) in ONNX Runtime, batch 1, on ``image`` resized
    to ``size``."""
    net.eval()
    x = torch.nn.functional.interpolate(
        image[None], size=(size, size), mode="bilinear", align_corners=False
    )
    session, nbytes = onnx_session(net, x, threads)
    feed = {"images": x.numpy()}
    out = timed(lambda: session.run(None, feed), warmup, runs)
    return {**out, "onnx_bytes": nbytes}


def time_model(
    model: nn.Module,
    image: torch.Tensor,
    size: int,
    *,
    classifier: bool,
    threads: int,
    warmup: int,
    runs: int,
    onnxruntime: bool = True,
    cuda_amp: bool = True,
) -> dict[str, Any]:
    """Every latency this step records for one model (see the module docstring); the
    ONNX network is a detector's dense part (:class:`DenseExport`), a classifier whole."""
    torch.set_num_threads(threads)
    model = model.cpu().eval()
    out: dict[str, Any] = {"torch": torch_latency(model, image, warmup, runs)}
    if onnxruntime:
        net = model if classifier else DenseExport(model)
        out["onnxruntime"] = onnx_latency(net, size, image, threads, warmup, runs)
    if cuda_amp and torch.cuda.is_available():
        out["torch_cuda_amp"] = cuda_amp_latency(model, image, warmup, runs)
    return out


def _checked_checkpoint(record: dict[str, Any], where: str) -> str:
    """The checkpoint a metrics record names, refused if it changed since evaluation."""
    ckpt = record.get("checkpoint")
    if not isinstance(ckpt, dict) or not {"path", "sha256"} <= set(ckpt):
        raise ValueError(f"{where}: missing key 'checkpoint.path' or 'checkpoint.sha256'")
    path = str(ckpt["path"])
    if not Path(path).is_file():
        raise ValueError(f"{where}: checkpoint {path} does not exist")
    if file_sha256(path) != ckpt["sha256"]:
        raise ValueError(f"{where}: checkpoint {path} changed since it was evaluated (sha256)")
    return path


def time_checkpoints(
    metrics: list[str], ann: str, images: str, lcfg: dict[str, Any]
) -> dict[str, Any]:
    """Time every checkpoint the metrics records ``metrics`` name (one process, in the
    order given), on the first image of the split ``ann``/``images`` (a classifier's:
    the ImageFolder root ``images``); the timing record."""
    records = []
    for p in metrics:
        rec = json.loads(Path(p).read_text(encoding="utf-8"))
        records.append((p, rec, _checked_checkpoint(rec, p)))
    if not records:
        raise ValueError("no metrics records to time")
    name = checkpoint.load(records[0][2])["model"]["name"]
    classifier = MODELS[name].task == "classification"
    if classifier:
        dataset = ImageFolderDataset(images)
        image = dataset.load_image(0)
    else:
        dataset = CocoDetection(ann, images)
        image = dataset.load_image(dataset.ids[0])
    rows = []
    for p, rec, path in records:
        model, ckpt = checkpoint.load_model(path)
        size = int(checkpoint.example_inputs(ckpt["model"]).shape[-1])
        timing = time_model(
            model,
            image,
            size,
            classifier=classifier,
            threads=lcfg["threads"],
            warmup=lcfg["warmup"],
            runs=lcfg["runs"],
            onnxruntime=lcfg["onnxruntime"],
            cuda_amp=lcfg["cuda_amp"],
        )
        rows.append(
            {
                **{k: rec[k] for k in ("detector", "method", "flops_target", "seed")},
                "metrics": p,
                "checkpoint": {"path": path, "sha256": rec["checkpoint"]["sha256"]},
                **timing,
            }
        )
        log.info(
            "%s %s: torch %.2f ms (IQR %.2f)%s",
            rec["method"],
            rec["flops_target"],
            timing["torch"]["median_ms"],
            timing["torch"]["iqr_ms"],
            f", ORT {timing['onnxruntime']['median_ms']:.2f} ms" if "onnxruntime" in timing else "",
        )
    return {
        "batch": 1,
        "threads": lcfg["threads"],
        "image": {"ann": ann, "images": images, "shape": list(image.shape)},
        "rows": rows,
    }
