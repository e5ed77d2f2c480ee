"""Measured speed-up of pruned ResNet-50 detectors at the papers' scale, against the FLOPs kept.

For Faster R-CNN, RetinaNet, GFL (R50-FPN, 800 x 1333) and SSD300 (R50), built from the
registry with untrained weights (latency does not depend on them; BatchNorm scales drawn
from U(0.5, 1.5) so magnitude ranking has no ties), each pruned with the group L1 criterion
to 50 / 25 / 10 % of the MACs under two width allocations:

- ``uniform``: every layer loses the same share (per-layer, the l1 row of the tables);
- ``global``: one ranking over all layers (non-uniform widths, GroupFisher/MIEP-style
  allocation; with random weights it stands for "some non-uniform widths", not GroupFisher's).

Each model is timed on ``--threads`` CPU threads, batch 1, one 480 x 640 image (a COCO-sized
photo, resized by the detector's transform: 800 x 1067 for the R50-FPN ones, 300 x 300 for
SSD), after ``--warmup`` runs, ``--runs`` repetitions, median and interquartile range:

- ``torch``: the whole detector in PyTorch (transform, network, decoding, NMS);
- ``torch_net``: the network alone in PyTorch, what ``detprune export`` puts in the ONNX
  file (:class:`detprune.evaluation.export.DenseExport`: normalisation, backbone, FPN, every
  head on every level; Faster R-CNN's box head on 2 fixed RoIs only, so its 1000
  proposals' RoIAlign + box head are in the whole detector's time);
- ``ort_net``: the same network exported to ONNX (TorchScript exporter, opset 17) in ONNX
  Runtime's CPU provider with ``--threads`` intra-op threads, batch 1;
- ``parts``: where the whole detector's time goes (forward hooks on the transform, backbone,
  RPN / head and RoI heads), so that "the rest" is named.

Usage: python benchmarks/speedup.py --threads 2 --out benchmarks/speedup.json
       python benchmarks/speedup.py --device cuda   (adds PyTorch with AMP)
Writes a JSON record and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from detprune.evaluation.export import DenseExport
from detprune.evaluation.latency import onnx_session, timed
from detprune.models import MODELS, build_model
from detprune.pruning.methods import get_method
from detprune.pruning.procedures.oneshot import macs_counter, prune_once, prune_to_flops
from detprune.utils.provenance import provenance

DETECTORS = {
    # registry entry: (overrides that give the published input size, transform input)
    "fasterrcnn_r50_fpn": {"max_size": 1333},
    "retinanet_r50_fpn": {"max_size": 1333},
    "gfl_r50_fpn": {},
    "ssd300_r50": {},
}
PARTS = {
    "transform": "transform",
    "backbone": "backbone",
    "rpn": "rpn",
    "roi_heads": "roi_heads",
    "head": "head",
}


def randomize_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)


def part_times(model: nn.Module, image: torch.Tensor, runs: int) -> dict[str, float]:
    """Median milliseconds spent in each named child of the whole detector's forward."""
    spent: dict[str, list[float]] = {}
    start: dict[str, float] = {}
    handles = []
    for label, attr in PARTS.items():
        mod = getattr(model, attr, None)
        if not isinstance(mod, nn.Module):
            continue

        def pre(_m, _i, label=label):
            start[label] = time.perf_counter()

        def post(_m, _i, _o, label=label):
            spent.setdefault(label, []).append((time.perf_counter() - start[label]) * 1000)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        with torch.no_grad():
            for _ in range(runs):
                model([image])
    finally:
        for h in handles:
            h.remove()
    # a part may run more than once per forward (none of these do): sum per forward
    return {k: statistics.median(v) * len(v) / runs for k, v in spent.items()}


def ort_session(net: nn.Module, example: torch.Tensor, threads: int):
    """ONNX Runtime session of ``net`` (the timing step's export), its largest output
    difference to PyTorch relative to the output's largest magnitude, and its size."""
    with torch.no_grad():
        outputs = list(net(example))
    sess, size = onnx_session(net, example, threads)
    got = sess.run(None, {"images": example.numpy()})
    diff = max(
        float((torch.from_numpy(g) - o).abs().max() / o.abs().max().clamp_min(1e-12))
        for g, o in zip(got, outputs, strict=True)
    )
    return sess, diff, size


def measure(model: nn.Module, args: argparse.Namespace) -> dict:
    model.eval()
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 480, 640, generator=gen)
    net = DenseExport(model, export=True).eval()
    with torch.no_grad():
        # the network's input: the transform's resized, padded batch, back in [0, 1]
        # (the ONNX file normalises inside, as `detprune export` writes it)
        batch = model.transform([image])[0].tensors
        if net.normalise:
            batch = batch * net.std + net.mean
    rec: dict = {"input": list(batch.shape)}
    none = lambda: None  # noqa: E731
    with torch.no_grad():
        rec["torch"] = timed(lambda: model([image]), args.warmup, args.runs, none)
        rec["torch_net"] = timed(lambda: net(batch), args.warmup, args.runs, none)
    rec["parts_ms"] = part_times(model, image, max(3, args.runs // 2))
    sess, diff, size = ort_session(net, batch, args.threads)
    feed = {"images": batch.numpy()}
    rec["ort_net"] = timed(lambda: sess.run(None, feed), args.warmup, args.runs, none)
    rec["ort_max_rel_diff"] = diff
    rec["onnx_bytes"] = size
    if args.device == "cuda":
        rec["cuda_amp"] = cuda_amp(model, image, args)
    return rec


def cuda_amp(model: nn.Module, image: torch.Tensor, args: argparse.Namespace) -> dict:
    m = model.cuda()
    img = image.cuda()

    def run() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            m([img])

    out = timed(run, args.warmup, args.runs, torch.cuda.synchronize)
    model.cpu()
    return {**out, "device": torch.cuda.get_device_name(0)}


def pruned_once(
    name: str, model: nn.Module, target: float, allocation: str
) -> tuple[nn.Module, float]:
    """One pruning step at the channel ratio 1 - sqrt(target) (conv MACs scale with the
    square of the kept width), no bisection: the kept MACs are measured, not matched."""
    entry = MODELS[name]
    size = int(model.transform.min_size[0])
    rois = int(model.rpn._post_nms_top_n["testing"]) if entry.per_roi_modules else 0
    macs_fn = macs_counter(size, entry.per_roi_modules, rois)
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    opts = {"global_pruning": allocation == "global", "max_layer_ratio": 0.95, "round_to": None}
    ratio = 1 - target**0.5
    trial, _ = prune_once(
        model, example, get_method("l1").importance(None), ratio, list(entry.ignored_layers), opts
    )
    return trial, macs_fn(trial) / macs_fn(model)


def pruned(name: str, model: nn.Module, target: float, allocation: str) -> tuple[nn.Module, float]:
    entry = MODELS[name]
    size = int(model.transform.min_size[0])
    rois = int(model.rpn._post_nms_top_n["testing"]) if entry.per_roi_modules else 0
    macs_fn = macs_counter(size, entry.per_roi_modules, rois)
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    importance = get_method("l1").importance(None)
    result = prune_to_flops(
        model,
        importance=importance,
        target=target,
        example=example,
        ignored=list(entry.ignored_layers),
        macs_fn=macs_fn,
        global_pruning=allocation == "global",
        max_layer_ratio=0.95,
    )
    return result.model, float(result.report["flops_kept"])


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.detectors:
        base = build_model(name, 80, DETECTORS[name])
        randomize_bn(base, 0)
        base.eval()
        variants = [("baseline", 1.0)] + [
            (alloc, t) for alloc in args.allocations for t in args.targets
        ]
        for alloc, target in variants:
            t0 = time.perf_counter()
            if alloc == "baseline":
                model, kept = base, 1.0
            else:
                fn = pruned_once if args.one_step else pruned
                model, kept = fn(name, base, target, alloc)
            prune_s = time.perf_counter() - t0
            rec = measure(model, args)
            rows.append(
                {
                    "detector": name,
                    "allocation": alloc,
                    "target": target,
                    "flops_kept": kept,
                    "prune_s": prune_s,
                    **rec,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    base = {r["detector"]: r for r in rows if r["allocation"] == "baseline"}
    lines = [
        "| detector | widths | FLOPs kept | FLOPs speed-up | torch whole ms (IQR) | speed-up |"
        " torch net ms | speed-up | ORT net ms (IQR) | speed-up | ONNX MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = base[r["detector"]]
        sp = {k: b[k]["median_ms"] / r[k]["median_ms"] for k in ("torch", "torch_net", "ort_net")}
        t, n, o = r["torch"], r["torch_net"], r["ort_net"]
        lines.append(
            f"| {r['detector']} | {r['allocation']} | {r['flops_kept']:.3f} | "
            f"{1 / r['flops_kept']:.2f}x | {t['median_ms']:.0f} ({t['iqr_ms']:.0f}) | "
            f"{sp['torch']:.2f}x | {n['median_ms']:.0f} | {sp['torch_net']:.2f}x | "
            f"{o['median_ms']:.0f} ({o['iqr_ms']:.0f}) | {sp['ort_net']:.2f}x | "
            f"{r['onnx_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    p.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    p.add_argument(
        "--one-step",
        action="store_true",
        help="prune once at ratio 1 - sqrt(target) instead of bisecting to the target "
        "(Faster R-CNN R50 at 800 px, 2 cores: 5-7 s a row against 17-31 s bisected)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="JSON record of every row")
    args = p.parse_args()
    rows = run(args)
    print(markdown(rows))
    if args.out:
        record = {"args": vars(args), "rows": rows, "provenance": provenance()}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
