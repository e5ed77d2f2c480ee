"""The pipeline plan: paths and command templates shared by the Snakefile and dvc.yaml.

Snakemake rules use ``COMMANDS[...]`` as their ``shell:`` and ``path(...)`` for their
files; :func:`dvc_stages` formats the very same templates with concrete paths, so
``dvc.yaml`` runs exactly the commands Snakemake runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import yaml

from detprune import backbone_init
from detprune.config import distillation
from detprune.pruning.base import scratch_source
from detprune.pruning.methods import sparsity_of

PATHS = {
    "synth": "{results}/data/synth",
    "synth_cls": "{results}/data/synth_cls",
    "carved": "{results}/data/carved/{part}.json",
    "check": "{results}/data/check_{split}.json",
    "baseline": "{results}/models/baseline/seed{seed}.pt",
    "sparse": "{results}/models/sparse/{regularizer}/seed{seed}.pt",
    "pruned": "{results}/models/pruned/{method}/flops{pct}/seed{seed}.pt",
    "prune_summary": "{results}/models/pruned/{method}/flops{pct}/seed{seed}.json",
    "finetuned": "{results}/models/finetuned/{method}/flops{pct}/seed{seed}.pt",
    "metrics_baseline": "{results}/metrics/baseline/seed{seed}.json",
    "metrics": "{results}/metrics/{method}/flops{pct}/seed{seed}.json",
    "latency": "{results}/metrics/latency/{name}/seed{seed}.json",
    "table": "{results}/tables/{name}.{ext}",
    "summary": "{results}/tables/{name}_summary.json",
    "figure": "{results}/figures/{name}_{kind}.png",
    "log": "{results}/logs/{stage}.log",
    "benchmark": "{results}/benchmarks/{stage}.tsv",
}

#: The split every table, figure and metrics summary reports. ``val`` is for choices
#: (schedules, loss weights, sweeps) and is never reported; ``train`` is trained on.
REPORTED_SPLIT = "test"
SPLITS = ("train", "val", "test")

# Which config keys each stage reads (DVC ``params:``, Snakemake's rerun trigger). Keys
# of one method or regularizer are added by :func:`stage_params`, so a run that only adds
# methods reuses every cached job of the methods it shares.
PARAMS = {
    "synth": ["data"],
    "check": ["data"],
    "train": ["seed", "model", "train", "pretrain"],
    "pretrain": ["pretrain"],
    "import": ["seed", "model"],
    "sparse": ["seed", "sparse.schedule"],
    "prune": [
        "seed",
        "model",
        "prune.global_pruning",
        "prune.max_layer_ratio",
        "prune.round_to",
        "prune.tolerance",
        "prune.calib_batches",
    ],
    "finetune": ["seed", "finetune.default"],
    "carve": ["data"],
    "evaluate": ["evaluate"],
    "report": ["report"],
    "export": ["evaluate.export"],
    "latency": ["evaluate.latency"],
}


#: Keys of a stage's section that only another stage reads (``evaluate.export``: the
#: export jobs; ``evaluate.latency``: the timing step): left out of that stage's rerun
#: trigger, so turning ONNX export on or timing longer reruns no evaluation.
NOT_READ = {"evaluate": ("export", "latency")}


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def stage_params(
    config: Mapping[str, Any], stage: str, method: str | None = None, regularizer: str | None = None
) -> list[str]:
    """The config keys a stage reads; per-method and per-regularizer keys when present; a
    section with :data:`NOT_READ` keys set as its other keys (DVC cannot exclude one)."""
    keys = _stage_keys(config, stage, method, regularizer)
    for section, skip in NOT_READ.items():
        if section in keys and any(_get(config, f"{section}.{k}") is not None for k in skip):
            at = keys.index(section)
            keys[at : at + 1] = [f"{section}.{k}" for k in config[section] if k not in skip]
    return keys


def _stage_keys(
    config: Mapping[str, Any], stage: str, method: str | None, regularizer: str | None
) -> list[str]:
    keys = [k for k in PARAMS[stage] if _get(config, k) is not None]
    if stage == "train" and "pretrain" in keys and not backbone_init.init_params(config):
        keys.remove("pretrain")  # a scratch run's digests stay as they were
    if stage == "pretrain":  # the schedule: the backbone's file name holds the rest
        keys = [f"pretrain.{k}" for k in backbone_init.SCHEDULE_KEYS]
        keys = [k for k in keys if _get(config, k) is not None]
    extra = {
        "prune": f"prune.options.{method}",
        "finetune": f"finetune.methods.{method}",
        "sparse": f"sparse.regularizers.{regularizer}",
    }.get(stage)
    if extra and _get(config, extra) is not None:
        keys.append(extra)
    return keys


COMMANDS = {
    "synth": "detprune data synth --config {params.config} --out-dir {params.out_dir} --log {log}",
    "carve": (
        "detprune data carve --ann {input.ann} --size {params.size} --seed {params.seed} "
        "--out-train {output.train} --out-tune {output.tune} --log {log}"
    ),
    "check": (
        "detprune data check --ann {input.ann} --images {input.images} "
        "--out {output.report} --log {log}"
    ),
    "pretrain": (
        "detprune pretrain --config {params.config} --out {output.model} "
        "--meta {output.meta} --threads {threads} --log {log}"
    ),
    "train": (
        "detprune train --config {params.config} --train-ann {input.train_ann} "
        "--train-images {input.train_images} --out {output.model} "
        "--seed {wildcards.seed} --threads {threads} --log {log}"
    ),
    "import": (
        "detprune import-checkpoint --config {params.config} --weights {input.weights} "
        "--train-ann {input.train_ann} --out {output.model} --seed {wildcards.seed} --log {log}"
    ),
    "sparse": (
        "detprune sparse --config {params.config} --regularizer {params.regularizer} "
        "--checkpoint {input.model} --train-ann {input.train_ann} "
        "--train-images {input.train_images} --out {output.model} "
        "--seed {wildcards.seed} --threads {threads} --log {log}"
    ),
    "prune": (
        "detprune prune --config {params.config} --method {params.method} "
        "--flops {params.flops} --checkpoint {input.model} "
        "--train-ann {input.train_ann} --train-images {input.train_images} "
        "--out {output.model} --summary {output.summary} --seed {wildcards.seed} "
        "--threads {threads} --log {log}"
    ),
    "finetune": (
        "detprune finetune --config {params.config} --method {params.method} "
        "--checkpoint {input.model} --teacher {input.teacher} --train-ann {input.train_ann} "
        "--train-images {input.train_images} --out {output.model} "
        "--seed {wildcards.seed} --threads {threads} --log {log}"
    ),
    "evaluate": (
        "detprune evaluate --config {params.config} --method {params.method} "
        "--flops {params.flops} --checkpoint {input.model} --ann {input.test_ann} "
        "--images {input.test_images} --split test --out {output.metrics} "
        "--seed {wildcards.seed} --threads {threads} --log {log}"
    ),
    "table": (
        "detprune table --table {wildcards.table} --profile {wildcards.profile} "
        "--results {params.results} --seeds {params.seeds} --reported {input.reported} "
        "--tables-dir {params.tables_dir} --figures-dir {params.figures_dir} --log {log}"
    ),
    "claims": (
        "detprune claims --claims {input.claims} --reported {input.reported} "
        "--profile {wildcards.profile} --results {params.results} --tables {params.tables} "
        "--csv {output.csv} --md {output.md} --log {log}"
    ),
    "export": (
        "detprune export --checkpoint {input.model} --ann {input.test_ann} "
        "--images {input.test_images} --out {output.onnx} --threads {threads} --log {log}"
    ),
    "latency": (
        "detprune time-latency --config {params.config} --metrics {input.metrics} "
        "--ann {input.test_ann} --images {input.test_images} --out {output.latency} "
        "--log {log}"
    ),
    "report": (
        "detprune report --config {params.config} --metrics {input.metrics} "
        "--latency {input.latency} "
        "--prune-summaries {input.summaries} --tables-dir {params.tables_dir} "
        "--figures-dir {params.figures_dir} --log {log}"
    ),
}


def pretrain_files(config: Mapping[str, Any]) -> dict[str, str] | None:
    """The pretrain_backbone job of ``config`` (``pretrain.init: pretrained``): its
    ``model``, ``meta``, ``log`` and ``benchmark`` files; None when it plans none."""
    how, model = backbone_init.resolve(config)
    if how != "pretrained" or model is None:
        return None
    folder, name = model.rsplit("/", 1)
    stem = name.removesuffix(".pt")
    return {
        "model": model,
        "meta": backbone_init.meta_path(model),
        "log": f"{folder}/logs/{stem}.log",
        "benchmark": f"{folder}/benchmarks/{stem}.tsv",
    }


def pretrain_jobs(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Pretrained backbone file -> the key (results folder) of the first config that plans
    it: one pretrain_backbone job per backbone family, shared by every experiment."""
    out: dict[str, str] = {}
    for key, cfg in configs.items():
        files = pretrain_files(cfg)
        if files:
            out.setdefault(files["model"], key)
    return out


def pct(target: float) -> str:
    """FLOPs share as the wildcard value used in paths: 0.5 -> '50', 0.125 -> '12.5'."""
    value = round(target * 100, 4)
    return f"{value:g}"


def path(key: str, config: Mapping[str, Any], **fields: Any) -> str:
    """A concrete path of kind ``key``."""
    return PATHS[key].format(results=config["results"], **fields)


def dataset_paths(config: Mapping[str, Any]) -> dict[str, str]:
    """Annotation files and image folders of the ``train``, ``val`` and ``test`` splits.

    ``test`` is the reported split: the embedded sets' own test split; for COCO the
    reported ``val_ann`` (val2017, as the papers report), with ``val`` a ``tune`` split of
    ``data.coco.tune_images`` images carved from the training set (which then trains on
    the rest); for an ImageFolder (ImageNet) its ``val`` folder, as the papers report,
    and its ``tune`` folder, when given, for choices.
    """
    source = config["data"]["source"]
    if source == "synth":
        root = path("synth", config)
        return {
            f"{s}_{k}": f"{root}/instances_{s}.json" if k == "ann" else f"{root}/{s}"
            for s in SPLITS
            for k in ("ann", "images")
        }
    if source in ("synth_cls", "imagefolder"):  # an ImageFolder split is its own "annotation"
        if source == "synth_cls":
            root = path("synth_cls", config)
            folders = {s: f"{root}/{s}" for s in SPLITS}
        else:
            f = config["data"]["imagefolder"]
            folders = {"train": f["train"], "val": f.get("tune", f["val"]), "test": f["val"]}
        return {f"{s}_{k}": folders[s] for s in SPLITS for k in ("ann", "images")}
    coco = dict(config["data"]["coco"])
    out = {
        "train_ann": coco["train_ann"],
        "train_images": coco["train_images"],
        "val_ann": coco["val_ann"],
        "val_images": coco["val_images"],
        "test_ann": coco["val_ann"],
        "test_images": coco["val_images"],
    }
    if coco.get("tune_images"):
        out["train_ann"] = path("carved", config, part="train")
        out["val_ann"] = path("carved", config, part="tune")
        out["val_images"] = coco["train_images"]
    return out


def carve_source(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the ``carve_split`` job reads when a COCO tune split is carved, else None."""
    data = config["data"]
    if data["source"] != "coco" or not data["coco"].get("tune_images"):
        return None
    coco = data["coco"]
    size, seed = int(coco["tune_images"]), int(coco.get("tune_seed", 0))
    return {"ann": coco["train_ann"], "size": size, "seed": seed}


#: Config keys only the workflow reads (which jobs exist, where, on how many threads): a
#: ``--config`` override of them need not reach the config file every job reads.
WORKFLOW_ONLY: tuple[str, ...] = ("seeds", "baseline_per_seed", "results", "threads", "extends")


def config_drift(
    config: Mapping[str, Any], file_config: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys where Snakemake's ``config`` differs from the file the jobs read.

    ``--config key=value`` and a second ``--configfile`` change Snakemake's config, but
    every job gets one config file (``--config {params.config}``): a difference outside
    :data:`WORKFLOW_ONLY` means the jobs would run another configuration than the DAG
    was planned with (and its parameters digested for).
    """
    out = []
    for key in sorted(set(config) | set(file_config), key=str):
        name = f"{prefix}{key}"
        if not prefix and key in WORKFLOW_ONLY:
            continue
        a, b = config.get(key), file_config.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_drift(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out


def seeds_of(config: Mapping[str, Any]) -> list[int]:
    """The seeds every prune -> fine-tune -> evaluate chain runs with: ``seeds`` as a count
    (``seed``, ``seed`` + 1, ...) or a list; by default the config's ``seed`` alone."""
    value = config.get("seeds")
    if value is None:
        return [int(config["seed"])]
    if isinstance(value, int):
        return [int(config["seed"]) + i for i in range(value)]
    if isinstance(value, str):
        value = value.split(",")
    seeds = [int(v) for v in value]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config field 'seeds': repeated seed in {seeds}")
    return seeds


def baseline_seed(config: Mapping[str, Any], seed: int | str) -> int:
    """The baseline a chain of ``seed`` prunes: its own with ``baseline_per_seed``, else
    the one baseline of the config's ``seed`` that every chain shares."""
    return int(seed) if config.get("baseline_per_seed") else int(config["seed"])


def baseline_seeds(config: Mapping[str, Any]) -> list[int]:
    """The seeds of the baselines the run trains."""
    return list(dict.fromkeys(baseline_seed(config, s) for s in seeds_of(config)))


def planned_methods(config: Mapping[str, Any]) -> list[str]:
    """``prune.methods`` in config order, each ``scratch-<m>`` preceded by its source
    ``<m>`` when the list lacks it (its architecture, and the row it is compared with)."""
    out: list[str] = []
    for m in config["prune"]["methods"]:
        src = scratch_source(m)
        for name in (src, m) if src else (m,):
            if name not in out:
                out.append(name)
    return out


def pruned_targets(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(method, pct) pairs in config order."""
    return [(m, pct(t)) for m in planned_methods(config) for t in config["prune"]["flops_targets"]]


def finetune_rule(config: Mapping[str, Any], method: str) -> str:
    """``finetune_distill`` for a method fine-tuned with distillation from the unpruned
    teacher (its own rule, logs and benchmarks), else ``finetune``."""
    return "finetune_distill" if distillation(config, method) else "finetune"


def regularizers(config: Mapping[str, Any]) -> list[str]:
    """The sparse-training stages the configured methods need, in config order."""
    out: list[str] = []
    for m in planned_methods(config):
        reg = sparsity_of(m)
        if reg and reg not in out:
            out.append(reg)
    return out


def prune_source(config: Mapping[str, Any], method: str, pc: str, seed: int | str) -> str:
    """The checkpoint the ``seed`` chain of ``method`` prunes: the sparse-trained one, the
    pruned one of its source for a ``scratch-<m>`` control, or the baseline."""
    src = scratch_source(method)
    if src:
        return path("pruned", config, method=src, pct=pc, seed=seed)
    reg = sparsity_of(method)
    if reg:
        return path("sparse", config, regularizer=reg, seed=seed)
    return path("baseline", config, seed=baseline_seed(config, seed))


def metrics_files(config: Mapping[str, Any]) -> list[str]:
    """Every metrics JSON the report reads: the baselines, then each chain of each seed."""
    base = [path("metrics_baseline", config, seed=s) for s in baseline_seeds(config)]
    return base + [
        path("metrics", config, method=m, pct=p, seed=s)
        for m, p in pruned_targets(config)
        for s in seeds_of(config)
    ]


def seed_metrics_files(config: Mapping[str, Any], seed: int | str) -> list[str]:
    """The metrics records the timing step of ``seed`` reads: the baseline its chains
    prune, then its chains (so every speed-up is a ratio within one timing job)."""
    base = path("metrics_baseline", config, seed=baseline_seed(config, seed))
    return [base] + [
        path("metrics", config, method=m, pct=p, seed=seed) for m, p in pruned_targets(config)
    ]


def latency_files(config: Mapping[str, Any]) -> list[str]:
    """The timing records the report reads: one per seed, under the report's name (a
    method-family config over the same results times its own checkpoints)."""
    name = config["report"]["name"]
    return [path("latency", config, name=name, seed=s) for s in seeds_of(config)]


def summary_files(config: Mapping[str, Any]) -> list[str]:
    """Every pruning summary the report reads."""
    return [
        path("prune_summary", config, method=m, pct=p, seed=s)
        for m, p in pruned_targets(config)
        for s in seeds_of(config)
    ]


def export_files(config: Mapping[str, Any]) -> dict[str, str]:
    """``evaluate.export: onnx``: every evaluated checkpoint (baselines, fine-tuned chains)
    -> the .onnx beside it (its report: ``.onnx.json``); else none."""
    if _get(config, "evaluate.export") != "onnx":
        return {}
    if config["data"]["source"] in ("synth_cls", "imagefolder"):
        raise ValueError("config field 'evaluate.export': onnx export covers detectors only")
    ckpts = [path("baseline", config, seed=s) for s in baseline_seeds(config)] + [
        path("finetuned", config, method=m, pct=p, seed=s)
        for m, p in pruned_targets(config)
        for s in seeds_of(config)
    ]
    return {c: c.removesuffix(".pt") + ".onnx" for c in ckpts}


def report_outputs(config: Mapping[str, Any]) -> dict[str, str]:
    """The files of the report stage."""
    name = config["report"]["name"]
    out = {ext: path("table", config, name=name, ext=ext) for ext in ("csv", "md", "tex")}
    out["summary"] = path("summary", config, name=name)
    out["map_vs_flops"] = path("figure", config, name=name, kind="map_vs_flops")
    out["channels"] = path("figure", config, name=name, kind="channels_per_layer")
    return out


def table_outputs(config: Mapping[str, Any], table: str, profile: str) -> dict[str, str]:
    """The files of one paper table of a table run."""
    name = f"{profile}/{table}"
    out = {ext: path("table", config, name=name, ext=ext) for ext in ("csv", "md", "tex", "json")}
    out["figure"] = path("figure", config, name=name, kind="vs_flops")
    return out


def claims_outputs(config: Mapping[str, Any], profile: str) -> dict[str, str]:
    """The claims ledger of a table run (every claim of config/claims.yaml)."""
    return {ext: path("table", config, name=f"{profile}/claims", ext=ext) for ext in ("csv", "md")}


def section_digest(
    config: Mapping[str, Any],
    stage: str,
    method: str | None = None,
    regularizer: str | None = None,
    seed: int | str | None = None,
) -> str:
    """The config values a stage reads, as canonical JSON (a Snakemake rerun trigger).
    ``seed``: the job's own seed (its ``{seed}`` wildcard), which replaces the config's,
    so the seed-0 jobs of a run with ``seeds: 3`` are those of the one-seed run."""
    keys = _stage_keys(config, stage, method, regularizer)
    values = {k: _get(config, k) for k in keys}
    for section, skip in NOT_READ.items():
        if isinstance(values.get(section), Mapping):
            values[section] = {k: v for k, v in values[section].items() if k not in skip}
    if seed is not None and "seed" in values:
        values["seed"] = int(seed)
    return json.dumps(values, sort_keys=True)


@dataclass
class Stage:
    """One DVC stage: the formatted command and its files."""

    name: str
    cmd: str
    deps: list[str]
    outs: list[str]
    params: list[str]
    metrics: list[str] = field(default_factory=list)
    plots: list[dict[str, Any]] = field(default_factory=list)


def stage_threads(config: Mapping[str, Any], stage: str) -> int:
    """Torch threads of a stage's jobs: the config's ``threads``, one number or one per stage."""
    th = config["threads"]
    return int(th if isinstance(th, int) else th[stage])


def _cmd(stage: str, **parts: Any) -> str:
    ns = {k: SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in parts.items()}
    return COMMANDS[stage].format(**ns)


def _data_stages(config: Mapping[str, Any], p: dict[str, Any]) -> list[Stage]:
    """Dataset (synthetic, or the carved COCO tune split) and its per-split checks."""
    data = dataset_paths(config)
    stages: list[Stage] = []
    if config["data"]["source"] == "synth":
        d = path("synth", config)
        log = path("log", config, stage="synth")
        cmd = _cmd("synth", params={**p, "out_dir": d}, log=log)
        stages.append(Stage("synth", cmd, ["src/detprune/data/synth.py"], [d], ["data"]))
    carve = carve_source(config)
    if carve:
        out = {"train": data["train_ann"], "tune": data["val_ann"]}
        params = {"size": carve["size"], "seed": carve["seed"]}
        log = path("log", config, stage="carve")
        cmd = _cmd("carve", input={"ann": carve["ann"]}, params=params, output=out, log=log)
        stages.append(Stage("carve_split", cmd, [carve["ann"]], list(out.values()), ["data"]))
    for split in SPLITS:
        ann, img, rep = (
            data[f"{split}_ann"],
            data[f"{split}_images"],
            path("check", config, split=split),
        )
        log = path("log", config, stage=f"check_{split}")
        cmd = _cmd("check", input={"ann": ann, "images": img}, output={"report": rep}, log=log)
        stages.append(Stage(f"check_{split}", cmd, [ann, img], [rep], []))
    return stages


def _pretrain_stage(config: Mapping[str, Any], p: dict[str, Any]) -> list[Stage]:
    """The pretrain_backbone stage of ``pretrain.init: pretrained`` (else none)."""
    files = pretrain_files(config)
    if files is None:
        return []
    cmd = _cmd(
        "pretrain",
        params=p,
        output={"model": files["model"], "meta": files["meta"]},
        threads=stage_threads(config, "train"),
        log=files["log"],
    )
    name = f"pretrain_{files['model'].rsplit('/', 1)[1].removesuffix('.pt')}"
    deps = ["src/detprune/train/pretrain.py", "src/detprune/data/classification.py"]
    outs = [files["model"], files["meta"]]
    return [Stage(name, cmd, deps, outs, stage_params(config, "pretrain"))]


def imported_weights(config: Mapping[str, Any]) -> str | None:
    """``model.checkpoint``: the file the baseline is imported from (None: trained)."""
    return config["model"].get("checkpoint") or None


def _baseline_source(config: Mapping[str, Any], p: dict[str, Any], seed: int) -> Stage:
    """The stage writing the baseline of ``seed``: trained, or imported from a file."""
    data = dataset_paths(config)
    train_in = {"train_ann": data["train_ann"], "train_images": data["train_images"]}
    init = backbone_init.init_file(config)
    checks = [path("check", config, split=s) for s in SPLITS]
    base, tag = path("baseline", config, seed=seed), f"seed{seed}"
    weights = imported_weights(config)
    if weights:
        cmd = _cmd(
            "import",
            params=p,
            input={"weights": weights, "train_ann": data["train_ann"]},
            output={"model": base},
            wildcards={"seed": seed},
            log=path("log", config, stage=f"import/{tag}"),
        )
        deps = [weights, data["train_ann"], *checks]
        return Stage(f"import_{tag}", cmd, deps, [base], stage_params(config, "import"))
    cmd = _cmd(
        "train",
        params=p,
        input=train_in,
        output={"model": base},
        wildcards={"seed": seed},
        threads=stage_threads(config, "train"),
        log=path("log", config, stage=f"train/{tag}"),
    )
    deps = [*train_in.values(), *checks, *([init] if init else [])]
    return Stage(f"train_{tag}", cmd, deps, [base], stage_params(config, "train"))


def _baseline_stages(config: Mapping[str, Any], p: dict[str, Any], seed: int) -> list[Stage]:
    """Training (or import) and evaluation of the baseline of ``seed``."""
    data = dataset_paths(config)
    test_in = {"test_ann": data["test_ann"], "test_images": data["test_images"]}
    base, mb = path("baseline", config, seed=seed), path("metrics_baseline", config, seed=seed)
    w, tag = {"seed": seed}, f"seed{seed}"
    evaluate = _cmd(
        "evaluate",
        params={**p, "method": "baseline", "flops": 1.0},
        input={"model": base, **test_in},
        output={"metrics": mb},
        wildcards=w,
        threads=stage_threads(config, "evaluate"),
        log=path("log", config, stage=f"evaluate_baseline/{tag}"),
    )
    return [
        _baseline_source(config, p, seed),
        Stage(
            f"evaluate_baseline_{tag}",
            evaluate,
            [base, *test_in.values()],
            [mb],
            stage_params(config, "evaluate"),
        ),
    ]


def _sparse_stage(config: Mapping[str, Any], p: dict[str, Any], reg: str, seed: int) -> Stage:
    data = dataset_paths(config)
    train_in = {"train_ann": data["train_ann"], "train_images": data["train_images"]}
    base = path("baseline", config, seed=baseline_seed(config, seed))
    sp = path("sparse", config, regularizer=reg, seed=seed)
    cmd = _cmd(
        "sparse",
        params={**p, "regularizer": reg},
        input={"model": base, **train_in},
        output={"model": sp},
        wildcards={"seed": seed},
        threads=stage_threads(config, "sparse"),
        log=path("log", config, stage=f"sparse/{reg}_seed{seed}"),
    )
    params = stage_params(config, "sparse", regularizer=reg)
    return Stage(f"sparse_{reg}_seed{seed}", cmd, [base, *train_in.values()], [sp], params)


def _chain_stages(
    config: Mapping[str, Any], p: dict[str, Any], method: str, pc: str, seed: int
) -> list[Stage]:
    """prune -> fine-tune -> evaluate of one method, FLOPs target and seed."""
    data = dataset_paths(config)
    train_in = {"train_ann": data["train_ann"], "train_images": data["train_images"]}
    test_in = {"test_ann": data["test_ann"], "test_images": data["test_images"]}
    at = {"method": method, "pct": pc, "seed": seed}
    source, base = (
        prune_source(config, method, pc, seed),
        path("baseline", config, seed=baseline_seed(config, seed)),
    )
    pr, sm = path("pruned", config, **at), path("prune_summary", config, **at)
    ft, mt = path("finetuned", config, **at), path("metrics", config, **at)
    mp, w = {**p, "method": method, "flops": float(pc) / 100}, {"seed": seed}
    tag = f"{method}_flops{pc}_seed{seed}"
    ft_rule = finetune_rule(config, method)

    def cmd(stage: str, folder: str, **parts: Any) -> str:
        log = path("log", config, stage=f"{folder}/{method}_flops{pc}/seed{seed}")
        return _cmd(
            stage, params=mp, wildcards=w, threads=stage_threads(config, stage), log=log, **parts
        )

    prune = cmd(
        "prune", "prune", input={"model": source, **train_in}, output={"model": pr, "summary": sm}
    )
    tune = cmd(
        "finetune", ft_rule, input={"model": pr, "teacher": base, **train_in}, output={"model": ft}
    )
    evaluate = cmd("evaluate", "evaluate", input={"model": ft, **test_in}, output={"metrics": mt})
    return [
        Stage(
            f"prune_{tag}",
            prune,
            [source, *train_in.values()],
            [pr, sm],
            stage_params(config, "prune", method=method),
        ),
        Stage(
            f"{ft_rule}_{tag}",
            tune,
            [pr, base, *train_in.values()],
            [ft],
            stage_params(config, "finetune", method=method),
        ),
        Stage(
            f"evaluate_{tag}",
            evaluate,
            [ft, *test_in.values()],
            [mt],
            stage_params(config, "evaluate"),
        ),
    ]


def _report_stage(config: Mapping[str, Any], p: dict[str, Any]) -> Stage:
    rep = report_outputs(config)
    metrics, summaries = metrics_files(config), summary_files(config)
    latency = latency_files(config)
    name = config["report"]["name"]
    dirs = {
        "tables_dir": f"{config['results']}/tables",
        "figures_dir": f"{config['results']}/figures",
    }
    cmd = _cmd(
        "report",
        params={**p, **dirs},
        input={
            "metrics": " ".join(metrics),
            "latency": " ".join(latency),
            "summaries": " ".join(summaries),
        },
        log=path("log", config, stage="report"),
    )
    plot = {"x": "flops_kept (%)", "y": "mAP", "title": f"{name}: mAP vs FLOPs (test split)"}
    return Stage(
        "report",
        cmd,
        [*metrics, *latency, *summaries],
        [rep["md"], rep["tex"], rep["map_vs_flops"], rep["channels"]],
        stage_params(config, "report"),
        metrics=[rep["summary"]],
        plots=[{rep["csv"]: plot}],
    )


def _latency_stage(config: Mapping[str, Any], p: dict[str, Any], seed: int) -> Stage:
    """The timing step of one seed: every checkpoint its metrics records name."""
    data = dataset_paths(config)
    test_in = {"test_ann": data["test_ann"], "test_images": data["test_images"]}
    metrics = seed_metrics_files(config, seed)
    base = path("baseline", config, seed=baseline_seed(config, seed))
    ckpts = [base] + [
        path("finetuned", config, method=m, pct=pc, seed=seed) for m, pc in pruned_targets(config)
    ]
    out = path("latency", config, name=config["report"]["name"], seed=seed)
    cmd = _cmd(
        "latency",
        params=p,
        input={"metrics": " ".join(metrics), **test_in},
        output={"latency": out},
        log=path("log", config, stage=f"time_latency/{config['report']['name']}/seed{seed}"),
    )
    deps = [*metrics, *ckpts, *test_in.values()]
    return Stage(f"time_latency_seed{seed}", cmd, deps, [out], stage_params(config, "latency"))


def _export_stages(config: Mapping[str, Any]) -> list[Stage]:
    """One ``export_onnx`` stage per evaluated checkpoint (``evaluate.export: onnx``)."""
    data = dataset_paths(config)
    test_in = {"test_ann": data["test_ann"], "test_images": data["test_images"]}
    root = f"{config['results']}/models/"
    stages = []
    for ckpt, onnx in export_files(config).items():
        stem = ckpt.removeprefix(root).removesuffix(".pt")
        outs = [onnx, f"{onnx}.json"]
        cmd = _cmd(
            "export",
            input={"model": ckpt, **test_in},
            output={"onnx": onnx},
            threads=stage_threads(config, "evaluate"),
            log=path("log", config, stage=f"export_onnx/{stem}"),
        )
        name = "export_onnx_" + stem.replace("/", "_").replace("finetuned_", "")
        params = stage_params(config, "export")
        stages.append(Stage(name, cmd, [ckpt, *test_in.values()], outs, params))
    return stages


def dvc_stages(config: Mapping[str, Any], config_path: str) -> list[Stage]:
    """The DAG as DVC stages, from the same templates and paths as the Snakefile."""
    p = {"config": config_path}
    stages = _data_stages(config, p) + _pretrain_stage(config, p)
    for seed in baseline_seeds(config):
        stages += _baseline_stages(config, p, seed)
    for seed in seeds_of(config):
        stages += [_sparse_stage(config, p, reg, seed) for reg in regularizers(config)]
    for method, pc in pruned_targets(config):
        for seed in seeds_of(config):
            stages += _chain_stages(config, p, method, pc, seed)
    stages += [_latency_stage(config, p, seed) for seed in seeds_of(config)]
    return [*stages, *_export_stages(config), _report_stage(config, p)]


def dvc_yaml(config: Mapping[str, Any], config_path: str) -> str:
    """The text of dvc.yaml for ``config``."""
    out: dict[str, Any] = {"stages": {}}
    for st in dvc_stages(config, config_path):
        entry: dict[str, Any] = {"cmd": st.cmd, "deps": list(st.deps)}
        if st.params:
            entry["params"] = [{config_path: list(st.params)}]
        entry["outs"] = [{o: {"cache": False}} for o in st.outs]
        if st.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in st.metrics]
        if st.plots:
            entry["plots"] = [{k: {"cache": False, **v}} for pl in st.plots for k, v in pl.items()]
        if not entry["deps"]:
            del entry["deps"]
        out["stages"][st.name] = entry
    header = (
        f"# GENERATED by `detprune dvc --config {config_path}` from the same config and\n"
        "# command templates as the Snakefile. Do not edit: regenerate.\n"
    )
    return header + yaml.safe_dump(out, sort_keys=False, width=1000)
