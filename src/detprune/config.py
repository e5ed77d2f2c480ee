"""Load and validate the pipeline config: the JSON schema Snakemake validates too, then
the checks a schema cannot make (:func:`check_names`): that every method, regularizer,
distillation and model it names exists, and that their options are keys they declare,
of the declared types. Both run without torch, in the CLI and in ``snakemake -n``."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from detprune.pruning.base import SCRATCH_PREFIX
from detprune.pruning.methods import METHODS, get_method, options_of
from detprune.pruning.procedures.options import LCP_LOSS
from detprune.train.options import REGULARIZER_OPTIONS, SAD_OPTIONS
from detprune.utils.options import Option, Problem, problems, unknown_name

#: ``finetune.*.distill`` -> the options its ``distill_options`` accepts (the losses are
#: :data:`detprune.train.distill.DISTILLERS`).
DISTILL_OPTIONS: dict[str, Mapping[str, Option]] = {"sad": SAD_OPTIONS, "lcp": LCP_LOSS}
#: type names of the model catalog (``detprune/schemas/models.yaml``)
_CATALOG_TYPES = {
    "boolean": bool,
    "integer": int,
    "number": float,
    "string": str,
    "list": list,
    "mapping": dict,
    "any": object,
}


class ConfigError(ValueError):
    """A config file that does not satisfy the schema."""


def schema() -> dict[str, Any]:
    """The config JSON schema shipped with the package."""
    text = resources.files("detprune").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def validate(config: Mapping[str, Any], source: str = "<config>") -> None:
    """Raise :class:`ConfigError` naming ``source``, each bad field and its problem: the
    schema's, then (on a config the schema accepts) :func:`check_names`'."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            field = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"{source}: field '{field}': {err.message}")
        raise ConfigError("\n".join(lines))
    check_names(config, source)


def check_names(config: Mapping[str, Any], source: str = "<config>") -> None:
    """Raise :class:`ConfigError` for every unknown method, regularizer, distillation or
    model the (schema-valid) config names, and every option its owner does not declare
    or whose value has another type, naming the field, the owner and the accepted keys."""
    found = name_problems(config)
    if found:
        raise ConfigError("\n".join(f"{source}: field '{f}': {msg}" for f, msg in found))


def name_problems(config: Mapping[str, Any]) -> list[Problem]:
    """What :func:`check_names` reports, as (field, problem) pairs."""
    out: list[Problem] = []
    prune = config["prune"]
    for i, name in enumerate(prune["methods"]):
        if name not in METHODS:
            out.append(unknown_name(f"prune.methods.{i}", name, METHODS, "method"))
    for name, given in (prune.get("options") or {}).items():
        where = f"prune.options.{name}"
        if name not in METHODS:
            out.append(unknown_name(where, name, METHODS, "method"))
        else:
            out += problems(where, given, options_of(METHODS[name]), f"method {name!r}")
    for name, given in config["sparse"]["regularizers"].items():
        where = f"sparse.regularizers.{name}"
        if name not in REGULARIZER_OPTIONS:
            out.append(unknown_name(where, name, REGULARIZER_OPTIONS, "regularizer"))
        else:
            out += problems(where, given, REGULARIZER_OPTIONS[name], f"regularizer {name!r}")
    out += _finetune_problems(config)
    out += _model_problems(config["model"])
    return out


def _finetune_problems(config: Mapping[str, Any]) -> list[Problem]:
    """Unknown methods in ``finetune.methods``, unknown ``distill`` names, and the
    ``distill_options`` each configured method trains with, against its distillation's
    declaration (options in ``finetune.methods.<m>`` for a method trained without
    distillation are an error; the default's apply only to the methods that distil)."""
    ft = config["finetune"]
    overrides = ft.get("methods") or {}
    out: list[Problem] = []
    for where, sched in [("finetune.default", ft["default"])] + [
        (f"finetune.methods.{m}", s) for m, s in overrides.items()
    ]:
        name = sched.get("distill")
        if name is not None and name not in DISTILL_OPTIONS:
            out.append(unknown_name(f"{where}.distill", name, DISTILL_OPTIONS, "distillation"))
    out += [
        unknown_name(f"finetune.methods.{m}", m, METHODS, "method")
        for m in overrides
        if m not in METHODS
    ]
    if out:
        return out
    for m in dict.fromkeys([*config["prune"]["methods"], *overrides]):
        if m not in METHODS or "distill_options" not in finetune_schedule(config, m):
            continue
        own = "distill_options" in overrides.get(m, {})
        where = f"finetune.{'methods.' + m if own else 'default'}.distill_options"
        distill = distillation(config, m)
        if distill is None:
            if own:
                out.append((where, f"set, but method {m!r} is fine-tuned without distillation"))
            continue
        given = finetune_schedule(config, m)["distill_options"]
        out += problems(where, given, DISTILL_OPTIONS[distill], f"distillation {distill!r}")
    return list(dict.fromkeys(out))


@functools.cache
def model_catalog() -> dict[str, Any]:
    """The model registry's names, tasks and keyword arguments, without torch
    (``detprune/schemas/models.yaml``, generated by :mod:`detprune.models.catalog`)."""
    text = resources.files("detprune").joinpath("schemas/models.yaml").read_text()
    return yaml.safe_load(text)


def model_options(name: str) -> dict[str, Option]:
    """The keys ``model.kwargs`` accepts for registry model ``name``, with their types."""
    kwargs = model_catalog()[name]["kwargs"]
    return {
        k: Option(None, tuple(_CATALOG_TYPES[t] for t in types.split("|")))
        for k, types in kwargs.items()
    }


def _model_problems(model: Mapping[str, Any]) -> list[Problem]:
    name = model["name"]
    if name not in model_catalog():
        return [unknown_name("model.name", name, model_catalog(), "model")]
    return problems(
        "model.kwargs", model.get("kwargs") or {}, model_options(name), f"model {name!r}"
    )


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
