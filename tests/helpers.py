"""Helpers shared by the cluster, DDP and preemption tests: a project copy of the workflow,
subprocess runs with the venv's tools on PATH, tiny datasets and schedules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import write_config

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

# a CPU schedule small enough for a unit test (64 px images, a few iterations)
SCHED = {
    "epochs": 2,
    "batch_size": 2,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "warmup_iters": 1,
    "schedule": "cosine",
    "augment": "none",
    "amp": False,
    "device": "cpu",
    "max_iters_per_epoch": 2,
}


def project(root: Path, dest: Path, cfg: dict) -> Path:
    """A copy of the workflow (Snakefile, workflow/, the synth module) with ``cfg`` as its
    default config, as tests/pipeline/test_pipeline.py builds it."""
    dest.mkdir(parents=True)
    shutil.copy(root / "Snakefile", dest / "Snakefile")
    shutil.copytree(root / "workflow", dest / "workflow")
    (dest / "src/detprune/data").mkdir(parents=True)
    shutil.copy(root / "src/detprune/data/synth.py", dest / "src/detprune/data/synth.py")
    write_config(cfg, dest / "config" / "config.yaml")
    return dest


def run(
    cmd: list[str], cwd: Path, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` and fail the test with its output when it exits non-zero."""
    res = subprocess.run(
        cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
        f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


def synth(root: Path, num_train: int = 8) -> Path:
    """A tiny synthetic COCO dataset of 64 px images under ``root``."""
    from detprune.data.synth import write_synthetic

    write_synthetic(
        root, seed=1, num_train=num_train, num_val=2, image_size=64, min_objects=1, max_objects=3
    )
    return root


def flat(state: dict[str, torch.Tensor], buffers: bool = False) -> torch.Tensor:
    """The floating-point parameters (or the BatchNorm running statistics) as one vector."""
    keys = [k for k, v in state.items() if v.is_floating_point() and ("running" in k) == buffers]
    return torch.cat([state[k].flatten().double() for k in keys])


def baseline_and_l1(out: Path, target: float, size: int = 64) -> dict[str, Path]:
    """Checkpoints of the default run's detector (untrained, seed 0, ``size`` px, 3 classes)
    and of its l1 prune to ``target`` of the FLOPs (within 25 %, which keeps the bisection
    to a few trials): ``{"baseline": out/baseline.pt, "l1": out/l1.pt}``."""
    from detprune.models import MODELS, build_model
    from detprune.pruning.importance.magnitude import l1_importance
    from detprune.pruning.procedures.oneshot import macs_counter, prune_to_flops
    from detprune.train import checkpoint

    name = "fasterrcnn_narrow_fpn"
    torch.manual_seed(0)
    spec = checkpoint.model_spec(name, 3, {"image_size": size})
    model = build_model(name, 3, spec["kwargs"]).eval()
    checkpoint.save(out / "baseline.pt", spec=spec, model=model, history=[], meta={})
    entry = MODELS[name]
    result = prune_to_flops(
        model,
        importance=l1_importance(),
        target=target,
        tolerance=0.25,
        example=checkpoint.example_inputs(spec),
        ignored=list(entry.ignored_layers),
        macs_fn=macs_counter(
            size, entry.per_roi_modules, spec["kwargs"]["rpn_post_nms_top_n_test"]
        ),
    )
    checkpoint.save(out / "l1.pt", spec=spec, model=result.model, history=result.history, meta={})
    return {"baseline": out / "baseline.pt", "l1": out / "l1.pt"}
