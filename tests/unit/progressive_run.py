"""Shared check of a progressive method on the registry detector (64 px, synthetic data).

Used by ``test_groupfisher.py`` and ``test_miep.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from detprune.data.coco import CocoDetection
from detprune.data.synth import write_synthetic
from detprune.evaluation.cost import count_params
from detprune.models import MODELS, build_model
from detprune.pruning.base import PruneContext
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.oneshot import macs_counter
from detprune.train import checkpoint
from detprune.train.engine import make_loader

NAME = "fasterrcnn_narrow_fpn"
SIZE = 64
FAST = {"interval": 1, "steps": 3}


def check_progressive_run(method: str, tmp_path: Path, **options: Any) -> dict[str, Any]:
    """``method`` prunes to 50% of the MACs within 2% in several steps; the model is
    physically smaller, trains and infers, and its history replays to identical outputs."""
    write_synthetic(tmp_path / "d", seed=3, num_train=4, num_val=1, image_size=SIZE,
                    min_objects=1, max_objects=3)  # fmt: skip
    data = CocoDetection(tmp_path / "d/instances_train.json", tmp_path / "d/train")

    def batches() -> Iterator[tuple[list, list]]:
        epoch = 0
        while True:
            for images, targets in make_loader(data, 2, shuffle=True, seed=0, epoch=epoch):
                yield list(images), list(targets)
            epoch += 1

    torch.manual_seed(0)
    entry = MODELS[NAME]
    spec = checkpoint.model_spec(NAME, data.num_classes, {"image_size": SIZE})
    model = build_model(NAME, data.num_classes, spec["kwargs"])
    macs_fn = macs_counter(SIZE, entry.per_roi_modules, spec["kwargs"]["rpn_post_nms_top_n_test"])
    base, params = macs_fn(model), count_params(model)
    ctx = PruneContext(
        model=model,
        spec=spec,
        entry=entry,
        options={"tolerance": 0.02, "max_layer_ratio": 0.9, **FAST, **options},
        seed=0,
        device=torch.device("cpu"),
        batches=batches,
        example=checkpoint.example_inputs(spec),
        macs_fn=macs_fn,
        ignored=list(entry.ignored_layers),
        schedule={"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
    )
    meth = METHODS[method]
    result = meth.procedure(ctx, meth, 0.5)
    pruned, report = result.model, result.report
    kept = macs_fn(pruned) / base
    assert abs(kept / 0.5 - 1) <= 0.02
    assert report["flops_kept"] == kept
    assert report["steps"] >= FAST["steps"] and report["iterations"] == report["steps"]
    assert all(a > b for a, b in zip(
        [1.0] + [s["kept"] for s in report["progress"]], [s["kept"] for s in report["progress"]],
        strict=False,
    ))  # fmt: skip
    assert count_params(pruned) < 0.8 * params
    for path in entry.ignored_layers:
        assert report["layers"][path][0] == report["layers"][path][1], path

    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    target = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 36.0]]), "labels": torch.tensor([2])}
    pruned.train()
    losses = pruned([image, image.flip(-1)], [target, target])
    assert all(torch.isfinite(v) for v in losses.values())
    pruned.eval()

    path = tmp_path / f"{method}.pt"
    checkpoint.save(path, spec=spec, model=pruned, history=result.history, meta={})
    reloaded, ckpt = checkpoint.load_model(path)
    assert len(ckpt["pruning_history"]) >= report["steps"]
    reloaded.eval()
    assert count_params(reloaded) == count_params(pruned)
    with torch.no_grad():
        a, b = pruned.backbone(image[None]), reloaded.backbone(image[None])
        assert all(torch.equal(a[k], b[k]) for k in a)
        out_a, out_b = pruned([image])[0], reloaded([image])[0]
        assert torch.equal(out_a["boxes"], out_b["boxes"])
        assert torch.equal(out_a["scores"], out_b["scores"])
    return report
