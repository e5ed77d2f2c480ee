"""The tiny config through the real DAG: Snakemake, then DVC, with identical results."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_config

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _project(root: Path, dest: Path, cfg: dict) -> Path:
    """A copy of the workflow with the tiny config as its default config."""
    dest.mkdir(parents=True)
    shutil.copy(root / "Snakefile", dest / "Snakefile")
    shutil.copytree(root / "workflow", dest / "workflow")
    (dest / "src/detprune/data").mkdir(parents=True)
    shutil.copy(root / "src/detprune/data/synth.py", dest / "src/detprune/data/synth.py")
    write_config(cfg, dest / "config" / "config.yaml")
    return dest


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


@pytest.fixture(scope="module")
def snakemake_run(root, tmp_path_factory, request):
    from detprune.config import deep_merge, load_config
    from tests.conftest import TINY

    cfg = deep_merge(load_config(root / "config" / "config.yaml"), TINY)
    proj = _project(root, tmp_path_factory.mktemp("smk") / "proj", cfg)
    _run([str(BIN / "snakemake"), "--cores", "2"], proj)
    return proj, cfg


def test_snakemake_runs_the_whole_dag(snakemake_run):
    proj, _ = snakemake_run
    res = proj / "results"
    table = pd.read_csv(res / "tables" / "tiny.csv")
    assert list(table["method"]) == ["baseline", "l1", "slim"]
    for row in (1, 2):
        assert table.loc[row, "flops_target (%)"] == pytest.approx(50)
        assert abs(table.loc[row, "flops_kept (%)"] - 50) <= 1.0  # within 2% of the target
        assert table.loc[row, "params (M)"] < table.loc[0, "params (M)"]
    assert (res / "models" / "sparse" / "bn_l1" / "seed0.pt").is_file()  # slim's own stage
    # intervals against the baseline and against the reference (l1) at the same target
    assert table.loc[1, "mark"] == "reference" and table.loc[2, "vs ref"] == "l1"
    for row in (1, 2):
        lo, hi = table.loc[row, "ΔmAP lo"], table.loc[row, "ΔmAP hi"]
        assert lo <= table.loc[row, "ΔmAP"] <= hi
    assert table.loc[2, "mark"] in ("better", "worse", "within noise")
    assert "±" in (res / "tables" / "tiny.md").read_text()
    for name in ("tiny.md", "tiny.tex", "tiny_summary.json"):
        assert (res / "tables" / name).stat().st_size > 0
    for name in ("tiny_map_vs_flops.png", "tiny_channels_per_layer.png"):
        assert (res / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((res / "metrics" / "l1" / "flops50" / "seed0.json").read_text())
    assert metrics["split"] == "test" and metrics["data"]["ann"].endswith("instances_test.json")
    boot = metrics["bootstrap"]
    assert boot["images"] == 12 and len(boot["AP"]) == boot["resamples"] == 1000
    summary = json.loads((res / "tables" / "tiny_summary.json").read_text())
    assert summary["split"] == "test" and set(summary["rows"]) == {
        "baseline@1",
        "l1@0.5",
        "slim@0.5",
    }
    assert set(metrics["metrics"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
    assert metrics["cost"]["input_size"] == [64, 64]
    assert metrics["provenance"]["versions"]["torch"].startswith("2.14.1")
    # the timing step: every checkpoint timed in PyTorch and ONNX Runtime, in one record
    timing = json.loads((res / "metrics" / "latency" / "tiny" / "seed0.json").read_text())
    assert [r["method"] for r in timing["rows"]] == ["baseline", "l1", "slim"]
    assert all(r["torch"]["runs"] == 2 and r["onnxruntime"]["runs"] == 2 for r in timing["rows"])
    assert table.loc[0, "speed-up"] == 1.0 and table.loc[0, "ORT speed-up"] == 1.0
    assert (table["ORT (ms)"] > 0).all() and (table["latency IQR (ms)"] >= 0).all()
    assert "ORT speed-up" in (res / "tables" / "tiny.md").read_text()
    # every rule wrote its log and benchmark
    assert (res / "logs" / "train" / "seed0.log").stat().st_size > 0
    assert (res / "benchmarks" / "train" / "seed0.tsv").is_file()


def test_rerun_has_nothing_to_do(snakemake_run):
    proj, _ = snakemake_run
    out = _run([str(BIN / "snakemake"), "--cores", "2", "-n"], proj)
    assert "Nothing to be done" in out.stdout + out.stderr


def test_adding_a_method_reruns_only_its_jobs(snakemake_run):
    proj, cfg = snakemake_run
    more = {**cfg, "prune": {**cfg["prune"], "methods": [*cfg["prune"]["methods"], "uniform"]}}
    write_config(more, proj / "config" / "config.yaml")
    try:
        out = _run([str(BIN / "snakemake"), "--cores", "2", "-n"], proj)
    finally:
        write_config(cfg, proj / "config" / "config.yaml")
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout, flags=re.M))
    # the baseline and the other methods' rows are cached: uniform's rows, the timing step
    # (every checkpoint of the seed again, so speed-ups stay ratios within one job) and
    # the table
    assert jobs == {
        "prune": "1",
        "finetune": "1",
        "evaluate_pruned": "1",
        "time_latency": "1",
        "make_report": "1",
        "all": "1",
        "total": "6",
    }


def test_more_seeds_add_only_the_new_seeds_chains(snakemake_run):
    """`--config seeds=2` reuses every job of the one-seed run (the shared baseline
    too) and plans seed 1's sparse training and chains, then the report."""
    proj, _ = snakemake_run
    out = _run([str(BIN / "snakemake"), "--cores", "2", "-n", "--config", "seeds=2"], proj)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout, flags=re.M))
    assert jobs == {
        "sparse_train": "1",
        "prune": "2",
        "finetune": "2",
        "evaluate_pruned": "2",
        "time_latency": "1",
        "make_report": "1",
        "all": "1",
        "total": "10",
    }
    assert "flops50/seed1.pt" in out.stdout and "flops50/seed2" not in out.stdout


def test_dvc_repro_runs_the_same_stages_with_identical_metrics(
    root, snakemake_run, tmp_path_factory
):
    smk_proj, cfg = snakemake_run
    proj = _project(root, tmp_path_factory.mktemp("dvc") / "proj", cfg)
    # a git checkout with the repository's .gitignore, as a user's clone (DVC refuses to run
    # when git ignores dvc.lock)
    shutil.copy(root / ".gitignore", proj / ".gitignore")
    _run(["git", "init", "-q"], proj)
    _run([str(BIN / "dvc"), "init", "-q"], proj)
    _run([str(BIN / "detprune"), "dvc", "--config", "config/config.yaml"], proj)
    _run([str(BIN / "dvc"), "repro"], proj)
    status = _run([str(BIN / "dvc"), "status"], proj)
    assert "up to date" in status.stdout
    for rel in (
        "metrics/baseline/seed0.json",
        "metrics/l1/flops50/seed0.json",
        "metrics/slim/flops50/seed0.json",
    ):
        a = json.loads((smk_proj / "results" / rel).read_text())
        b = json.loads((proj / "results" / rel).read_text())
        assert a["metrics"] == b["metrics"], rel  # same seed, same CPU: identical metrics
        assert a["cost"]["macs"] == b["cost"]["macs"]
        assert a["checkpoint"]["sha256"] == b["checkpoint"]["sha256"], rel  # bitwise weights
        assert a["bootstrap"]["AP"] == b["bootstrap"]["AP"], rel
    shown = _run([str(BIN / "dvc"), "metrics", "show"], proj)
    assert "baseline@1" in shown.stdout


def test_another_config_file_reuses_the_runs_jobs(snakemake_run):
    """A method-family file (like config/miep.yaml) over the same results folder: the
    command text names the config file through a placeholder, so Snakemake's code and params
    triggers see the same jobs, and only the new method's jobs and the report are planned."""
    proj, cfg = snakemake_run
    family = proj / "config" / "family.yaml"
    family.write_text(
        "extends: config/config.yaml\nprune:\n  methods: [l1, uniform]\nreport:\n  name: family\n"
    )
    out = _run([str(BIN / "snakemake"), "--cores", "2", "-n", "--configfile", str(family)], proj)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout, flags=re.M))
    assert jobs == {
        "prune": "1",
        "finetune": "1",
        "evaluate_pruned": "1",
        "time_latency": "1",
        "make_report": "1",
        "all": "1",
        "total": "6",
    }
    planned = _run(
        [str(BIN / "snakemake"), "--cores", "2", "-n", "-p", "--configfile", str(family)], proj
    ).stdout
    assert "detprune prune --config config/family.yaml --method uniform" in planned
