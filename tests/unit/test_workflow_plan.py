"""One source of truth: dvc.yaml is generated from the config and runs Snakemake's commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    # every DAG step is there: data, checks, train, baseline eval, 3x(prune, finetune, eval),
    # the timing step, report
    cfg = load_config(root / "config" / "config.yaml")
    n = len(cfg["prune"]["methods"]) * len(cfg["prune"]["flops_targets"])
    sparse = {"depgraph", "slim"} & set(cfg["prune"]["methods"])
    assert len(planned) == 1 + 3 + 1 + 1 + len(sparse) + 3 * n + 1 + 1
    assert "metrics" in stages["report"] and "plots" in stages["report"]
    # every evaluation scores the held-out test split, never val
    evaluations = [c for c in planned if c.startswith("detprune evaluate")]
    assert len(evaluations) == 1 + n
    assert all("instances_test.json" in c and "--split test" in c for c in evaluations)
    assert not any("instances_val.json" in c for c in planned if "data check" not in c)
    (timing,) = [c for c in planned if c.startswith("detprune time-latency")]
    timed = timing.split("--metrics ")[1].split(" --ann")[0].split()
    # it reads every evaluation of the seed, the baseline's first
    assert timed[0] == "results/metrics/baseline/seed0.json"
    assert sorted(timed) == sorted(c.split("--out ")[1].split()[0] for c in evaluations)


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
    assert sorted(s for s in stages if s.startswith("finetune_distill_")) == [  # seed 0
        "finetune_distill_gcp-sad_flops10_seed0",
        "finetune_distill_gcp-sad_flops25_seed0",
        "finetune_distill_gcp-sad_flops50_seed0",
    ]
    planned = {
        line.removeprefix("Shell command: ")
        for line in out.splitlines()
        if line.startswith("Shell command: detprune finetune")
    }
    assert planned == {s["cmd"] for n, s in stages.items() if n.startswith("finetune")}


def test_more_seeds_add_only_their_own_chains(root, monkeypatch):
    """`--config seeds=3` keeps every job of the one-seed run (same paths, same params
    digest) and adds the chains of seeds 1 and 2, sharing the one baseline."""
    from detprune.workflow import metrics_files, section_digest, summary_files

    monkeypatch.chdir(root)
    one = load_config("config/config.yaml")
    three = {**one, "seeds": 3}
    n = len(one["prune"]["methods"]) * len(one["prune"]["flops_targets"])
    assert len(metrics_files(one)) == 1 + n and len(metrics_files(three)) == 1 + 3 * n
    assert set(metrics_files(one)) < set(metrics_files(three))
    assert set(summary_files(one)) < set(summary_files(three))
    assert [f for f in metrics_files(three) if "baseline" in f] == [
        "results/metrics/baseline/seed0.json"
    ]
    for stage, method in (("prune", "l1"), ("finetune", "l1"), ("sparse", None)):
        reg = "bn_l1" if stage == "sparse" else None
        assert section_digest(one, stage, method, reg, "0") == section_digest(
            three, stage, method, reg, "0"
        )
        assert section_digest(three, stage, method, reg, "1") != section_digest(
            three, stage, method, reg, "0"
        )
    per_seed = {**three, "baseline_per_seed": True}
    assert [f for f in metrics_files(per_seed) if "baseline" in f] == [
        f"results/metrics/baseline/seed{k}.json" for k in range(3)
    ]
    stages = yaml.safe_load(dvc_yaml(three, "config/config.yaml"))["stages"]
    assert "prune_l1_flops10_seed2" in stages and "train_seed0" in stages
    assert "train_seed1" not in stages
    assert "--seed 2" in stages["prune_l1_flops10_seed2"]["cmd"]
    assert "results/models/baseline/seed0.pt" in stages["prune_l1_flops10_seed2"]["deps"]


def test_config_drift_names_the_keys_the_jobs_would_not_see():
    from detprune.workflow import config_drift

    file_cfg = {"seed": 0, "seeds": 1, "results": "results", "train": {"epochs": 12, "lr": 0.04}}
    same = {**file_cfg, "seeds": 3, "results": "elsewhere", "extends": "config/config.yaml"}
    assert config_drift(same, file_cfg) == []
    changed = {**file_cfg, "train": {"epochs": 3, "lr": 0.04}, "report": {"name": "x"}}
    assert config_drift(changed, file_cfg) == ["report", "train.epochs"]


def test_a_config_override_that_jobs_would_not_see_stops_the_plan(root):
    """`--config report={name: other}` would change the DAG's outputs but not the config
    file every job reads: the workflow refuses it and names the key."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-n", "--cores", "2", "--config"]
    res = subprocess.run(
        [*cmd, "report={name: other}"], cwd=root, capture_output=True, text=True, env=env
    )
    assert res.returncode != 0
    assert "config/config.yaml: every job reads this file" in res.stderr + res.stdout
    assert "['report.name']" in res.stderr + res.stdout
    ok = subprocess.run([*cmd, "seeds=2"], cwd=root, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr


def _table_project(root: Path, dest: Path) -> Path:
    """A copy of the workflow with the table specs, profiles, reported numbers and claims."""
    import shutil

    from tests.helpers import project

    proj = project(root, dest, load_config(root / "config" / "config.yaml"))
    for part in ("config/tables", "config/profiles"):
        shutil.copytree(root / part, proj / part)
    for name in ("reported.yaml", "claims.yaml"):
        shutil.copy(root / "config" / name, proj / "config" / name)
    return proj


def test_a_table_run_plans_its_claims_ledger(root, tmp_path):
    """A table run ends in results/tables/<profile>/claims.{csv,md}, read from both rows of
    each claim of the run's tables for every seed; a bad claims file stops the plan."""
    proj = _table_project(root, tmp_path / "proj")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-n", "-p", "--cores", "2", "--config", "table=miep_t4"]
    cmd += ["profile=mini", "seeds=2"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=env, check=True)
    jobs = out.stdout.split("\nrule ")
    (job,) = [j for j in jobs if j.startswith("claims_ledger:")]
    fields = dict(ln.strip().split(": ", 1) for ln in job.splitlines()[1:] if ": " in ln)
    claims = {"csv": "results/tables/mini/claims.csv", "md": "results/tables/mini/claims.md"}
    assert fields["output"] == f"{claims['csv']}, {claims['md']}"
    assert fields["log"] == "results/logs/tables/mini/claims.log"
    assert fields["benchmark"] == "results/benchmarks/tables/mini/claims.tsv"
    exp = "results/experiments/mini/synth/gfl_narrow_fpn"
    methods = ("miep-tli", "miep-tli-foi", "miep-tli-iri", "miep")
    rows = [f"{m}/flops{p}" for m in methods for p in ("25", "10")]
    metrics = {f"{exp}/seed{s}/metrics/{r}/seed{s}.json" for r in rows for s in (0, 1)}
    specs = {f"config/tables/{p.name}" for p in (root / "config/tables").glob("*.yaml")}
    inputs = set(fields["input"].split(", "))
    assert inputs == metrics | specs | {"config/claims.yaml", "config/reported.yaml"}
    assert len(metrics) == 16  # 8 rows x 2 seeds; no baseline: a claim compares two rows
    assert fields["Shell command"] == (
        "detprune claims --claims config/claims.yaml --reported config/reported.yaml "
        "--profile mini --results results --tables miep_t4:0,1 "
        f"--csv {claims['csv']} --md {claims['md']} "
        "--log results/logs/tables/mini/claims.log"
    )
    (final,) = [j for j in jobs if j.startswith("all:")]
    assert claims["csv"] in final and "results/tables/mini/miep_t4.md" in final

    bad = yaml.safe_load((proj / "config/claims.yaml").read_text())
    bad["claims"]["miep_t4/gfl/miep-tli-foi@10>miep-tli@10"]["table"] = "miep_t9"
    (proj / "config/claims.yaml").write_text(yaml.safe_dump(bad))
    res = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=env)
    assert res.returncode != 0
    assert (
        "config/claims.yaml: claim 'miep_t4/gfl/miep-tli-foi@10>miep-tli@10': field 'table': "
        "unknown table 'miep_t9'"
    ) in res.stdout + res.stderr


@pytest.mark.parametrize("tune_images", [None, 5])
def test_a_coco_source_is_checked_before_the_baseline_trains(root, tmp_path, tune_images):
    """With `data.source: coco` (COCO, or a VOC split converted by voc2coco) train_baseline
    needs every split's `data check` report, so a bad file stops the run before training;
    with a carved tune split the train check reads the carved file."""
    from tests.helpers import project

    data = tmp_path / "data"
    coco = {f"{s}_{k}": str(data / (f"{s}.json" if k == "ann" else s)) for s in ("train", "val")
            for k in ("ann", "images")}  # fmt: skip
    for s in ("train", "val"):
        (data / s).mkdir(parents=True)
        (data / f"{s}.json").write_text("{}\n")  # a dry run reads neither
    if tune_images:
        coco["tune_images"] = tune_images
    cfg = load_config(root / "config" / "config.yaml")
    proj = project(
        root, tmp_path / "proj", {**cfg, "data": {**cfg["data"], "source": "coco", "coco": coco}}
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-n", "-p", "--cores", "2"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=env, check=True)
    jobs = [
        (
            j.split(":", 1)[0],
            dict(ln.strip().split(": ", 1) for ln in j.splitlines()[1:] if ": " in ln),
        )
        for j in out.stdout.split("\nrule ")
    ]
    (train,) = [f for rule, f in jobs if rule == "train_baseline"]
    checks = {f["output"]: f["input"] for rule, f in jobs if rule == "check_data"}
    reports = [f"results/data/check_{s}.json" for s in ("train", "val", "test")]
    train_ann = "results/data/carved/train.json" if tune_images else coco["train_ann"]
    assert train["input"].split(", ") == [train_ann, coco["train_images"], *reports]
    assert checks[reports[0]] == f"{train_ann}, {coco['train_images']}"
    assert checks[reports[2]] == f"{coco['val_ann']}, {coco['val_images']}"  # the reported one
    carves = [f for rule, f in jobs if rule == "carve_split"]
    assert [f["input"] for f in carves] == ([coco["train_ann"]] if tune_images else [])


def test_evaluate_export_onnx_plans_one_export_per_evaluated_checkpoint(root, tmp_path):
    """`evaluate.export: onnx` adds an export_onnx job per evaluated checkpoint (baseline and
    every fine-tuned chain), the same commands as dvc.yaml's stages, and reruns no
    evaluation (its params digest is unchanged); without it no job is planned."""
    from detprune.workflow import export_files, section_digest
    from tests.helpers import project

    cfg = load_config(root / "config" / "config.yaml")
    on = {**cfg, "evaluate": {**cfg["evaluate"], "export": "onnx"}}
    assert section_digest(on, "evaluate") == section_digest(cfg, "evaluate")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    plans = {}
    for tag, config in (("off", cfg), ("on", on)):
        proj = project(root, tmp_path / tag, config)
        cmd = [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2"]
        out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=env, check=True)
        plans[tag] = sorted(
            line.removeprefix("Shell command: ")
            for line in out.stdout.splitlines()
            if line.startswith("Shell command: detprune export")
        )
    n = len(cfg["prune"]["methods"]) * len(cfg["prune"]["flops_targets"])
    assert plans["off"] == [] and len(plans["on"]) == 1 + n
    assert "--checkpoint results/models/baseline/seed0.pt " in plans["on"][0]
    assert "--out results/models/finetuned/l1/flops10/seed0.onnx " in " ".join(plans["on"])
    stages = yaml.safe_load(dvc_yaml(on, "config/config.yaml"))["stages"]
    exports = {n: s for n, s in stages.items() if n.startswith("export_onnx_")}
    assert sorted(s["cmd"] for s in exports.values()) == plans["on"]
    assert "export_onnx_l1_flops10_seed0" in exports and "export_onnx_baseline_seed0" in exports
    assert exports["export_onnx_baseline_seed0"]["params"] == [
        {"config/config.yaml": ["evaluate.export"]}
    ]
    assert "evaluate.export" not in str(stages["evaluate_baseline_seed0"]["params"])
    assert not any(
        n.startswith("export_onnx") for n in yaml.safe_load(dvc_yaml(cfg, "c"))["stages"]
    )
    classifier = {**on, "data": {**on["data"], "source": "synth_cls"}}
    with pytest.raises(ValueError, match="evaluate.export': onnx export covers detectors"):
        export_files(classifier)


def _jobs(stdout: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, fields) of each job of a `snakemake -n -p` plan."""
    return [
        (
            j.split(":", 1)[0],
            dict(ln.strip().split(": ", 1) for ln in j.splitlines()[1:] if ": " in ln),
        )
        for j in stdout.split("\nrule ")
    ]


def test_a_model_checkpoint_imports_the_baseline_and_never_trains_it(root, tmp_path):
    """`model.checkpoint` set: rule import_baseline writes the baseline from the file (a
    dependency), train_baseline is not planned, and dvc.yaml runs the same commands."""
    from tests.helpers import project

    cfg = load_config(root / "config" / "config.yaml")
    cfg = {**cfg, "model": {**cfg["model"], "checkpoint": "weights/detector.pth"}}
    proj = project(root, tmp_path / "proj", cfg)
    (proj / "weights").mkdir()
    (proj / "weights/detector.pth").write_bytes(b"")  # a dry run reads no file
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=env, check=True)
    jobs = _jobs(out.stdout)
    assert not [f for rule, f in jobs if rule == "train_baseline"]
    (imp,) = [f for rule, f in jobs if rule == "import_baseline"]
    reports = [f"results/data/check_{s}.json" for s in ("train", "val", "test")]
    train_ann = "results/data/synth/instances_train.json"
    assert imp["input"].split(", ") == ["weights/detector.pth", train_ann, *reports]
    assert imp["output"] == "results/models/baseline/seed0.pt"
    assert imp["log"] == "results/logs/import/seed0.log"
    assert imp["benchmark"] == "results/benchmarks/import/seed0.tsv"
    assert imp["Shell command"] == (
        "detprune import-checkpoint --config config/config.yaml --weights weights/detector.pth "
        f"--train-ann {train_ann} --out results/models/baseline/seed0.pt --seed 0 "
        "--log results/logs/import/seed0.log"
    )
    stages = yaml.safe_load(dvc_yaml(cfg, "config/config.yaml"))["stages"]
    assert "train_seed0" not in stages
    assert stages["import_seed0"]["deps"] == ["weights/detector.pth", train_ann, *reports]
    assert stages["import_seed0"]["params"] == [{"config/config.yaml": ["seed", "model"]}]
    planned = sorted(
        line.removeprefix("Shell command: ")
        for line in out.stdout.splitlines()
        if line.startswith("Shell command: detprune")
    )
    assert planned == sorted(s["cmd"] for s in stages.values())


def test_a_table_run_takes_each_experiments_checkpoint(root, monkeypatch):
    """`checkpoints.<dataset>.<model>` (e.g. `--config 'checkpoints={coco: {...}}'`) is the
    model.checkpoint of that experiment only; an unknown model stops the plan."""
    from detprune import experiments as E
    from detprune.config import ConfigError

    monkeypatch.chdir(root)
    main = load_config("config/config.yaml")
    files = {"fasterrcnn_r50_fpn": "w/frcnn.pth", "retinanet_r50_fpn": "w/retina.pth"}
    plan = E.plan({**main, "checkpoints": {"coco": files}}, [E.load_table("miep_t2")], "paper")
    got = {
        (r.split("/")[3], e.config["model"]["name"]): e.config["model"].get("checkpoint")
        for r, e in plan.items()
    }
    assert got[("coco", "fasterrcnn_r50_fpn")] == "w/frcnn.pth"
    assert got[("coco", "retinanet_r50_fpn")] == "w/retina.pth"
    assert got[("voc07", "fasterrcnn_r50_fpn")] is None  # COCO's weights: COCO only
    assert got[("coco", "fsaf_r50_fpn")] is None
    with pytest.raises(ConfigError, match=r"unknown models \['coco.fcos_r50'\]"):
        E.plan({**main, "checkpoints": {"coco": {"fcos_r50": "x"}}}, [], "paper")


def test_a_table_run_imports_the_baselines_it_has_files_for(root, tmp_path):
    """In one DAG, experiments with a checkpoint import their baseline, the others train."""
    proj = _table_project(root, tmp_path / "proj")
    coco = [f"coco/annotations/instances_{s}2017.json" for s in ("train", "val")]
    for f in (*coco, "voc/voc0712_trainval.json", "voc/voc07_test.json", "w/frcnn.pth"):
        (proj / f).parent.mkdir(parents=True, exist_ok=True)
        (proj / f).write_text("{}\n")  # a dry run reads none
    for d in ("coco/train2017", "coco/val2017", "voc/JPEGImages"):
        (proj / d).mkdir(parents=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-n", "-p", "--cores", "2", "--config", "table=miep_t2"]
    cmd += ["profile=paper", "seeds=1", "coco_root=coco", "voc_root=voc"]
    cmd += ["checkpoints={coco: {fasterrcnn_r50_fpn: w/frcnn.pth}}"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=env, check=True)
    jobs = _jobs(out.stdout)
    exp = "results/experiments/paper/{}/{}/seed0/models/baseline/seed0.pt"
    (imp,) = [f for rule, f in jobs if rule == "import_baseline"]
    assert imp["output"] == exp.format("coco", "fasterrcnn_r50_fpn")
    assert imp["input"].startswith("w/frcnn.pth, ")
    trained = {f["output"] for rule, f in jobs if rule == "train_baseline"}
    assert exp.format("voc07", "fasterrcnn_r50_fpn") in trained
    assert exp.format("coco", "retinanet_r50_fpn") in trained
    assert imp["output"] not in trained
