"""The workflow on a real SLURM: a single-node cluster from Debian's packages
(scripts/slurm-local.sh), the tiny config submitted through
`snakemake --workflow-profile workflow/profiles/slurm`, every job checked in `sacct`, the
results compared with a local run. Needs root and apt (CI: Debian 12 as root).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from tests.helpers import BIN, ENV, project, run

SCRIPT = ROOT / "scripts" / "slurm-local.sh"
SLURM_ENV = {**ENV, "SBATCH_PARTITION": "debug", "SBATCH_ACCOUNT": "detprune"}
GPU_RULES = {"train_baseline", "sparse_train", "prune", "finetune"}
EVAL_RULES = {"evaluate_baseline", "evaluate_pruned"}
TIMING_RULES = {"time_latency"}  # its CPUs: the config's evaluate.latency.threads
CPU_RULES = {"synth_data", "check_data", "make_report"}


def _tiny(**over: dict) -> dict:
    from detprune.config import deep_merge, load_config, validate

    cfg = deep_merge(deep_merge(load_config(ROOT / "config" / "config.yaml"), TINY), over)
    validate(cfg, "tiny")
    return cfg


def _planned_resources(text: str) -> dict[str, list[dict[str, str]]]:
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


def test_dry_run_plans_gpus_for_training_pruning_and_finetuning_only(tmp_path):
    cfg = _tiny(threads=3, prune={"methods": ["l1", "slim"]})  # slim: a sparse_train job
    proj = project(ROOT, tmp_path / "proj", cfg)
    # a dry run caps threads at --cores (1 unless given); a SLURM run does not cap them
    res = run(
        [str(BIN / "snakemake"), "-n", "--workflow-profile", "workflow/profiles/slurm",
         "--cores", "64"],
        proj,
        env=SLURM_ENV,
    )  # fmt: skip
    plan = _planned_resources(res.stdout + res.stderr)
    assert set(plan) >= GPU_RULES | EVAL_RULES | CPU_RULES | TIMING_RULES
    (timing,) = plan["time_latency"]
    threads = str(cfg["evaluate"]["latency"]["threads"])
    assert (timing["gpu"], timing["cpus_per_task"]) == ("1", threads)
    for rule in GPU_RULES | EVAL_RULES:
        for job in plan[rule]:
            assert job["gpu"] == "1", (rule, job)
            assert job["cpus_per_task"] == "3", (rule, job)  # follows threads
            assert (job["slurm_partition"], job["slurm_account"]) == ("debug", "detprune")
    for rule in CPU_RULES:
        for job in plan[rule]:
            assert job["gpu"] == "0", (rule, job)
            assert job["cpus_per_task"] == "1", (rule, job)
    for rule in ("train_baseline", "sparse_train", "finetune"):
        assert plan[rule][0]["slurm_extra"] == "--signal=TERM@300"
    assert int(plan["train_baseline"][0]["mem_mb"]) == 32000
    assert int(plan["train_baseline"][0]["runtime"]) == 1440
    assert len(plan["finetune"]) == 2 and len(plan["sparse_train"]) == 1


@pytest.fixture(scope="module")
def slurm():
    """Install (idempotent), start the cluster; stop every daemon afterwards."""
    t0 = time.monotonic()
    run(["bash", str(SCRIPT), "install"], ROOT, timeout=900)
    t1 = time.monotonic()
    run(["bash", str(SCRIPT), "start"], ROOT, timeout=300)
    times = {"install_s": round(t1 - t0, 1), "start_s": round(time.monotonic() - t1, 1)}
    yield times
    run(["bash", str(SCRIPT), "stop"], ROOT, timeout=300)
    for pidfile in ("/run/slurm/slurmd.pid", "/run/slurm/slurmctld.pid",
                    "/run/slurm/slurmdbd.pid", "/run/mysqld/mysqld.pid",
                    "/run/munge/munged.pid"):  # fmt: skip
        assert not Path(pidfile).exists(), pidfile
    # no config left that points SLURM clients (and Snakemake's plugin) at a dead controller
    assert not Path("/etc/slurm/slurm.conf").exists()


def _sacct(name: str) -> list[dict[str, str]]:
    fields = ["JobIDRaw", "JobName", "State", "ExitCode", "Comment", "AllocTRES"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "--name", name, "-o", ",".join(f + "%200" for f in fields)],
        capture_output=True, text=True, check=True, env=SLURM_ENV,
    ).stdout  # fmt: skip
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()]


def _squeue() -> list[tuple[str, str, str]]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%k|%T"], capture_output=True, text=True, env=SLURM_ENV
    ).stdout
    return [tuple(line.split("|")) for line in out.splitlines()]


def _preempt_training(proj: Path, smk: subprocess.Popen) -> str:
    """Once the train_baseline job's `detprune train` is up (its log exists: the signal
    handlers are in place), send SIGTERM to the job's steps, as `--signal=TERM@300` does
    before the time limit. Returns the SLURM job id."""
    logf = proj / "results" / "logs" / "train" / "seed0.log"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and smk.poll() is None:
        # the plugin's comment: rule_<rule>_wildcards_<values> (train_baseline's: results)
        running = [
            i
            for i, c, st in _squeue()
            if c.split("_wildcards_")[0] == "rule_train_baseline" and st == "RUNNING"
        ]
        if running and logf.exists():
            subprocess.run(["scancel", "--signal=TERM", running[0]], check=True, env=SLURM_ENV)
            return running[0]
        time.sleep(0.1)
    raise AssertionError("the train_baseline job never ran")


def test_tiny_dag_through_sbatch_equals_the_local_run(slurm, tmp_path):
    """The whole tiny DAG through sbatch, the training job preempted once on the way: it
    checkpoints, exits 75, Snakemake resubmits it, it resumes. Every job ends COMPLETED
    in sacct and the metrics and weights equal an uninterrupted local run's."""
    from detprune import workflow as W

    # one method that prunes after sparse training: every kind of rule, fewest jobs
    cfg = _tiny(prune={"methods": ["slim"]})
    local = project(ROOT, tmp_path / "local", copy.deepcopy(cfg))
    proj = project(ROOT, tmp_path / "slurm", cfg)
    # the local reference runs meanwhile: the SLURM run mostly waits on status checks
    ref = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "1"], cwd=local, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    t0 = time.monotonic()
    with open(tmp_path / "slurm.log", "w") as out:
        # SIGTERM alone does not stop Snakemake while jobs are out: -k kills it
        smk = subprocess.Popen(
            ["timeout", "-k", "10", "1200", str(BIN / "snakemake"),
             "--workflow-profile", "workflow/profiles/slurm",
             "--slurm-init-seconds-before-status-checks", "1"],
            cwd=proj, env=SLURM_ENV, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        preempted = _preempt_training(proj, smk)
        rc = smk.wait(timeout=1260)
    wall = time.monotonic() - t0
    log = (tmp_path / "slurm.log").read_text()
    assert rc == 0, log[-5000:]
    assert ref.wait(timeout=900) == 0
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", log)
    jobs = _sacct(run_id)
    print(json.dumps({**slurm, "sbatch_jobs": len(jobs), "workflow_wall_s": round(wall, 1)}))

    # every Snakemake job went through sbatch (plus the resubmitted training job) ...
    n_jobs = 6 + len(W.regularizers(cfg)) + 3 * len(W.pruned_targets(cfg)) + 2
    # synth, 3 checks, train, evaluate, sparse, prune, finetune, eval, timing, report
    assert n_jobs == 12
    assert len(submitted) == n_jobs + 1
    assert sorted(j["JobIDRaw"] for j in jobs) == sorted(submitted)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for j in sorted(jobs, key=lambda j: int(j["JobIDRaw"])):
        rule = j["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        by_rule.setdefault(rule, []).append(j)
    assert set(by_rule) == GPU_RULES | EVAL_RULES | CPU_RULES | TIMING_RULES
    # ... and SLURM accounted it COMPLETED, but the attempt the test preempted
    first, _ = by_rule["train_baseline"]
    assert first["JobIDRaw"] == preempted and first["State"] == "FAILED", first
    rest = [j for j in jobs if j is not first]
    assert [j["State"] for j in rest] == ["COMPLETED"] * n_jobs, jobs
    assert all(j["ExitCode"] == "0:0" for j in rest)
    for name, runs in by_rule.items():  # the profile's GPU requests reached the scheduler
        has_gpu = "gres/gpu=1" in runs[-1]["AllocTRES"]
        assert has_gpu == (name not in CPU_RULES), (name, runs[-1]["AllocTRES"])
    # the second attempt continued from the first one's resume point
    assert "resumed from" in (proj / "results" / "logs" / "train" / "seed0.log").read_text()

    # the same numbers and the same weights as on this machine without SLURM
    for rel in W.metrics_files(cfg):
        a = json.loads((local / rel).read_text())
        b = json.loads((proj / rel).read_text())
        assert a["metrics"] == b["metrics"], rel
        assert a["checkpoint"]["sha256"] == b["checkpoint"]["sha256"], rel
