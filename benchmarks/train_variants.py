"""Train a registry detector in the default run's configuration with model-kwargs overrides,
for several seeds, and print its COCO mAP on the validation split.

The training is the pipeline's own (:func:`detprune.stages.train`: the config's schedule,
the engine, a checkpoint), the evaluation pycocotools'; only ``model.name``,
``model.kwargs``, ``seed`` and the ``--train`` keys differ from ``config/config.yaml`` (and
the dataset, with ``--data``). One thread per run (the DAG trains on two).

    python benchmarks/train_variants.py --data results/data/synth \\
        --variant 'as before={"anchor_scale": 1.0, "identity_init": null, "neck_bn_bias": 0.0}' \\
        --variant 'entry defaults={}' --seeds 0 1
    python benchmarks/train_variants.py --model retinanet_narrow_fpn \\
        --train '{"lr": 0.02, "clip_grad_norm": 10}' --variant 'GN towers={"head_norm_groups": 4}'
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from detprune import stages
from detprune.config import load_config
from detprune.data.coco import CocoDetection
from detprune.train import checkpoint
from detprune.train.engine import evaluate


def run(config: dict, data: Path, out: Path) -> float:
    """Train with ``config`` on ``data``'s train split; mAP (%) on its val split (NaN when
    the training loss turned NaN)."""
    try:
        stages.train(config, str(data / "instances_train.json"), str(data / "train"), str(out))
    except FloatingPointError as err:
        print(f"<!-- seed {config['seed']}: {str(err)[:60]} -->", flush=True)
        return float("nan")
    model, _ = checkpoint.load_model(str(out))
    val = CocoDetection(str(data / "instances_val.json"), str(data / "val"))
    metrics, _ = evaluate(model, val, torch.device("cpu"))
    return 100 * float(metrics["AP"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    ap.add_argument("--model", default="yolov4_narrow")
    ap.add_argument("--data", type=Path, default=Path("results/data/synth"))
    ap.add_argument(
        "--variant",
        action="append",
        required=True,
        help="'label=JSON of model.kwargs overrides' (repeatable)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--train", default="{}", help="JSON of train-section overrides (lr, clip_grad_norm, ...)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_config(args.config)
    base["train"].update(json.loads(args.train), device="cpu")
    print(f"train overrides: `{args.train}`\n")
    print(f"| {args.model} variant | model.kwargs | " + " | ".join(f"seed {s}" for s in args.seeds)
          + " | mean | s per run |")  # fmt: skip
    print("|---|---|" + "---:|" * (len(args.seeds) + 2))
    for spec in args.variant:
        label, _, kwargs = spec.partition("=")
        overrides = json.loads(kwargs or "{}")
        maps, t0 = [], time.time()
        for seed in args.seeds:
            cfg = copy.deepcopy(base)
            cfg["seed"] = seed
            cfg["model"] = {**cfg["model"], "name": args.model, "kwargs": overrides}
            with tempfile.TemporaryDirectory() as tmp:
                maps.append(run(cfg, args.data, Path(tmp) / "model.pt"))
        secs = (time.time() - t0) / len(args.seeds)
        cells = " | ".join(f"{m:.1f}" for m in maps)
        print(f"| {label} | `{json.dumps(overrides)}` | {cells} | {sum(maps) / len(maps):.1f} "
              f"| {secs:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
