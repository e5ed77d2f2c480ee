# Shared helpers: paths and command templates come from detprune.workflow, the same
# source dvc.yaml is generated from.
import os

from detprune import workflow as W

# The file the CLI stages read: the last --configfile given, else the default.
CONFIG_PATH = os.path.relpath((workflow.overwrite_configfiles or ["config/config.yaml"])[-1])
THREADS = config["threads"]
DATA = W.dataset_paths(config)


wildcard_constraints:
    method=r"[a-z][a-z0-9_-]*",
    pct=r"[0-9]+(\.[0-9]+)?",
    split=r"train|val",


def P(key, **fields):
    """A path pattern of kind `key` (wildcards left as {name})."""
    wildcards = {name: f"{{{name}}}" for name in ("method", "pct", "split")}
    return W.PATHS[key].format(results=config["results"], **{**wildcards, **fields})


def log_path(stage):
    return W.path("log", config, stage=stage)


def bench_path(stage):
    return W.path("benchmark", config, stage=stage)


def get_params(stage):
    """Config values the stage reads: a change re-runs it (rerun trigger `params`)."""

    def digest(wildcards):
        w = dict(wildcards)
        return W.section_digest(config, stage, w.get("method"), w.get("regularizer"))

    return digest


def get_train_data(wildcards):
    return {"train_ann": DATA["train_ann"], "train_images": DATA["train_images"]}


def get_val_data(wildcards):
    return {"val_ann": DATA["val_ann"], "val_images": DATA["val_images"]}


def get_split_data(wildcards):
    return {"ann": DATA[f"{wildcards.split}_ann"], "images": DATA[f"{wildcards.split}_images"]}


def get_flops(wildcards):
    return float(wildcards.pct) / 100


def out_dir(name):
    """A params function: the folder of output ``name`` (for --out-dir style options)."""
    return lambda wildcards, output: os.path.dirname(output[name])


def get_final_outputs():
    return list(W.report_outputs(config).values())


def get_prune_source(wildcards):
    """The sparse-trained checkpoint when the method has a sparse stage, else the baseline."""
    return W.prune_source(config, wildcards.method)
