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

import ctypes
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
import torch.nn.functional as F
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


def onnx_bytes(net: nn.Module, example: torch.Tensor) -> bytes:
    """``net`` exported in memory (TorchScript exporter, opset
    :data:`~detprune.evaluation.export.OPSET`), as ``detprune export`` writes it."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            net, (example,), buf, input_names=["images"], opset_version=OPSET, dynamo=False
        )
    return buf.getvalue()


def ort_cpu_session(data: bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, one inter-op thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def onnx_session(net: nn.Module, example: torch.Tensor, threads: int) -> tuple[Any, int]:
    """An ONNX Runtime CPU session of ``net`` (:func:`onnx_bytes`) and the file's size."""
    data = onnx_bytes(net, example)
    return ort_cpu_session(data, threads), len(data)


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


#: glibc malloc settings for the timing process (``mallopt``): a fixed mmap threshold of
#: 32 MiB (its maximum) and no trimming below 1 GiB, so that freed tensors stay mapped and
#: a run does not page their memory in again. With glibc's adaptive defaults the default
#: baseline's median was 14.0-16.8 ms over timing jobs, with these 12.8-13.5 ms.
MALLOC = {"M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TRIM_THRESHOLD": (-1, 1 << 30)}


def steady_malloc() -> dict[str, int]:
    """Apply :data:`MALLOC` where the C library is glibc; what was set (empty if none)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return {}
    return {k: v for k, (param, v) in MALLOC.items() if libc.mallopt(param, v) == 1}


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
    """ONNX Runtime: the network of each model (a detector's dense part, a classifier
    whole) on ``image`` resized to the model's size, batch 1, in ``rounds`` passes over
    all models. In each pass every model gets a fresh session, ``warmup / rounds`` (at
    least 3) untimed runs and its share of the timed ones, and is freed before the next:
    live sessions' spinning thread pools slow each other's runs (7.9 vs 2.1 ms for the
    default baseline), and without spinning every run pays the pool's wake-up (2.9 ms),
    while one block per model lets a slow stretch of the machine take whole rows
    (benchmarks/default_run.md)."""
    feeds, files = [], []
    for model, size in zip(models, sizes, strict=True):
        x = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)
        files.append(onnx_bytes((model if classifier else DenseExport(model)).eval(), x))
        feeds.append({"images": x.numpy()})
    rounds = max(1, min(lcfg["rounds"], lcfg["runs"]))
    per, warm = -(-lcfg["runs"] // rounds), max(3, lcfg["warmup"] // rounds)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for data, feed, out in zip(files, feeds, times, strict=True):
            session = ort_cpu_session(data, lcfg["threads"])
            for _ in range(warm):
                session.run(None, feed)
            for _ in range(per):
                t0 = time.perf_counter()
                session.run(None, feed)
                out.append((time.perf_counter() - t0) * 1000.0)
            del session
    return [
        {**_stats(t, lcfg["warmup"], rounds), "onnx_bytes": len(d)}
        for t, d in zip(times, files, strict=True)
    ]


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
    malloc = steady_malloc()
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
        "malloc": malloc,
        "image": {"ann": ann, "images": images, "shape": list(image.shape)},
        "rows": rows,
    }
