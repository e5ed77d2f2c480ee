"""Smoke mode of the paper profile through Snakemake: the same jobs as the paper run of
every table (only the fixture's jobs added), and the fastest table's smoke run end to end."""

from __future__ import annotations

import re
from pathlib import Path

from detprune import smoke as S
from tests.helpers import BIN, run
from tests.pipeline.test_tables import _default_config, _table_project

FIXTURE_RULES = {"smoke_coco", "smoke_voc", "smoke_imagenet"}


def _job_stats(text: str) -> dict[str, int]:
    """rule -> job count, from the `Job stats` table of `snakemake -n`."""
    stats = text.split("Job stats:", 1)[1]
    return {
        m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "total"
    }


def _dry(proj: Path, *config: str) -> dict[str, int]:
    cmd = [str(BIN / "snakemake"), "-n", "--cores", "2", "--config", "table=all", "profile=paper"]
    res = run([*cmd, *config], proj)
    return _job_stats(res.stdout + res.stderr)


def test_smoke_runs_the_paper_jobs_of_every_table(tmp_path):
    proj = _table_project(tmp_path / "proj", _default_config())
    data = tmp_path / "data"
    S.write_coco(data / "coco")
    S.write_voc(data / "voc")
    S.write_imagenet(data / "imagenet", num_classes=2)
    roots = [f"{k}={data / k[: -len('_root')]}" for k in ("coco_root", "voc_root", "imagenet_root")]
    paper = _dry(proj, *roots)
    smoke = _dry(proj, "smoke=true")
    assert {r: n for r, n in smoke.items() if r not in FIXTURE_RULES} == paper
    assert set(smoke) - set(paper) == FIXTURE_RULES
    assert paper["prune"] == 59 and paper["finetune_distill"] > 0
    # the smoke run's own folder and the fixture's, beside no real result
    smoke_cfg = proj / "results/smoke/experiments/paper/coco/gfl_r50_fpn/seed0/config.yaml"
    assert "results/smoke/data/coco/annotations" in smoke_cfg.read_text()


def test_the_fastest_tables_smoke_run_completes(tmp_path):
    """miep_t5 (GFL R50 on COCO: TLI, TLI + Phi_pre, TLI + Phi_pre + Phi_obj at 10 %
    FLOPs), every job of the paper run on the CPU: ~3 min on 2 cores (benchmarks/
    paper_smoke.md has the other tables)."""
    import pandas as pd
    import yaml

    proj = _table_project(tmp_path / "proj", _default_config())
    cmd = [str(BIN / "snakemake"), "--cores", "2", "--config", "table=miep_t5"]
    run([*cmd, "profile=paper", "smoke=true"], proj, timeout=900)
    df = pd.read_csv(proj / "results/smoke/tables/paper/miep_t5.csv")
    assert list(df["method"]) == ["TLI", "TLI + Phi_pre", "TLI + Phi_pre + Phi_obj"]
    assert (abs(df["flops_kept (%)"] - 10) <= 0.5).all()
    exp = proj / "results/smoke/experiments/paper/coco/gfl_r50_fpn/seed0"
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["model"]["kwargs"] == {"image_size": 128, "max_size": 128}
    assert cfg["train"]["device"] == "cpu" and cfg["data"]["coco"]["tune_images"] == 2
    assert (exp / "models/finetuned/miep-phipre/flops10/seed0.pt").is_file()
    assert not (proj / "results/experiments").exists()  # nothing beside real results
