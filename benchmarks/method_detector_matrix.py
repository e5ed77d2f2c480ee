"""Every pruning procedure on every CPU detector: a run check, written as a Markdown matrix.

Each detector's CPU configuration is built with its initial weights, BatchNorm scales
drawn from U(0.5, 1.5) so that |gamma| criteria have no ties (no training: this checks
that a method's surgery works on the detector's graph, not its accuracy), pruned
to 50 % of its MACs by every method of the registry with a small calibration
budget, reloaded from its checkpoint (`weights_only`) and run on an image. A from-scratch
control `scratch-<m>` starts, as in the DAG, from `<m>`'s pruned checkpoint of the same
run (so `<m>` must be among `--methods`; the registry lists it first).

    python benchmarks/method_detector_matrix.py --data results/data/synth
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from detprune import stages
from detprune.config import load_config
from detprune.models import build_model
from detprune.pruning.methods import METHODS as REGISTRY
from detprune.train import checkpoint

DETECTORS = [
    "fasterrcnn_narrow_fpn",
    "ssd_narrow",
    "retinanet_narrow_fpn",
    "fcos_narrow_fpn",
    "fsaf_narrow_fpn",
    "gfl_narrow_fpn",
    "yolov4_narrow",
    "yolov4_tiny_narrow",
]
# every method of the registry (gcp-sad prunes as gcp does; it differs in fine-tuning)
METHODS = list(REGISTRY)
_PROGRESSIVE = {"steps": 4, "interval": 2}
_STAGEWISE = {"batches": 1, "aux_batches": 1, "aux_iters": 5, "select_steps": 1, "sgd_iters": 1}


def fast_options(methods: list[str]) -> dict:
    """A small calibration budget: progressive methods (GroupFisher, MIEP and its
    ablations) take 4 steps, DCP/LCP one selection step per stage."""
    opts = {}
    for m in methods:
        family = REGISTRY[m].family
        if family in ("miep", "groupfisher"):
            opts[m] = dict(_PROGRESSIVE)
        elif family == "dcp":  # dcp and lcp
            opts[m] = dict(_STAGEWISE)
    return {"calib_batches": 2, "options": opts}


def run(
    data: Path, config: Path, target: float, methods: list[str], detectors: list[str]
) -> list[dict]:
    cfg = load_config(config)
    methods = sorted(methods, key=lambda m: REGISTRY[m].scratch_of is not None)  # sources first
    cfg["train"]["batch_size"] = 4
    cfg["prune"] = {**cfg["prune"], **fast_options(methods)}
    ann = json.loads((data / "instances_train.json").read_text())
    rows = []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for det in detectors:
            cfg["model"] = {**cfg["model"], "name": det}
            spec = checkpoint.model_spec(det, len(ann["categories"]), {})
            torch.manual_seed(0)
            model = build_model(spec["name"], spec["num_classes"], spec["kwargs"])
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            base = Path(tmp) / f"{det}.pt"
            checkpoint.save(base, spec=spec, model=model, history=[], meta={})
            for method in methods:
                out = Path(tmp) / f"{det}_{method}.pt"
                t0 = time.perf_counter()
                row = {"detector": det, "method": method}
                source = REGISTRY[method].scratch_of
                start = Path(tmp) / f"{det}_{source}.pt" if source else base
                try:
                    if not start.is_file():
                        raise FileNotFoundError(f"{method} needs {source}'s pruned checkpoint")
                    rec = stages.prune(
                        cfg,
                        method,
                        target,
                        str(start),
                        str(data / "instances_train.json"),
                        str(data / "train"),
                        str(out),
                        str(out.with_suffix(".json")),
                    )
                    pruned, _ = checkpoint.load_model(out)
                    with torch.no_grad():
                        pruned.eval()([torch.rand(3, 128, 128)])
                    row.update(
                        kept=rec["flops_kept"],
                        params=(rec["params_before"], rec["params_after"]),
                        ok=abs(rec["flops_kept"] / target - 1) <= 0.02,
                    )
                except Exception as exc:  # noqa: BLE001 - the matrix records every failure
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:160])
                    traceback.print_exc()
                row["seconds"] = round(time.perf_counter() - t0, 1)
                print(row, flush=True)
                rows.append(row)
    return rows


def markdown(rows: list[dict], target: float) -> str:
    lines = [
        f"| detector | method | kept MACs (target {target:.0%}) | params | s | result |",
        "|---|---|---:|---|---:|---|",
    ]
    for r in rows:
        if "kept" in r:
            before, after = r["params"]
            p = f"{before / 1e6:.2f} M -> {after / 1e6:.2f} M"
            lines.append(
                f"| {r['detector']} | {r['method']} | {r['kept']:.1%} | {p} | {r['seconds']} | "
                f"{'ok' if r['ok'] else 'missed the target'} |"
            )
        else:
            lines.append(
                f"| {r['detector']} | {r['method']} | – | – | {r['seconds']} | {r['error']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("results/data/synth"))
    ap.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--detectors", nargs="+", default=DETECTORS, choices=DETECTORS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/method_detector_matrix.md"))
    args = ap.parse_args()
    rows = run(args.data, args.config, args.target, args.methods, args.detectors)
    ok = sum(r["ok"] for r in rows)
    head = (
        "# Every pruning procedure on every CPU detector\n\n"
        f"`python benchmarks/method_detector_matrix.py` ({time.strftime('%Y-%m-%d')}): "
        f"{ok} of {len(rows)} (detector, method) pairs pruned to the target within 2 %, "
        "reloaded and ran. Initial weights (BN scales from U(0.5, 1.5)), small calibration "
        "budget, no sparse training before depgraph / slim / gcp: a check of the surgery on each "
        "graph, not of accuracy.\n\n"
    )
    args.out.write_text(head + markdown(rows, args.target))


if __name__ == "__main__":
    main()
