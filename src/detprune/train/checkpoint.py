"""The fixed checkpoint dict: weights, architecture spec and pruning history, no pickles.

A checkpoint rebuilds its model from the registry (``model`` spec), replays
torch-pruning's pruning history on it, then loads the state_dict, all loaded with
``torch.load(..., weights_only=True)``.

Optional key ``aux_heads`` (written by the prune stage of DCP/LCP): ``{feature module:
state_dict}`` of the auxiliary networks trained while pruning, tensors only, from which
LCP's fine-tuning loss starts (:mod:`detprune.pruning.lcp_loss`). A checkpoint without
it is read as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from detprune.models import MODELS, build_model, model_kwargs
from detprune.utils.io import torch_load, torch_save

FORMAT = "detprune-checkpoint/1"
REQUIRED = ("format", "model", "pruning_history", "state_dict")
AUX_HEADS = "aux_heads"


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the spec survives ``weights_only`` loading as-is."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def model_spec(name: str, num_classes: int, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """What :func:`rebuild` needs to construct the unpruned architecture."""
    return {
        "name": name,
        "num_classes": int(num_classes),
        "kwargs": _plain(model_kwargs(name, overrides)),
    }


def example_inputs(spec: dict[str, Any]) -> torch.Tensor:
    """A fixed batch-1 input (1, 3, S, S) for tracing the dependency graph.

    Registry detectors called with a batched tensor (not a list of images) return their
    dense head outputs, so the traced graph holds every channel coupling.
    """
    size = int(spec["kwargs"].get("image_size", MODELS[spec["name"]].image_size))
    gen = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, size, size, generator=gen)


def apply_history(model: nn.Module, spec: dict[str, Any], history: list) -> nn.Module:
    """Replay torch-pruning's pruning history on a freshly built model.

    Every entry must name a layer of the model: the pruning stage may trace auxiliary
    modules with it (MIEP's FOI adapters, pruned with the neck), but those are never the
    root of a pruned group, so the history replays on the bare model."""
    names = dict(model.named_modules())
    unknown = sorted({str(entry[0]) for entry in history if str(entry[0]) not in names})
    if unknown:
        raise ValueError(f"pruning history names modules the model lacks: {unknown}")
    if history:
        was_training = model.training
        model.eval()
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=(example_inputs(spec),))
        dg.load_pruning_history(history)
        model.train(was_training)
    return model


def _architecture(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec``'s keyword arguments without its pretrained backbone file: a rebuilt model
    gets its weights from the checkpoint, so later stages never read that file."""
    return (
        {**spec["kwargs"], "pretrained_backbone": None}
        if "pretrained_backbone" in spec["kwargs"]
        else dict(spec["kwargs"])
    )


def rebuild(spec: dict[str, Any], history: list) -> nn.Module:
    """Build the registry model of ``spec`` and prune it to ``history``."""
    model = build_model(spec["name"], spec["num_classes"], _architecture(spec))
    return apply_history(model, spec, history)


def save(
    path: str | Path,
    *,
    spec: dict[str, Any],
    model: nn.Module,
    history: list,
    meta: dict[str, Any],
    **state: Any,
) -> None:
    """Write a checkpoint atomically. ``state`` holds optimizer/scheduler/epoch/rng."""
    ckpt = {
        "format": FORMAT,
        "model": spec,
        "pruning_history": _plain(history),
        "state_dict": model.state_dict(),
        "meta": meta,
        **state,
    }
    torch_save(path, ckpt)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict (``weights_only=True``) and check its fields."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: checkpoint is not a dict")
    for key in REQUIRED:
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint lacks field '{key}'")
    if ckpt["format"] != FORMAT:
        raise ValueError(f"{path}: field 'format' is {ckpt['format']!r}, expected {FORMAT!r}")
    if ckpt["model"].get("name") not in MODELS:
        raise ValueError(
            f"{path}: field 'model.name' {ckpt['model'].get('name')!r} is not registered"
        )
    heads = ckpt.get(AUX_HEADS, {})
    if not isinstance(heads, dict) or not all(
        isinstance(sd, dict) and all(torch.is_tensor(t) for t in sd.values())
        for sd in heads.values()
    ):
        raise ValueError(f"{path}: field '{AUX_HEADS}' is not {{module: state_dict}}")
    return ckpt


def aux_heads(ckpt: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The auxiliary-head state_dicts a checkpoint carries (``{}`` when none)."""
    return dict(ckpt.get(AUX_HEADS, {}))


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (possibly pruned) model stored at ``path`` and load its weights."""
    ckpt = load(path)
    spec = ckpt["model"]
    model = build_model(spec["name"], spec["num_classes"], _architecture(spec))
    try:
        apply_history(model, spec, ckpt["pruning_history"])
    except ValueError as exc:
        raise ValueError(f"{path}: field 'pruning_history': {exc}") from exc
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: field 'state_dict' does not fit the rebuilt model ({exc})"
        ) from exc
    return model, ckpt
