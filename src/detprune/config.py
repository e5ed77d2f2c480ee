"""Load and validate the pipeline config (the same JSON schema Snakemake validates)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from detprune.pruning.base import SCRATCH_PREFIX
from detprune.pruning.methods import get_method


class ConfigError(ValueError):
    """A config file that does not satisfy the schema."""


def schema() -> dict[str, Any]:
    """The config JSON schema shipped with the package."""
    text = resources.files("detprune").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def validate(config: Mapping[str, Any], source: str = "<config>") -> None:
    """Raise :class:`ConfigError` naming ``source``, each bad field and its problem."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            field = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"{source}: field '{field}': {err.message}")
        raise ConfigError("\n".join(lines))


def _read(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"{p}: config file does not exist")
    try:
        config = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML config file.

    A file with ``extends: <path>`` (relative to the working directory, as Snakemake
    reads it) is merged recursively over that base config, the way Snakemake merges
    ``--configfile`` over the Snakefile's default config.
    """
    p = Path(path)
    config = _read(p)
    chain = [str(p)]
    while "extends" in config:
        base_path = Path(config.pop("extends"))
        if str(base_path) in chain:
            raise ConfigError(f"{p}: field 'extends' makes a cycle: {chain}")
        chain.append(str(base_path))
        config = deep_merge(_read(base_path), config)
    validate(config, str(p))
    return config


def is_scratch(method: str) -> bool:
    """Whether ``method`` is a from-scratch control (``scratch-<m>``, see
    :data:`SCRATCH_PREFIX`)."""
    return method.startswith(SCRATCH_PREFIX)


def finetune_schedule(config: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The fine-tuning schedule of ``method``: the shared default plus its overrides.

    A from-scratch control (``scratch-<m>``) trains a re-initialised model, so its base
    is the baseline's schedule ``train`` (Liu et al. 2019 train the small model with the
    large one's schedule), not ``finetune.default``; ``finetune.methods.<method>``
    overrides apply on top either way.
    """
    base = config["train"] if is_scratch(method) else config["finetune"]["default"]
    sched = copy.deepcopy(dict(base))
    sched.update(config["finetune"].get("methods", {}).get(method, {}))
    return sched


def distillation(config: Mapping[str, Any], method: str) -> str | None:
    """The distillation ``method`` is fine-tuned with: its fine-tuning schedule's
    ``distill`` (default merged with ``finetune.methods.<m>``), else the registry's
    (``sad`` for gcp-sad, ``lcp`` for lcp), else None. The fine-tuning stage and the
    workflow's choice of rule both ask this."""
    return finetune_schedule(config, method).get("distill", get_method(method).distill)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in recursively."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
