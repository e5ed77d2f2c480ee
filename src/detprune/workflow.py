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

PATHS = {
    "synth": "{results}/data/synth",
    "synth_cls": "{results}/data/synth_cls",
    "check": "{results}/data/check_{split}.json",
    "baseline": "{results}/models/baseline.pt",
    "sparse": "{results}/models/sparse/{regularizer}.pt",
    "pruned": "{results}/models/pruned/{method}/flops{pct}.pt",
    "prune_summary": "{results}/models/pruned/{method}/flops{pct}.json",
    "finetuned": "{results}/models/finetuned/{method}/flops{pct}.pt",
    "metrics_baseline": "{results}/metrics/baseline.json",
    "metrics": "{results}/metrics/{method}/flops{pct}.json",
    "table": "{results}/tables/{name}.{ext}",
    "summary": "{results}/tables/{name}_summary.json",
    "figure": "{results}/figures/{name}_{kind}.png",
    "log": "{results}/logs/{stage}.log",
    "benchmark": "{results}/benchmarks/{stage}.tsv",
}

# Which config keys each stage reads (DVC ``params:``, Snakemake's rerun trigger). Keys
# of one method or regularizer are added by :func:`stage_params`, so a run that only adds
# methods reuses every cached job of the methods it shares.
PARAMS = {
    "synth": ["data"],
    "check": ["data"],
    "train": ["seed", "model", "train"],
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
    "evaluate": ["evaluate"],
    "report": ["report"],
}


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
    """The config keys a stage reads; per-method and per-regularizer keys when present."""
    keys = [k for k in PARAMS[stage] if _get(config, k) is not None]
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
    "check": (
        "detprune data check --ann {input.ann} --images {input.images} "
        "--out {output.report} --log {log}"
    ),
    "train": (
        "detprune train --config {params.config} --train-ann {input.train_ann} "
        "--train-images {input.train_images} --out {output.model} "
        "--threads {threads} --log {log}"
    ),
    "sparse": (
        "detprune sparse --config {params.config} --regularizer {params.regularizer} "
        "--checkpoint {input.model} --train-ann {input.train_ann} "
        "--train-images {input.train_images} --out {output.model} "
        "--threads {threads} --log {log}"
    ),
    "prune": (
        "detprune prune --config {params.config} --method {params.method} "
        "--flops {params.flops} --checkpoint {input.model} "
        "--train-ann {input.train_ann} --train-images {input.train_images} "
        "--out {output.model} --summary {output.summary} --threads {threads} --log {log}"
    ),
    "finetune": (
        "detprune finetune --config {params.config} --method {params.method} "
        "--checkpoint {input.model} --teacher {input.teacher} --train-ann {input.train_ann} "
        "--train-images {input.train_images} --out {output.model} "
        "--threads {threads} --log {log}"
    ),
    "evaluate": (
        "detprune evaluate --config {params.config} --method {params.method} "
        "--flops {params.flops} --checkpoint {input.model} --val-ann {input.val_ann} "
        "--val-images {input.val_images} --out {output.metrics} "
        "--threads {threads} --log {log}"
    ),
    "table": (
        "detprune table --table {wildcards.table} --profile {wildcards.profile} "
        "--results {params.results} --seeds {params.seeds} --reported {input.reported} "
        "--tables-dir {params.tables_dir} --figures-dir {params.figures_dir} --log {log}"
    ),
    "report": (
        "detprune report --config {params.config} --metrics {input.metrics} "
        "--prune-summaries {input.summaries} --tables-dir {params.tables_dir} "
        "--figures-dir {params.figures_dir} --log {log}"
    ),
}


def pct(target: float) -> str:
    """FLOPs share as the wildcard value used in paths: 0.5 -> '50', 0.125 -> '12.5'."""
    value = round(target * 100, 4)
    return f"{value:g}"


def path(key: str, config: Mapping[str, Any], **fields: Any) -> str:
    """A concrete path of kind ``key``."""
    return PATHS[key].format(results=config["results"], **fields)


def dataset_paths(config: Mapping[str, Any]) -> dict[str, str]:
    """Annotation files and image folders of the train and val splits."""
    source = config["data"]["source"]
    if source == "synth":
        root = path("synth", config)
        return {
            "train_ann": f"{root}/instances_train.json",
            "train_images": f"{root}/train",
            "val_ann": f"{root}/instances_val.json",
            "val_images": f"{root}/val",
        }
    if source in ("synth_cls", "imagefolder"):  # an ImageFolder split is its own "annotation"
        root = path("synth_cls", config)
        folders = (
            {"train": f"{root}/train", "val": f"{root}/val"}
            if source == "synth_cls"
            else config["data"]["imagefolder"]
        )
        return {f"{s}_{k}": folders[s] for s in ("train", "val") for k in ("ann", "images")}
    return dict(config["data"]["coco"])


def pruned_targets(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(method, pct) pairs in config order."""
    return [
        (m, pct(t)) for m in config["prune"]["methods"] for t in config["prune"]["flops_targets"]
    ]


def sparsity_of(method: str) -> str | None:
    """The sparse-training regularizer ``method`` prunes after, if any."""
    from detprune.pruning.methods import get_method

    return get_method(method).sparsity


def distillation(config: Mapping[str, Any], method: str) -> str | None:
    """The distillation ``method`` is fine-tuned with: its fine-tuning schedule's
    ``distill`` (default merged with ``finetune.methods.<m>``), else the registry's
    (``sad`` for gcp-sad, ``lcp`` for lcp), else None. The fine-tuning stage uses this too."""
    from detprune.config import finetune_schedule
    from detprune.pruning.methods import get_method

    return finetune_schedule(config, method).get("distill", get_method(method).distill)


def finetune_rule(config: Mapping[str, Any], method: str) -> str:
    """``finetune_distill`` for a method fine-tuned with distillation from the unpruned
    teacher (its own rule, logs and benchmarks), else ``finetune``."""
    return "finetune_distill" if distillation(config, method) else "finetune"


def regularizers(config: Mapping[str, Any]) -> list[str]:
    """The sparse-training stages the configured methods need, in config order."""
    out: list[str] = []
    for m in config["prune"]["methods"]:
        reg = sparsity_of(m)
        if reg and reg not in out:
            out.append(reg)
    return out


def prune_source(config: Mapping[str, Any], method: str) -> str:
    """The checkpoint ``method`` prunes: the sparse-trained one, or the baseline."""
    reg = sparsity_of(method)
    return path("sparse", config, regularizer=reg) if reg else path("baseline", config)


def metrics_files(config: Mapping[str, Any]) -> list[str]:
    """Every metrics JSON the report reads, baseline first."""
    return [path("metrics_baseline", config)] + [
        path("metrics", config, method=m, pct=p) for m, p in pruned_targets(config)
    ]


def summary_files(config: Mapping[str, Any]) -> list[str]:
    """Every pruning summary the report reads."""
    return [path("prune_summary", config, method=m, pct=p) for m, p in pruned_targets(config)]


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


def section_digest(
    config: Mapping[str, Any], stage: str, method: str | None = None, regularizer: str | None = None
) -> str:
    """The config values a stage reads, as canonical JSON (a Snakemake rerun trigger)."""
    keys = stage_params(config, stage, method, regularizer)
    return json.dumps({k: _get(config, k) for k in keys}, sort_keys=True)


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


def dvc_stages(config: Mapping[str, Any], config_path: str) -> list[Stage]:
    """The DAG as DVC stages, from the same templates and paths as the Snakefile."""
    data = dataset_paths(config)
    p = {"config": config_path}
    stages: list[Stage] = []
    if config["data"]["source"] == "synth":
        d = path("synth", config)
        stages.append(
            Stage(
                "synth",
                _cmd("synth", params={**p, "out_dir": d}, log=path("log", config, stage="synth")),
                ["src/detprune/data/synth.py"],
                [d],
                stage_params(config, "synth"),
            )
        )
    for split in ("train", "val"):
        ann, img, rep = (
            data[f"{split}_ann"],
            data[f"{split}_images"],
            path("check", config, split=split),
        )
        stages.append(
            Stage(
                f"check_{split}",
                _cmd(
                    "check",
                    input={"ann": ann, "images": img},
                    output={"report": rep},
                    log=path("log", config, stage=f"check_{split}"),
                ),
                [ann, img],
                [rep],
                [],
            )
        )
    train_in = {"train_ann": data["train_ann"], "train_images": data["train_images"]}
    checks = [path("check", config, split=s) for s in ("train", "val")]
    base = path("baseline", config)
    stages.append(
        Stage(
            "train",
            _cmd(
                "train",
                params=p,
                input=train_in,
                output={"model": base},
                threads=stage_threads(config, "train"),
                log=path("log", config, stage="train"),
            ),
            [*train_in.values(), *checks],
            [base],
            stage_params(config, "train"),
        )
    )
    val_in = {"val_ann": data["val_ann"], "val_images": data["val_images"]}
    mb = path("metrics_baseline", config)
    stages.append(
        Stage(
            "evaluate_baseline",
            _cmd(
                "evaluate",
                params={**p, "method": "baseline", "flops": 1.0},
                input={"model": base, **val_in},
                output={"metrics": mb},
                threads=stage_threads(config, "evaluate"),
                log=path("log", config, stage="evaluate_baseline"),
            ),
            [base, *val_in.values()],
            [mb],
            stage_params(config, "evaluate"),
        )
    )
    for reg in regularizers(config):
        sp = path("sparse", config, regularizer=reg)
        stages.append(
            Stage(
                f"sparse_{reg}",
                _cmd(
                    "sparse",
                    params={**p, "regularizer": reg},
                    input={"model": base, **train_in},
                    output={"model": sp},
                    threads=stage_threads(config, "sparse"),
                    log=path("log", config, stage=f"sparse/{reg}"),
                ),
                [base, *train_in.values()],
                [sp],
                stage_params(config, "sparse", regularizer=reg),
            )
        )
    for method, pc in pruned_targets(config):
        source = prune_source(config, method)
        tag = f"{method}_flops{pc}"
        flops = float(pc) / 100
        pr, sm = (
            path("pruned", config, method=method, pct=pc),
            path("prune_summary", config, method=method, pct=pc),
        )
        ft, mt = (
            path("finetuned", config, method=method, pct=pc),
            path("metrics", config, method=method, pct=pc),
        )
        mp = {**p, "method": method, "flops": flops}
        stages.append(
            Stage(
                f"prune_{tag}",
                _cmd(
                    "prune",
                    params=mp,
                    input={"model": source, **train_in},
                    output={"model": pr, "summary": sm},
                    threads=stage_threads(config, "prune"),
                    log=path("log", config, stage=f"prune/{tag}"),
                ),
                [source, *train_in.values()],
                [pr, sm],
                stage_params(config, "prune", method=method),
            )
        )
        ft_dir = finetune_rule(config, method)
        stages.append(
            Stage(
                f"{ft_dir}_{tag}",
                _cmd(
                    "finetune",
                    params=mp,
                    input={"model": pr, "teacher": base, **train_in},
                    output={"model": ft},
                    threads=stage_threads(config, "finetune"),
                    log=path("log", config, stage=f"{ft_dir}/{tag}"),
                ),
                [pr, base, *train_in.values()],
                [ft],
                stage_params(config, "finetune", method=method),
            )
        )
        stages.append(
            Stage(
                f"evaluate_{tag}",
                _cmd(
                    "evaluate",
                    params=mp,
                    input={"model": ft, **val_in},
                    output={"metrics": mt},
                    threads=stage_threads(config, "evaluate"),
                    log=path("log", config, stage=f"evaluate/{tag}"),
                ),
                [ft, *val_in.values()],
                [mt],
                stage_params(config, "evaluate"),
            )
        )
    rep = report_outputs(config)
    metrics, summaries = metrics_files(config), summary_files(config)
    name = config["report"]["name"]
    stages.append(
        Stage(
            "report",
            _cmd(
                "report",
                params={
                    **p,
                    "tables_dir": f"{config['results']}/tables",
                    "figures_dir": f"{config['results']}/figures",
                },
                input={"metrics": " ".join(metrics), "summaries": " ".join(summaries)},
                log=path("log", config, stage="report"),
            ),
            [*metrics, *summaries],
            [rep["md"], rep["tex"], rep["map_vs_flops"], rep["channels"]],
            stage_params(config, "report"),
            metrics=[rep["summary"]],
            plots=[
                {rep["csv"]: {"x": "flops_kept (%)", "y": "mAP", "title": f"{name}: mAP vs FLOPs"}}
            ],
        )
    )
    return stages


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
