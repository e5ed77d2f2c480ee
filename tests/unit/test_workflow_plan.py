"""One source of truth: dvc.yaml is generated from the config and runs Snakemake's commands."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from detprune.config import load_config
from detprune.workflow import dvc_yaml

BIN = Path(sys.executable).parent


def test_committed_dvc_yaml_is_not_stale(root):
    config = load_config(root / "config" / "config.yaml")
    assert (root / "dvc.yaml").read_text() == dvc_yaml(config, "config/config.yaml"), (
        "dvc.yaml is stale: run `detprune dvc --config config/config.yaml`"
    )


def test_dvc_runs_exactly_the_commands_snakemake_plans(root):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    planned = sorted(
        line.removeprefix("Shell command: ")
        for line in out.splitlines()
        if line.startswith("Shell command: detprune")
    )
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert planned == sorted(s["cmd"] for s in stages.values())
    # every DAG step is there: data, checks, train, baseline eval, 3x(prune, finetune, eval), report
    cfg = load_config(root / "config" / "config.yaml")
    n = len(cfg["prune"]["methods"]) * len(cfg["prune"]["flops_targets"])
    sparse = {"depgraph", "slim"} & set(cfg["prune"]["methods"])
    assert len(planned) == 1 + 2 + 1 + 1 + len(sparse) + 3 * n + 1
    assert "metrics" in stages["report"] and "plots" in stages["report"]


def test_dvc_check_flags_a_stale_file(root, tmp_path: Path):
    stale = tmp_path / "dvc.yaml"
    stale.write_text("stages: {}\n")
    res = subprocess.run(
        [
            str(BIN / "detprune"),
            "dvc",
            "--config",
            str(root / "config" / "config.yaml"),
            "--out",
            str(stale),
            "--check",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "stale" in res.stderr


def test_distilling_methods_get_their_own_rule_and_dvc_stage(root, monkeypatch):
    from detprune.workflow import finetune_rule

    monkeypatch.chdir(root)
    cfg = load_config("config/gcp.yaml")
    assert [finetune_rule(cfg, m) for m in ("gcp", "gcp-sad", "lcp", "l1")] == [
        "finetune",
        "finetune_distill",
        "finetune_distill",
        "finetune",
    ]
    over = {**cfg, "finetune": {**cfg["finetune"], "methods": {"l1": {"distill": "sad"}}}}
    assert finetune_rule(over, "l1") == "finetune_distill"
    over["finetune"]["methods"] = {"gcp-sad": {"distill": None}}
    assert finetune_rule(over, "gcp-sad") == "finetune"

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2"]
        + ["--configfile", "config/gcp.yaml"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    jobs = out.split("\nrule ")
    distilled = sorted(
        j.split("method=")[1].split(",")[0] for j in jobs if j.startswith("finetune_distill:")
    )
    plain = {j.split("method=")[1].split(",")[0] for j in jobs if j.startswith("finetune:")}
    assert distilled == ["gcp-sad"] * 3  # SAD: its own rule, one job per FLOPs target
    assert plain == {"l1", "slim", "gcp"}
    stages = yaml.safe_load(dvc_yaml(cfg, "config/gcp.yaml"))["stages"]
    assert sorted(s for s in stages if s.startswith("finetune_distill_")) == [
        "finetune_distill_gcp-sad_flops10",
        "finetune_distill_gcp-sad_flops25",
        "finetune_distill_gcp-sad_flops50",
    ]
    planned = {
        line.removeprefix("Shell command: ")
        for line in out.splitlines()
        if line.startswith("Shell command: detprune finetune")
    }
    assert planned == {s["cmd"] for n, s in stages.items() if n.startswith("finetune")}
