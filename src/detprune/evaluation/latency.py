"""Latency as deployed: the timing step of every evaluated checkpoint of a run.

One job per experiment and seed (rule ``time_latency``, ``detprune time-latency``) times
every checkpoint its evaluation records name, in one process, and claims all the
machine's cores in the workflow, so no other job shares the CPU while it measures. Per
checkpoint, batch 1, on one real test image, ``warmup`` untimed runs, then ``runs`` timed
ones, median and interquartile range. PyTorch's runs come in ``rounds`` round-robin
blocks over all checkpoints (:func:`interleaved`: a checkpoint's 100 runs of 10 ms would
otherwise fall in one second, and one passing disturbance of the machine would move its
median and its speed-up); ONNX Runtime's in one block per checkpoint (switching sessions
costs a run a thread pool's wake-up):

* ``torch``: the whole registry detector in PyTorch on the CPU (transform, network, box
  decoding, NMS), ``threads`` intra-op threads;
* ``onnxruntime``: the network alone, as ``detprune export`` writes it
  (:class:`~detprune.evaluation.export.DenseExport`: normalisation, backbone, neck, dense
  heads; no decoding or NMS; a classifier whole), exported in memory and run by ONNX
  Runtime's CPU provider with ``threads`` intra-op threads and one inter-op thread;
* ``torch_cuda_amp``: where CUDA is available, the whole detector on the GPU under
  ``torch.autocast(float16)``, synchronised after every run.

Medians are comparable between the checkpoints of one record (same process, same
machine, same minutes); the speed-up columns of the tables are ratios within a record.
"""

from __future__ import annotations

import gc
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


def _stats(times: list[float], warmup: int, rounds: int = 1) -> dict[str, Any]:
    q1, _, q3 = (
        statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    )
    return {
        "median_ms": statistics.median(times),
        "iqr_ms": q3 - q1,
        "min_ms": min(times),
        "runs": len(times),
        "warmup": warmup,
        "rounds": rounds,
    }


def timed(
    fn: Callable[[], object], warmup: int, runs: int, sync: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """Median and interquartile range of ``runs`` timed calls of ``fn`` after ``warmup``
    untimed ones, in milliseconds (``sync`` waits for asynchronous devices)."""
    return interleaved([fn], warmup, runs, 1, sync)[0]


def interleaved(
    fns: list[Callable[[], object]],
    warmup: int,
    runs: int,
    rounds: int,
    sync: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """:func:`timed` for several functions at once, in ``rounds`` round-robin blocks of
    ``runs / rounds`` timed calls (each block after one untimed call), so that every
    function's runs spread over the whole measurement and a passing disturbance of the
    machine touches a few runs of each, not all runs of one."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    rounds = max(1, min(rounds, runs))
    per = -(-runs // rounds)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times, strict=True):
            fn()  # the caches hold the previous function's weights: refill them
            sync()
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                sync()
                out.append((time.perf_counter() - t0) * 1000.0)
    return [_stats(t, warmup, rounds) for t in times]


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


def _torch_call(model: nn.Module, image: torch.Tensor) -> Callable[[], object]:
    """The whole detector (a list of one CHW image in, detections out), no autograd."""

    def run() -> object:
        with torch.no_grad():
            return model([image])

    return run


def _cuda_amp_call(model: nn.Module, image: torch.Tensor) -> Callable[[], object]:
    """The whole detector on the GPU under float16 autocast (``model`` already there)."""

    def run() -> object:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            return model([image])

    return run


def _onnx_call(
    model: nn.Module, classifier: bool, size: int, image: torch.Tensor, threads: int
) -> tuple[Callable[[], object], int]:
    """The network in ONNX Runtime, batch 1, on ``image`` resized to ``size``: a
    detector's dense part (:class:`DenseExport`), a classifier whole; and its size."""
    net = (model if classifier else DenseExport(model)).eval()
    x = torch.nn.functional.interpolate(
        image[None], size=(size, size), mode="bilinear", align_corners=False
    )
    session, nbytes = onnx_session(net, x, threads)
    feed = {"images": x.numpy()}
    return (lambda: session.run(None, feed)), nbytes


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


def _first_image(ann: str, images: str, classifier: bool) -> torch.Tensor:
    if classifier:
        return ImageFolderDataset(images).load_image(0)
    dataset = CocoDetection(ann, images)
    return dataset.load_image(dataset.ids[0])


def _onnx_timings(
    models: list[nn.Module],
    sizes: list[int],
    image: torch.Tensor,
    lcfg: dict[str, Any],
    classifier: bool,
) -> list[dict[str, Any]]:
    """ONNX Runtime, one session at a time: each is created, timed in one block and
    freed before the next, because a live session's intra-op pool spins after its runs
    and slows the next session's (2.3 vs 2.1 ms for the default baseline, 1.0 vs 0.6 ms
    at 10 % FLOPs, with all sessions alive; benchmarks/default_run.md)."""
    out = []
    for model, size in zip(models, sizes, strict=True):
        call, nbytes = _onnx_call(model, classifier, size, image, lcfg["threads"])
        (timing,) = interleaved([call], lcfg["warmup"], lcfg["runs"], 1)
        out.append({**timing, "onnx_bytes": nbytes})
        del call
        gc.collect()
    return out


def _measure(paths: list[str], image: torch.Tensor, lcfg: dict[str, Any]) -> list[dict]:
    """Per checkpoint, its timings (``torch``, ``onnxruntime``, ``torch_cuda_amp``).

    PyTorch's runs in round-robin blocks over all checkpoints (:func:`interleaved`);
    ONNX Runtime's one session after the other (:func:`_onnx_timings`)."""
    classifier = MODELS[checkpoint.load(paths[0])["model"]["name"]].task == "classification"
    torch.set_num_threads(lcfg["threads"])
    models, sizes = [], []
    for path in paths:
        model, ckpt = checkpoint.load_model(path)
        models.append(model.cpu().eval())
        sizes.append(int(checkpoint.example_inputs(ckpt["model"]).shape[-1]))
    schedule = (lcfg["warmup"], lcfg["runs"], lcfg["rounds"])
    results = {"torch": interleaved([_torch_call(m, image) for m in models], *schedule)}
    if lcfg["onnxruntime"]:
        results["onnxruntime"] = _onnx_timings(models, sizes, image, lcfg, classifier)
    if lcfg["cuda_amp"] and torch.cuda.is_available():
        gpu_image, device = image.cuda(), torch.cuda.get_device_name(0)
        fns = [_cuda_amp_call(m.cuda(), gpu_image) for m in models]
        results["torch_cuda_amp"] = [
            {**r, "device": device} for r in interleaved(fns, *schedule, torch.cuda.synchronize)
        ]
    return [{k: v[i] for k, v in results.items()} for i in range(len(paths))]


def time_checkpoints(
    metrics: list[str], ann: str, images: str, lcfg: dict[str, Any]
) -> dict[str, Any]:
    """Time every checkpoint the metrics records ``metrics`` name (one process), on the
    first image of the split ``ann``/``images`` (a classifier's: the ImageFolder root
    ``images``); the timing record, its rows in the order of ``metrics``."""
    records = []
    for p in metrics:
        rec = json.loads(Path(p).read_text(encoding="utf-8"))
        records.append((p, rec, _checked_checkpoint(rec, p)))
    if not records:
        raise ValueError("no metrics records to time")
    name = checkpoint.load(records[0][2])["model"]["name"]
    image = _first_image(ann, images, MODELS[name].task == "classification")
    timings = _measure([path for _, _, path in records], image, lcfg)
    rows = []
    for (p, rec, path), timing in zip(records, timings, strict=True):
        rows.append(
            {
                **{k: rec[k] for k in ("detector", "method", "flops_target", "seed")},
                "metrics": p,
                "checkpoint": {"path": path, "sha256": rec["checkpoint"]["sha256"]},
                **timing,
            }
        )
        ort_ms = timing.get("onnxruntime", {}).get("median_ms", float("nan"))
        log.info(
            "%s %s: torch %.2f ms (IQR %.2f), ORT %.2f ms",
            rec["method"],
            rec["flops_target"],
            timing["torch"]["median_ms"],
            timing["torch"]["iqr_ms"],
            ort_ms,
        )
    return {
        "batch": 1,
        "threads": lcfg["threads"],
        "image": {"ann": ann, "images": images, "shape": list(image.shape)},
        "rows": rows,
    }
