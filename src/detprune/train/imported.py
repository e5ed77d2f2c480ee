"""The baseline from a local weights file (``model.checkpoint``) instead of training.

The file is a detprune checkpoint of the configured (unpruned) model, or torchvision's
state_dict of a Faster R-CNN, RetinaNet or FCOS detector
(:mod:`detprune.models.import_weights`). Either way it is written as the project's
checkpoint at the baseline path, so pruning, fine-tuning and evaluation read it as they
read a trained baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from detprune.models import build_model
from detprune.models.import_weights import is_state_dict, load_torchvision, read_weights
from detprune.train import checkpoint
from detprune.utils.io import file_sha256
from detprune.utils.provenance import provenance


def dataset_classes(train_ann: str | Path) -> tuple[list[int], list[str]]:
    """The category ids (sorted, label i + 1 is id ``[i]``) and names of a COCO JSON, or
    the class folders of an ImageFolder split (ids 1..K)."""
    p = Path(train_ann)
    if p.is_dir():
        names = sorted(d.name for d in p.iterdir() if d.is_dir())
        return list(range(1, len(names) + 1)), names
    cats = {int(c["id"]): str(c["name"]) for c in json.loads(p.read_text())["categories"]}
    ids = sorted(cats)
    return ids, [cats[i] for i in ids]


def _from_project(path: str, name: str, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """A detprune checkpoint: it must hold the configured, unpruned model."""
    model, ckpt = checkpoint.load_model(path)
    spec = ckpt["model"]
    if spec["name"] != name or int(spec["num_classes"]) != num_classes:
        raise ValueError(
            f"model.checkpoint: {path} holds {spec['name']} with {spec['num_classes']} "
            f"classes; the config trains {name} on a dataset of {num_classes} classes"
        )
    if ckpt["pruning_history"]:
        raise ValueError(f"model.checkpoint: {path} holds a pruned model, not a baseline")
    return model, spec


def import_baseline(
    config: dict[str, Any], weights: str | Path, train_ann: str, out: str
) -> dict[str, Any]:
    """Write the baseline checkpoint ``out`` from the file ``weights`` (the config's
    ``model.checkpoint``, as the workflow passes it)."""
    src = str(weights)
    name = config["model"]["name"]
    ids, names = dataset_classes(train_ann)
    obj = read_weights(src)
    if is_state_dict(obj):
        overrides = dict(config["model"].get("kwargs", {}))
        spec = checkpoint.model_spec(name, len(ids), overrides)
        model = build_model(spec["name"], spec["num_classes"], spec["kwargs"])
        load_torchvision(model, obj, ids, src)
        kind = "torchvision"
    elif obj.get("format") == checkpoint.FORMAT:
        model, spec = _from_project(src, name, len(ids))
        kind = checkpoint.FORMAT
    else:
        raise ValueError(
            f"model.checkpoint: {src} is not a checkpoint (a dict of neither tensors nor "
            f"format {checkpoint.FORMAT!r}; keys {sorted(map(str, obj))[:5]})"
        )
    meta = provenance(
        {k: config[k] for k in ("seed", "model")},
        stage="import",
        method="baseline",
        flops_target=1.0,
        seed=config["seed"],
        class_names=names,
        source={"path": src, "sha256": file_sha256(src), "kind": kind},
    )
    checkpoint.save(out, spec=spec, model=model, history=[], meta=meta)
    return {"out": out, "source": src, "kind": kind, "num_classes": len(ids)}
