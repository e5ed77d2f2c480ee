"""How a detector's backbone starts: ``pretrain.init`` resolved to a file, without torch.

``pretrain.init`` is one of

- ``scratch``: PyTorch's initialisation (nothing is planned; the default run's choice);
- ``pretrained``: the backbone trained as a classifier on the embedded synthetic
  classification set by the ``pretrain_backbone`` stage, once per backbone family, cached
  at ``<pretrain.dir>/<family>-<digest>.pt`` (``pretrain.dir`` defaults to
  ``<results>/models/pretrained``; a table run sets it to the run's own
  ``results/models/pretrained``, so every experiment shares the file);
- a local state_dict file for every backbone (``init: path/to/resnet50.pth``), or a
  mapping ``{family: file}`` (e.g. ``{resnet50: ..., cspdarknet53: ...}``), loaded strictly
  with ``torch.load(weights_only=True)``.

A backbone family is the backbone's architecture: its kind (the registry entry's
``backbone`` field) and the detector keyword arguments that shape it
(:data:`ARCH_KEYS`), read from the model catalog, so the workflow plans without torch.
``model.pretrained_backbone``, when set, wins over ``pretrain.init``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from detprune.config import ConfigError, model_catalog

#: kind -> the detector keyword arguments that define the backbone's architecture
ARCH_KEYS: dict[str, tuple[str, ...]] = {
    "resnet": ("backbone", "widths", "blocks", "stem_width"),
    "cspdarknet53": ("width", "depth"),
    "cspdarknet53_tiny": ("width",),
}
#: the pretraining schedule keys (``pretrain.*`` but ``init`` and ``dir``): part of the digest
SCHEDULE_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "num_train",
    "num_val",
    "num_classes",
    "image_size",
    "seed",
)
SPECIAL = ("scratch", "pretrained")


def init_of(config: Mapping[str, Any]) -> Any:
    """``pretrain.init`` (``scratch`` when the section is absent)."""
    return (config.get("pretrain") or {}).get("init", "scratch")


def backbone_arch(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"family": ..., "kind": ..., "arch": {...}}`` of the config's detector, or None
    for a model without a declared backbone (the classifiers)."""
    name = config["model"]["name"]
    entry = model_catalog()[name]
    spec = entry.get("backbone")
    if not spec:
        return None
    kind = spec["kind"]
    overrides = config["model"].get("kwargs") or {}
    arch = {k: overrides.get(k, spec["defaults"].get(k)) for k in ARCH_KEYS[kind]}
    arch = json.loads(json.dumps(arch))  # tuples -> lists: one canonical form
    if kind == "resnet":
        net = arch.pop("backbone")
        if net != "narrow":  # a torchvision ResNet: the name is the architecture
            return {"family": net, "kind": kind, "arch": {"backbone": net}}
        return {"family": "resnet_narrow", "kind": kind, "arch": {"backbone": net, **arch}}
    return {"family": kind, "kind": kind, "arch": arch}


def schedule(config: Mapping[str, Any]) -> dict[str, Any]:
    """The pretraining schedule (``pretrain`` without ``init`` and ``dir``)."""
    section = config.get("pretrain") or {}
    return {k: section[k] for k in SCHEDULE_KEYS if k in section}


def backbone_id(config: Mapping[str, Any]) -> str | None:
    """``<family>-<digest>``: the family and a digest of its architecture and the
    pretraining schedule (the file name of the cached backbone), or None."""
    arch = backbone_arch(config)
    if arch is None:
        return None
    blob = json.dumps({"arch": arch, "schedule": schedule(config)}, sort_keys=True)
    return f"{arch['family']}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def pretrained_dir(config: Mapping[str, Any]) -> str:
    """Where pretrained backbones are cached: ``pretrain.dir``, else under ``results``."""
    return (config.get("pretrain") or {}).get("dir") or f"{config['results']}/models/pretrained"


def pretrained_path(config: Mapping[str, Any]) -> str | None:
    """The pretraining stage's file of the config's backbone (whatever ``init`` says)."""
    bid = backbone_id(config)
    return f"{pretrained_dir(config)}/{bid}.pt" if bid else None


def meta_path(model_path: str) -> str:
    """The metadata JSON next to a pretrained backbone file."""
    return model_path.removesuffix(".pt") + ".json"


def resolve(config: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(how, file)``: ``("scratch", None)``, ``("pretrained", <cached file>)`` or
    ``("file", <local file>)``; ``model.pretrained_backbone`` wins (``("file", ...)``)."""
    explicit = config["model"].get("pretrained_backbone")
    if explicit:
        return "file", str(explicit)
    init = init_of(config)
    if init == "scratch":
        return "scratch", None
    arch = backbone_arch(config)
    if arch is None:  # a classifier: nothing to pretrain
        return "scratch", None
    if init == "pretrained":
        return "pretrained", pretrained_path(config)
    if isinstance(init, Mapping):
        if arch["family"] not in init:
            raise ConfigError(
                f"config field 'pretrain.init': no file for backbone family "
                f"{arch['family']!r} (model {config['model']['name']}); "
                f"it names {sorted(init)}"
            )
        return "file", str(init[arch["family"]])
    return "file", str(init)


def init_file(config: Mapping[str, Any]) -> str | None:
    """The file the detector's backbone is loaded from (None: from scratch)."""
    return resolve(config)[1]


def init_params(config: Mapping[str, Any]) -> bool:
    """Whether the ``pretrain`` section is a parameter of the training stage: only when
    ``pretrain.init`` starts the backbone from a file (a scratch run's digests, and those
    of a run naming ``model.pretrained_backbone``, stay as they were)."""
    return not config["model"].get("pretrained_backbone") and resolve(config)[0] != "scratch"
