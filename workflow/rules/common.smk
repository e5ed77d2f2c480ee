# Shared helpers: paths and command templates come from detprune.workflow, the same
# source dvc.yaml is generated from.
#
# Every rule's files live under `{results}`, one folder per experiment. The default run
# is one experiment (the config's `results`). With `--config table=<name> profile=<p>`
# the experiments are those the paper tables need (detprune.experiments): each gets its
# own config file, written into its folder when the workflow loads.
import os
import re
from pathlib import Path
from types import SimpleNamespace

from detprune import backbone_init as BI
from detprune import experiments as E
from detprune import smoke as SMOKE
from detprune import workflow as W
from detprune.config import check_names, load_config

# What the schema cannot check (the Snakefile validated it): every method, regularizer,
# distillation and model the config names exists, and their options are keys they
# declare, of the declared types (prune.options.<m>, sparse.regularizers.<r>,
# finetune.methods.<m>.distill_options, model.kwargs). No torch is imported.
check_names(config, " + ".join(map(str, workflow.overwrite_configfiles or ["config/config.yaml"])))


def _experiments():
    if SMOKE.flag(config):  # `--config smoke=true` gives the string "true"
        config["smoke"] = True
    else:
        config.pop("smoke", None)
    if "table" not in config:
        if "profile" in config or config.get("smoke"):
            raise ValueError("config field 'profile' or 'smoke' is set but 'table' is not")
        path = os.path.relpath((workflow.overwrite_configfiles or ["config/config.yaml"])[-1])
        drift = W.config_drift(config, load_config(path))
        if drift:
            raise ValueError(
                f"{path}: every job reads this file, but `--config` or another `--configfile` "
                f"changed {drift} for the DAG only; put the changes in one config file "
                "(`extends:` another) and pass it with --configfile"
            )
        return {config["results"]: E.Experiment(config["results"], config)}, path, None
    if "profile" not in config:
        raise ValueError("config field 'table' needs 'profile' (mini or paper)")
    if SMOKE.check(config):  # its own results folder, never mixed with real results
        config["results"] = SMOKE.results_root(config["results"])
    tables = [E.load_table(name) for name in E.selected_tables(config["table"])]
    plan = E.plan(config, tables, config["profile"])
    for exp in plan.values():
        E.write_config(exp)
    return plan, "{wildcards.results}/config.yaml", tables


# EXPERIMENTS: results folder -> Experiment; CONFIG_ARG: the config file the CLI gets (the
# run's file, or "{wildcards.results}/config.yaml" in a table run); TABLES: the table specs
# of a table run (None for the default run)
EXPERIMENTS, CONFIG_ARG, TABLES = _experiments()
TABLE_SPECS = {t.name: t for t in TABLES or []}


# Pretrained backbones (pretrain.init: pretrained): file -> the experiment whose config
# the pretrain_backbone job reads (the first that plans it; all share its backbone family)
PRETRAIN = W.pretrain_jobs({r: e.config for r, e in EXPERIMENTS.items()})


def get_pretrain_config(wildcards):
    """The config file of the pretrain_backbone job: one experiment's that plans it."""
    results = PRETRAIN[f"{wildcards.pdir}/{wildcards.backbone}.pt"]
    return Path(CONFIG_ARG.format(wildcards=SimpleNamespace(results=results)))


def get_backbone_init(wildcards):
    """The file the baseline's backbone starts from (the pretrained backbone, or the
    local file the config names), as input `backbone`; none from scratch."""
    init = BI.init_file(X(wildcards).config)
    return {"backbone": init} if init else {}


def get_config_path(wildcards):
    """`params.config`: a Path, which Snakemake leaves out of its params rerun trigger (it
    records only builtin values), so a run with another config file that asks for the same
    job (same values of the keys it reads, the `digest` param) reuses it."""
    return Path(CONFIG_ARG.format(wildcards=wildcards))


CMD = W.COMMANDS

# Methods fine-tuned with distillation from the unpruned teacher (gcp-sad's SAD, lcp's
# auxiliary loss): rule finetune_distill, the others rule finetune; one regex each.
DISTILLED = sorted(
    {
        m
        for e in EXPERIMENTS.values()
        for m in ([t[0] for t in e.targets] or e.config["prune"]["methods"])
        if W.finetune_rule(e.config, m) == "finetune_distill"
    }
)
_DISTILLED_RE = "|".join(re.escape(m) for m in DISTILLED) or "(?!)"
METHOD_DISTILLED = rf"(?:{_DISTILLED_RE})"
# not a distilled name (a whole name: the lookahead stops at the wildcard's end)
METHOD_PLAIN = rf"(?!(?:{_DISTILLED_RE})(?![a-z0-9_-]))[a-z][a-z0-9_-]*"


wildcard_constraints:
    results="|".join(re.escape(r) for r in EXPERIMENTS),
    method=r"[a-z][a-z0-9_-]*",
    pct=r"[0-9]+(\.[0-9]+)?",
    split=r"train|val|test",
    seed=r"[0-9]+",
    regularizer=r"[a-z][a-z0-9_]*",
    pdir="|".join(sorted({re.escape(os.path.dirname(f)) for f in PRETRAIN})) or "(?!)",
    backbone="|".join(sorted({re.escape(Path(f).stem) for f in PRETRAIN})) or "(?!)",


def X(wildcards):
    """The experiment a job belongs to (the default run's for the report)."""
    return EXPERIMENTS[dict(wildcards).get("results", config["results"])]


def P(key, **fields):
    """A path pattern of kind `key` (wildcards left as {name})."""
    names = ("results", "method", "pct", "split", "regularizer", "stage", "seed", "part")
    return W.PATHS[key].format(**{**{n: f"{{{n}}}" for n in names}, **fields})


def log_path(stage):
    return P("log", stage=stage)


def bench_path(stage):
    return P("benchmark", stage=stage)


def get_params(stage):
    """Config values the stage reads: a change re-runs it (rerun trigger `params`)."""

    def digest(wildcards):
        w = dict(wildcards)
        return W.section_digest(
            X(wildcards).config, stage, w.get("method"), w.get("regularizer"), w.get("seed")
        )

    return digest


def _data(wildcards):
    return W.dataset_paths(X(wildcards).config)


def get_train_data(wildcards):
    d = _data(wildcards)
    return {"train_ann": d["train_ann"], "train_images": d["train_images"]}


def get_test_data(wildcards):
    """The reported (held-out) split: every evaluation job scores on it."""
    d = _data(wildcards)
    return {"test_ann": d["test_ann"], "test_images": d["test_images"]}


def get_seed_metrics(wildcards):
    """The metrics records the timing step of a seed reads (baseline first)."""
    return W.seed_metrics_files(X(wildcards).config, wildcards.seed)


def timing_threads(wildcards):
    """On this machine every core Snakemake has, so no other job runs beside the timing
    job; on a cluster the config's latency threads (SLURM binds the job to its CPUs). A
    dry run, which cannot tell the two apart, shows the latter."""
    if workflow.non_local_exec_or_dryrun:
        return X(wildcards).config["evaluate"]["latency"]["threads"]
    return workflow.cores


def get_split_data(wildcards):
    d = _data(wildcards)
    return {"ann": d[f"{wildcards.split}_ann"], "images": d[f"{wildcards.split}_images"]}


def get_flops(wildcards):
    return float(wildcards.pct) / 100


def out_dir(name):
    """A params function: the folder of output ``name`` (for --out-dir style options)."""
    return lambda wildcards, output: os.path.dirname(output[name])


def _results_re(results):
    return "|".join(re.escape(r) for r in results) or "(?!)"


# Experiments whose baseline is imported from `model.checkpoint` (rule import_baseline)
# and those that train it (rule train_baseline); both write P("baseline").
IMPORTED_RESULTS = _results_re(r for r, e in EXPERIMENTS.items() if W.imported_weights(e.config))
TRAINED_RESULTS = _results_re(r for r, e in EXPERIMENTS.items() if not W.imported_weights(e.config))


def get_weights(wildcards):
    """The weights file the baseline is imported from (`model.checkpoint`)."""
    return W.imported_weights(X(wildcards).config)


def get_prune_source(wildcards):
    """The sparse-trained checkpoint when the method has a sparse stage, else the baseline."""
    return W.prune_source(X(wildcards).config, wildcards.method, wildcards.pct, wildcards.seed)


def get_teacher(wildcards):
    """The baseline a chain prunes (its teacher for distillation)."""
    cfg = X(wildcards).config
    return W.path("baseline", cfg, seed=W.baseline_seed(cfg, wildcards.seed))


def get_carve_params(wildcards):
    return W.carve_source(X(wildcards).config)


def get_carve_input(wildcards):
    return W.carve_source(X(wildcards).config)["ann"]


def get_final_outputs():
    if TABLES is None:
        return list(W.report_outputs(config).values()) + list(W.export_files(config).values())
    profile = config["profile"]
    tables = [f for t in TABLES for f in W.table_outputs(config, t.name, profile).values()]
    return tables + list(W.claims_outputs(config, profile).values())


def get_table_metrics(wildcards):
    """The metrics records a paper table reads (every seed, every experiment)."""
    spec = TABLE_SPECS[wildcards.table]
    return E.table_files(config, spec, wildcards.profile, get_seeds(wildcards).split(","))


def get_seeds(wildcards):
    """The seeds of a table run, comma separated (--config seeds=..., else the table's)."""
    spec = TABLE_SPECS[wildcards.table]
    return ",".join(map(str, E.parse_seeds(config.get("seeds"), spec.seeds)))


def get_results_root(wildcards):
    """The results root of a table run (the main config's `results`)."""
    return config["results"]


# The claims ledger of a table run: config/claims.yaml, validated when the workflow loads
# (against every table spec), read against the run's tables with their seeds.
if TABLES is not None:
    from detprune.report import ledger as L
    from detprune.report.claims import load_all

    CLAIMS, CLAIM_SPECS = load_all(E.CLAIMS, E.REPORTED)
    CLAIMS_RUN = {t.name: E.parse_seeds(config.get("seeds"), t.seeds) for t in TABLES}


def get_claims_metrics(wildcards):
    """The metrics records the ledger reads: both rows of each claim of the run's tables."""
    return L.ledger_files(CLAIMS, CLAIM_SPECS, config, wildcards.profile, CLAIMS_RUN)


def get_claims_tables(wildcards):
    """The run's tables with their seeds, `name:0,1,2` each (the ledger's --tables)."""
    return " ".join(f"{t}:{','.join(map(str, s))}" for t, s in CLAIMS_RUN.items())
