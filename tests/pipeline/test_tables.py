"""Paper tables through Snakemake: a tiny table run with two seeds, and the paper profile's
plan of every table on a cluster (dry run on a COCO-format fixture)."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from detprune import experiments as E
from detprune import workflow as W
from tests.conftest import ROOT, TINY, write_config
from tests.helpers import BIN, ENV, project, run

SLURM_ENV = {**ENV, "SBATCH_PARTITION": "debug", "SBATCH_ACCOUNT": "detprune"}
GPU_RULES = {"train_baseline", "sparse_train", "prune", "finetune", "finetune_distill"}


def _table_project(dest: Path, cfg: dict) -> Path:
    proj = project(ROOT, dest, cfg)
    for part in ("config/tables", "config/profiles"):
        shutil.copytree(ROOT / part, proj / part)
    for name in ("reported.yaml", "claims.yaml"):
        shutil.copy(ROOT / "config" / name, proj / "config" / name)
    return proj


def _default_config() -> dict:
    from detprune.config import load_config

    return load_config(ROOT / "config/config.yaml")


@pytest.fixture(scope="module")
def tiny_table_run(tmp_path_factory):
    from detprune.config import deep_merge

    cfg = deep_merge(_default_config(), TINY)
    proj = _table_project(tmp_path_factory.mktemp("tables") / "proj", cfg)
    # a tiny profile `mini` and a two-row table on the default detector
    write_config(
        {
            "extends": "config/config.yaml",
            "experiment": {
                "model_schedule_keys": [],
                "synth_for": {"detection": {"source": "synth", "synth": TINY["data"]["synth"]}},
            },
        },
        proj / "config/profiles/mini.yaml",
    )
    table = {
        "title": "tiny",
        "paper": "miep",
        "metric": "mAP",
        "experiments": {
            "frcnn": {
                "label": "Faster R-CNN",
                "paper": {"model": "fasterrcnn_r50_fpn", "dataset": "coco"},
                "mini": {"model": "fasterrcnn_narrow_fpn"},
            }
        },
        "rows": [
            {"experiment": "frcnn", "method": "l1", "flops": [0.1],
             "reported": "miep/coco/fasterrcnn_r50/groupfisher@{pct}"},
        ],
    }  # fmt: skip
    (proj / "config/tables/tiny.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
    cmd = [str(BIN / "snakemake"), "--cores", "2", "--config", "table=tiny", "profile=mini"]
    run([*cmd, "seeds=2"], proj, timeout=900)
    again = run([*cmd, "seeds=2", "-n"], proj)
    return proj, again.stdout + again.stderr


def test_a_table_run_reports_mean_and_std_of_its_two_seeds(tiny_table_run):
    proj, _ = tiny_table_run
    df = pd.read_csv(proj / "results/tables/mini/tiny.csv")
    assert list(df["method"]) == ["l1"]
    aps, bases = [], []
    for seed in (0, 1):
        exp = proj / f"results/experiments/mini/synth/fasterrcnn_narrow_fpn/seed{seed}"
        rec = json.loads((exp / f"metrics/l1/flops10/seed{seed}.json").read_text())
        assert rec["split"] == "test"
        assert rec["seed"] == seed
        aps.append(100 * rec["metrics"]["AP"])
        base = json.loads((exp / f"metrics/baseline/seed{seed}.json").read_text())
        bases.append(100 * base["metrics"]["AP"])
        # every experiment records its config beside its results
        assert yaml.safe_load((exp / "config.yaml").read_text())["seed"] == seed
    l1 = df.iloc[0]
    assert l1["seeds"] == 2
    assert l1["repro pruned"] == pytest.approx(statistics.fmean(aps), abs=0.051)
    assert l1["repro std"] == pytest.approx(statistics.stdev(aps), abs=0.051)
    assert l1["repro base"] == pytest.approx(statistics.fmean(bases), abs=0.051)
    assert (l1["paper base"], l1["paper pruned"]) == (37.4, 32.3)
    assert abs(l1["flops_kept (%)"] - 10) <= 0.2
    assert (proj / "results/figures/mini/tiny_vs_flops.png").stat().st_size > 10_000
    md = (proj / "results/tables/mini/tiny.md").read_text()
    assert "Δrepro − Δpaper" in md and "| l1 " in md
    # the run's claims ledger: no claim names the tiny table
    claims = pd.read_csv(proj / "results/tables/mini/claims.csv")
    assert len(claims) > 0 and set(claims["verdict"]) == {"not run"}


def test_a_table_run_is_cached(tiny_table_run):
    _, dry = tiny_table_run
    assert "Nothing to be done" in dry


def _planned(text: str) -> dict[str, list[dict[str, str]]]:
    """rule -> the resources of each of its jobs, from `snakemake -n` output."""
    out: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in text.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif rule and line.strip().startswith("resources:"):
            items = line.split("resources:", 1)[1].split(", ")
            out.setdefault(rule, []).append(dict(i.strip().split("=", 1) for i in items))
            rule = None
    return out


def _fixture_datasets(root: Path) -> dict[str, str]:
    """A small COCO-format fixture laid out as the paper profile expects."""
    from tests.helpers import synth

    data = synth(root / "synth")
    coco, voc, imagenet = root / "coco", root / "voc", root / "imagenet"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(data / f"instances_{split}.json",
                    coco / f"annotations/instances_{split}2017.json")  # fmt: skip
        shutil.copytree(data / split, coco / f"{split}2017")
    voc.mkdir()
    shutil.copy(data / "instances_train.json", voc / "voc0712_trainval.json")
    shutil.copy(data / "instances_val.json", voc / "voc07_test.json")
    shutil.copytree(data / "train", voc / "JPEGImages")
    for split in ("train", "val"):
        (imagenet / split / "n01440764").mkdir(parents=True)
    return {"coco_root": str(coco), "voc_root": str(voc), "imagenet_root": str(imagenet)}


def test_paper_profile_plans_every_table_on_the_cluster(tmp_path):
    proj = _table_project(tmp_path / "proj", _default_config())
    roots = _fixture_datasets(tmp_path / "data")
    res = run(
        [str(BIN / "snakemake"), "-n", "--workflow-profile", "workflow/profiles/slurm",
         "--cores", "64", "--config", "table=all", "profile=paper",
         *(f"{k}={v}" for k, v in roots.items())],
        proj,
        env=SLURM_ENV,
    )  # fmt: skip
    plan = _planned(res.stdout + res.stderr)
    # the experiments and jobs the table specs ask for
    import os

    cwd = os.getcwd()
    os.chdir(proj)
    try:
        tables = [E.load_table(n) for n in E.table_names()]
        exps = E.plan({"results": "results", **roots}, tables, "paper")
    finally:
        os.chdir(cwd)
    jobs = {(r, m, f) for r, e in exps.items() for m, f in e.targets}
    assert len(exps) == 9  # GFL, SSD, Faster R-CNN, FSAF, RetinaNet (COCO), 2 VOC, R50, YOLOv4
    assert len(plan["train_baseline"]) == len(exps)
    # 59 (method, FLOPs) jobs; the mini profile shares COCO and VOC experiments: 55
    assert len(plan["prune"]) == len(jobs) == 59
    # fine-tuning with distillation (gcp-sad's SAD, lcp's loss) is its own rule
    distilled = {
        (r, m, f)
        for r, e in exps.items()
        for m, f in e.targets
        if W.finetune_rule(e.config, m) == "finetune_distill"
    }
    assert {m for _, m, _ in distilled} == {"gcp-sad", "lcp"}
    assert len(plan["finetune_distill"]) == len(distilled)
    assert len(plan["finetune"]) + len(distilled) == 59
    assert len(plan["paper_table"]) == 9
    assert len(plan["claims_ledger"]) == 1  # one ledger of every table's claims
    assert len(plan["sparse_train"]) == 4  # depgraph on GFL and SSD, slim and gcp on YOLOv4
    for rule in GPU_RULES:
        for job in plan[rule]:
            assert job["gpu"] == "1", (rule, job)
    for job in plan["paper_table"] + plan["claims_ledger"] + plan["check_data"]:
        assert job["gpu"] == "0"
    assert "synth_data" not in plan  # the paper profile reads the user's datasets
    # the papers' schedules, written beside each experiment's results
    gfl = yaml.safe_load(
        (proj / "results/experiments/paper/coco/gfl_r50_fpn/seed0/config.yaml").read_text()
    )
    assert (gfl["train"]["epochs"], gfl["train"]["milestones"]) == (12, [8, 11])
    train_ann = f"{roots['coco_root']}/annotations/instances_train2017.json"
    assert gfl["data"]["coco"]["train_ann"] == train_ann
    ssd = yaml.safe_load(
        (proj / "results/experiments/paper/coco/ssd300_r50/seed0/config.yaml").read_text()
    )
    assert (ssd["train"]["epochs"], ssd["train"]["batch_size"]) == (65, 32)
