"""Paper tables as pipeline targets: table specs, profiles and the experiments they need.

A table (``config/tables/<name>.yaml``) names experiments (a model on a dataset, one per
profile) and rows (method x FLOPs targets, with the id of the figure the paper reports).
A profile (``config/profiles/<profile>.yaml``, a full config) says how an experiment
becomes a config: ``mini`` runs CPU-sized models on the embedded dataset with short
schedules, ``paper`` the papers' models, datasets and schedules. Every experiment is one
run of the ordinary DAG (data -> baseline -> prune -> fine-tune -> evaluate) in its own
results folder, shared by all the tables that need it, one folder per training seed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from detprune import smoke as S
from detprune.config import ConfigError, load_config, model_catalog, validate
from detprune.utils.io import write_text
from detprune.workflow import path, pct

TABLES_DIR = Path("config/tables")
PROFILES_DIR = Path("config/profiles")
REPORTED = Path("config/reported.yaml")
CLAIMS = Path("config/claims.yaml")
PROFILES = ("mini", "paper")
ROOT_DEFAULTS = {"coco_root": "data/coco", "voc_root": "data/voc", "imagenet_root": "data/imagenet"}


@dataclass(frozen=True)
class Row:
    """One line of a paper table: a method at one FLOPs target on one experiment."""

    experiment: str
    method: str
    label: str
    flops: float
    reported: str | None
    missing: str | None


@dataclass(frozen=True)
class TableSpec:
    """A paper table: its experiments (per profile) and rows."""

    name: str
    title: str
    paper: str
    metric: str
    caption: str
    seeds: tuple[int, ...]
    experiments: Mapping[str, Mapping[str, Any]]
    rows: tuple[Row, ...]

    def metric_of(self, experiment: str) -> str:
        """The metric compared for ``experiment`` (the table's unless overridden)."""
        return self.experiments[experiment].get("metric", self.metric)


@dataclass
class Experiment:
    """One run of the DAG: its results folder, its config, and the jobs tables want."""

    results: str
    config: dict[str, Any]
    targets: list[tuple[str, float]] = field(default_factory=list)

    @property
    def config_path(self) -> str:
        return f"{self.results}/config.yaml"


def _schema() -> dict[str, Any]:
    text = resources.files("detprune").joinpath("schemas/table.schema.yaml").read_text()
    return yaml.safe_load(text)


def table_names() -> list[str]:
    """Every table of ``config/tables/``, sorted."""
    return sorted(p.stem for p in TABLES_DIR.glob("*.yaml"))


def load_table(name: str) -> TableSpec:
    """Read and validate ``config/tables/<name>.yaml`` (schema, experiments, registries)."""
    from detprune.pruning.methods import METHODS

    path = TABLES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such table; known: {table_names()}")
    spec = yaml.safe_load(path.read_text())
    errors = sorted(
        jsonschema.Draft202012Validator(_schema()).iter_errors(spec),
        key=lambda e: list(e.absolute_path),
    )
    if errors:
        raise ConfigError(
            "\n".join(
                f"{path}: field '{'.'.join(map(str, e.absolute_path)) or '<top level>'}': "
                f"{e.message}"
                for e in errors
            )
        )
    for key, exp in spec["experiments"].items():
        for profile in PROFILES:
            model = exp[profile]["model"]
            if model not in model_catalog():
                raise ConfigError(
                    f"{path}: field 'experiments.{key}.{profile}.model': unknown model {model!r}"
                )
    rows = []
    for i, row in enumerate(spec["rows"]):
        where = f"{path}: field 'rows.{i}"
        if row["experiment"] not in spec["experiments"]:
            raise ConfigError(f"{where}.experiment': unknown experiment {row['experiment']!r}")
        if row["method"] not in METHODS and "missing" not in row:
            raise ConfigError(
                f"{where}.method': {row['method']!r} is not a registered method; "
                "name one of `detprune list methods` or mark the row `missing: <why>`"
            )
        for flops in row["flops"]:
            rows.append(
                Row(
                    row["experiment"],
                    row["method"],
                    row.get("label", row["method"]),
                    float(flops),
                    row["reported"].format(pct=pct(flops)) if "reported" in row else None,
                    row.get("missing"),
                )
            )
    return TableSpec(
        name,
        spec["title"],
        spec["paper"],
        spec["metric"],
        spec.get("caption", ""),
        tuple(spec.get("seeds", [0])),
        spec["experiments"],
        tuple(rows),
    )


def parse_seeds(value: Any, default: Sequence[int]) -> tuple[int, ...]:
    """``--config seeds=N`` (seeds 0..N-1), a list, '0,1', or the table's default."""
    if value is None:
        return tuple(default)
    if isinstance(value, int):
        return tuple(range(value))
    if isinstance(value, str):
        value = value.split(",")
    seeds = tuple(int(s) for s in value)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"config field 'seeds': repeated seed in {list(seeds)}")
    return seeds


def selected_tables(value: str) -> list[str]:
    """``--config table=...``: one name, several joined by commas, or ``all``."""
    return table_names() if value == "all" else value.split(",")


def load_profile(profile: str) -> dict[str, Any]:
    """The profile's config (a full config, usually extending the default one)."""
    if profile not in PROFILES:
        raise ConfigError(f"config field 'profile': {profile!r} is not one of {list(PROFILES)}")
    return load_config(PROFILES_DIR / f"{profile}.yaml")


def _fill_roots(node: Any, roots: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return node.format(**roots)
    if isinstance(node, Mapping):
        return {k: _fill_roots(v, roots) for k, v in node.items()}
    return copy.deepcopy(node)


def experiment_config(
    profile_cfg: Mapping[str, Any],
    setup: Mapping[str, Any],
    seed: int,
    results_root: str,
    profile: str,
    roots: Mapping[str, str],
    checkpoints: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """The config of one experiment: the profile's, with its model, dataset and seed;
    ``checkpoints[dataset][model]``, when given, is its ``model.checkpoint``."""
    entry = model_catalog()[setup["model"]]
    task = entry["task"]
    exp = profile_cfg.get("experiment", {})
    dataset = dataset_of(setup)
    if dataset.startswith("synth"):
        data = exp.get("synth_for", {}).get(task)
        if data is None:
            raise ConfigError(f"profile {profile}: field 'experiment.synth_for.{task}' missing")
    else:
        data = exp.get("datasets", {}).get(dataset)
        if data is None:
            raise ConfigError(f"profile {profile}: field 'experiment.datasets.{dataset}' missing")
    cfg = {k: copy.deepcopy(v) for k, v in profile_cfg.items() if k != "experiment"}
    cfg["data"] = _fill_roots(data, roots)
    cfg["seed"] = int(seed)
    cfg["seeds"] = [int(seed)]  # one experiment per training seed, each its own baseline
    cfg.pop("baseline_per_seed", None)
    cfg["model"] = {**cfg["model"], "name": setup["model"]}
    weights = (checkpoints or {}).get(dataset, {}).get(setup["model"])
    if weights:
        cfg["model"]["checkpoint"] = weights
    keys = exp.get("model_schedule_keys", [])
    schedule = entry["schedule"]
    cfg["train"].update({k: copy.deepcopy(v) for k, v in schedule.items() if k in keys})
    if exp.get("full_schedules"):
        cfg["sparse"]["schedule"] = {**cfg["train"], "max_iters_per_epoch": None}
        cfg["finetune"]["default"] = {**cfg["train"], "max_iters_per_epoch": None}
    cfg["results"] = results_dir(results_root, profile, setup, seed)
    if cfg.get("pretrain") and not cfg["pretrain"].get("dir"):  # one cache for the whole run
        cfg["pretrain"]["dir"] = f"{results_root}/models/pretrained"
    cfg["report"] = {"name": setup["model"]}
    validate(cfg, f"experiment {cfg['results']}")
    return cfg


def plan(
    main: Mapping[str, Any], tables: Sequence[TableSpec], profile: str
) -> dict[str, Experiment]:
    """The experiments (by results folder) and their jobs that ``tables`` need."""
    profile_cfg = load_profile(profile)
    smoke = S.check({**main, "profile": profile})
    defaults = S.fixture_roots(main["results"]) if smoke else ROOT_DEFAULTS
    roots = {k: str(main.get(k, v)) for k, v in defaults.items()}
    weights = main.get("checkpoints") or {}
    unknown = sorted(
        f"{d}.{m}" for d, ms in weights.items() for m in ms if m not in model_catalog()
    )
    if unknown:
        raise ConfigError(f"config field 'checkpoints': unknown models {unknown}")
    out: dict[str, Experiment] = {}
    for table in tables:
        for seed in parse_seeds(main.get("seeds"), table.seeds):
            exps = {}
            for key, setups in table.experiments.items():  # every baseline, even of missing rows
                cfg = experiment_config(
                    profile_cfg, setups[profile], seed, main["results"], profile, roots, weights
                )
                exps[key] = out.setdefault(cfg["results"], Experiment(cfg["results"], cfg))
            for row in table.rows:
                targets = exps[row.experiment].targets
                if not row.missing and (row.method, row.flops) not in targets:
                    targets.append((row.method, row.flops))
    if smoke:  # the same jobs, their work cut (detprune.smoke)
        for exp in out.values():
            exp.config = S.overlay(exp.config, [m for m, _ in exp.targets])
            validate(exp.config, f"experiment {exp.results}")
    return out


def experiment_dir(
    main: Mapping[str, Any], table: TableSpec, key: str, profile: str, seed: int
) -> str:
    """The results folder of experiment ``key`` of ``table`` for ``seed``."""
    return results_dir(main["results"], profile, table.experiments[key][profile], seed)


def baseline_metrics(
    main: Mapping[str, Any], table: TableSpec, key: str, profile: str, seed: int
) -> str:
    """The metrics record of the baseline of experiment ``key`` of ``table`` for ``seed``."""
    at = {"results": experiment_dir(main, table, key, profile, seed)}
    return path("metrics_baseline", at, seed=seed)


def row_metrics(
    main: Mapping[str, Any], table: TableSpec, row: Row, profile: str, seed: int
) -> str:
    """The metrics record of ``row`` of ``table`` for ``seed``."""
    at = {"results": experiment_dir(main, table, row.experiment, profile, seed)}
    return path("metrics", at, method=row.method, pct=pct(row.flops), seed=seed)


def table_files(
    main: Mapping[str, Any], table: TableSpec, profile: str, seeds: Sequence[int]
) -> list[str]:
    """The metrics records ``table`` reads: each experiment's baseline and each row, per
    seed (the table rule's inputs, and what the paper table is built from)."""
    files: list[str] = []
    for seed in seeds:
        files += [baseline_metrics(main, table, key, profile, seed) for key in table.experiments]
        files += [row_metrics(main, table, r, profile, seed) for r in table.rows if not r.missing]
    return list(dict.fromkeys(files))


def results_dir(root: str, profile: str, setup: Mapping[str, Any], seed: int) -> str:
    """``<root>/experiments/<profile>/<dataset>/<model>/seed<k>``."""
    return f"{root}/experiments/{profile}/{dataset_of(setup)}/{setup['model']}/seed{seed}"


def dataset_of(setup: Mapping[str, Any]) -> str:
    """The dataset of an experiment setup; by default the embedded one of the model's task."""
    if "dataset" in setup:
        return setup["dataset"]
    return "synth_cls" if model_catalog()[setup["model"]]["task"] == "classification" else "synth"


def write_config(exp: Experiment) -> None:
    """Write the experiment's config where its jobs read it; untouched when unchanged."""
    text = yaml.safe_dump(exp.config, sort_keys=False)
    p = Path(exp.config_path)
    if p.is_file() and p.read_text() == text:
        return
    write_text(p, text)
