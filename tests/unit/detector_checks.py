"""Shared checks for the registry detectors: overfit a batch, COCO-evaluate, prune, reload.

Used by ``test_detectors_ssd.py``, ``test_detectors_onestage.py`` and ``test_fsaf.py``;
each check runs a CPU-sized detector at 64 px on two synthetic images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from detprune.data.coco import CocoDetection
from detprune.data.synth import write_synthetic
from detprune.evaluation.cost import count_params
from detprune.models import MODELS, build_model
from detprune.pruning.importance.magnitude import l1_importance
from detprune.pruning.procedures.oneshot import macs_counter, prune_to_flops
from detprune.train import checkpoint
from detprune.train.engine import evaluate, lr_factor

SIZE = 64


def tiny_dataset(root: Path) -> CocoDetection:
    """Two 64 px synthetic images (seed 2: labels [1, 6] and [5, 2, 3, 4])."""
    write_synthetic(
        root, seed=2, num_train=2, num_val=2, image_size=SIZE, min_objects=1, max_objects=3
    )
    return CocoDetection(root / "instances_train.json", root / "train")


def overfit(
    model: nn.Module,
    data: CocoDetection,
    iters: int,
    lr: float,
    clip: float | None = None,
    warmup: int = 0,
) -> list[dict[str, float]]:
    """SGD on the same batch (all images of ``data``): the lr warmed up linearly over
    ``warmup`` iterations as the engine does (:func:`lr_factor`), the gradient norm clipped
    at ``clip``; each step's loss terms."""
    images, targets = zip(*[data[i] for i in range(len(data))], strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = {"epochs": 1, "warmup_iters": warmup, "schedule": "constant"}
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(sched, iters))
    model.train()
    steps = []
    for _ in range(iters):
        terms = model(list(images), list(targets))
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        lr_sched.step()
        steps.append({k: float(v.detach()) for k, v in terms.items()})
    return steps


def check_trains_and_evaluates(
    name: str,
    root: Path,
    iters: int,
    lr: float,
    min_ap50: float,
    warmup: int = 0,
    falling: Sequence[str] = (),
) -> dict[str, float | None]:
    """Loss falls when overfitting a batch (with the entry's own gradient clipping, as its
    training schedule has it), and so does each term named in ``falling``; pycocotools then
    scores the same images and the detector's labels are the dataset's 1..K (the top
    detection is a true class)."""
    torch.manual_seed(0)
    data = tiny_dataset(root)
    model = build_model(name, data.num_classes, {"image_size": SIZE})
    clip = MODELS[name].schedule.get("clip_grad_norm")
    steps = overfit(model, data, iters, lr, clip, warmup)
    losses = [sum(s.values()) for s in steps]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    for term in falling:
        assert sum(s[term] for s in steps[-3:]) / 3 < 0.6 * steps[0][term], (term, steps)
    metrics, text = evaluate(model, data, torch.device("cpu"), batch_size=2)
    assert "Average Precision" in text
    assert metrics["AP50"] is not None and metrics["AP50"] >= min_ap50, metrics
    model.eval()
    with torch.no_grad():
        out = model([data[0][0]])[0]
    labels = out["labels"]
    assert len(labels) > 0
    assert int(labels.min()) >= 1 and int(labels.max()) <= data.num_classes
    assert int(labels[out["scores"].argmax()]) in data[0][1]["labels"].tolist()
    return metrics


def check_prunes_and_reloads(name: str, tmp_path: Path, num_classes: int = 3) -> dict:
    """l1 to 50% of the MACs within 2%, physically smaller, runs in train and eval mode,
    and a checkpoint rebuilds it from the pruning history (weights_only)."""
    torch.manual_seed(0)
    entry = MODELS[name]
    spec = checkpoint.model_spec(name, num_classes, {"image_size": SIZE})
    model = build_model(name, num_classes, spec["kwargs"]).eval()
    macs_fn = macs_counter(SIZE, entry.per_roi_modules, 0)
    result = prune_to_flops(
        model,
        importance=l1_importance(),
        target=0.5,
        example=checkpoint.example_inputs(spec),
        ignored=list(entry.ignored_layers),
        macs_fn=macs_fn,
        # at 64 px the channel granularity can keep the bisection from its 0.5% early
        # stop; the 2% tolerance is what counts, and 10 trials always reach it here
        max_trials=10,
    )
    pruned = result.model
    kept = macs_fn(pruned) / macs_fn(model)
    assert abs(kept / 0.5 - 1) <= 0.02
    assert count_params(pruned) < 0.8 * count_params(model)
    layers = result.report["layers"]
    assert sum(after < before for after, before in layers.values()) >= 5
    for path in entry.ignored_layers:
        assert layers[path][0] == layers[path][1], path

    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    target = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 36.0]]), "labels": torch.tensor([2])}
    pruned.train()
    losses = pruned([image, image.flip(-1)], [target, target])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    pruned.eval()
    with torch.no_grad():
        out = pruned([image])[0]
    assert out["boxes"].shape[1] == 4

    path = tmp_path / f"{name}.pt"
    checkpoint.save(path, spec=spec, model=pruned, history=result.history, meta={})
    raw = torch.load(path, weights_only=True)
    assert raw["pruning_history"]
    reloaded, _ = checkpoint.load_model(path)
    reloaded.eval()
    assert count_params(reloaded) == count_params(pruned)
    with torch.no_grad():
        a, b = pruned.backbone(image[None]), reloaded.backbone(image[None])
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(pruned([image])[0]["scores"], reloaded([image])[0]["scores"])
    return result.report
