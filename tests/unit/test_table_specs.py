"""Paper-table specs (config/tables/*.yaml): registries, reported ids, profiles, seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from detprune import experiments as E
from detprune.config import ConfigError, load_config
from detprune.experiments import table_files
from detprune.models import MODELS
from detprune.pruning.methods import METHODS
from detprune.report.paper_tables import build_paper_table
from detprune.report.reported import load_reported
from detprune.report.tables import to_markdown
from tests.conftest import ROOT

TABLES = E.table_names()


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_every_paper_table_of_the_issue_has_a_config():
    assert set(TABLES) == {
        "miep_t1", "miep_t2", "miep_t4", "miep_t5", "miep_t6", "miep_t7", "miep_imagenet",
        "lcp_ssd", "gcp_yolov4",
    }  # fmt: skip


@pytest.mark.parametrize("name", TABLES)
def test_tables_name_registered_models_and_methods_or_mark_the_row_missing(name):
    spec = E.load_table(name)
    for exp in spec.experiments.values():
        assert exp["paper"]["model"] in MODELS and exp["mini"]["model"] in MODELS
        # the mini model is the CPU configuration of the paper's architecture
        assert MODELS[exp["paper"]["model"]].task == MODELS[exp["mini"]["model"]].task
    reported = load_reported(E.REPORTED)
    for row in spec.rows:
        assert row.method in METHODS or row.missing, row
        if row.reported:
            assert row.reported in reported, row.reported
            assert math.isclose(reported[row.reported].flops, row.flops), row


def test_chex_is_the_one_missing_row():
    missing = [(t, r.method) for t in TABLES for r in E.load_table(t).rows if r.missing]
    assert missing == [("miep_t1", "chex")]


def test_an_unregistered_method_without_missing_is_rejected(tmp_path, monkeypatch):
    spec = yaml.safe_load((ROOT / "config/tables/lcp_ssd.yaml").read_text())
    spec["rows"].append({"experiment": "ssd", "method": "chex", "flops": [0.5]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(E, "TABLES_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"bad\.yaml: field 'rows\.2\.method': 'chex' is not"):
        E.load_table("bad")
    spec["rows"][-1]["missing"] = "not implemented"
    spec["experiments"]["ssd"]["mini"]["model"] = "ssd_tiny_nonexistent"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"experiments\.ssd\.mini\.model': unknown model"):
        E.load_table("bad")


def test_profiles_are_valid_configs_and_paper_uses_the_models_schedules():
    for profile in E.PROFILES:
        load_config(ROOT / "config/profiles" / f"{profile}.yaml")
    paper = E.load_profile("paper")
    setup = {"model": "gfl_r50_fpn", "dataset": "coco"}
    roots = {"coco_root": "/data/coco", "voc_root": "v", "imagenet_root": "i"}
    cfg = E.experiment_config(paper, setup, 1, "results", "paper", roots)
    assert cfg["results"] == "results/experiments/paper/coco/gfl_r50_fpn/seed1"
    assert cfg["seed"] == 1 and cfg["model"]["name"] == "gfl_r50_fpn"
    assert cfg["data"]["coco"]["val_ann"] == "/data/coco/annotations/instances_val2017.json"
    # mmdetection's 1x: 12 epochs, lr 0.01, steps at 8 and 11; fine-tuning the same
    for sched in (cfg["train"], cfg["finetune"]["default"], cfg["sparse"]["schedule"]):
        assert (sched["epochs"], sched["lr"], sched["milestones"]) == (12, 0.01, [8, 11])
    assert cfg["finetune"]["default"]["max_iters_per_epoch"] is None
    mini = E.experiment_config(
        E.load_profile("mini"), {"model": "gfl_narrow_fpn"}, 0, "results", "mini", roots
    )
    assert mini["data"]["source"] == "synth" and mini["train"]["epochs"] == 6


def test_fsaf_clips_its_gradient_norm_at_10_in_both_profiles_and_retinanet_only_on_cpu():
    roots = {"coco_root": "/data/coco", "voc_root": "v", "imagenet_root": "i"}
    paper, mini = E.load_profile("paper"), E.load_profile("mini")

    def sched(profile: dict, name: str, setup: dict) -> dict:
        cfg = E.experiment_config(profile, setup, 0, "results", name, roots)
        return cfg["train"], cfg["finetune"]["default"]

    coco = {"dataset": "coco"}
    # mmdetection's FSAF config: grad_clip max_norm 10; its RetinaNet: none
    for s in sched(paper, "paper", {"model": "fsaf_r50_fpn", **coco}):
        assert (s["lr"], s["clip_grad_norm"]) == (0.01, 10.0)
    for s in sched(paper, "paper", {"model": "retinanet_r50_fpn", **coco}):
        assert s.get("clip_grad_norm") is None
    # the CPU entries (GroupNorm towers): lr 0.08 with clipping (measured in
    # benchmarks/retina_cpu_towers.md); fine-tuning keeps the mini profile's own schedule
    for name in ("fsaf_narrow_fpn", "retinanet_narrow_fpn"):
        train, finetune = sched(mini, "mini", {"model": name})
        assert (train["lr"], train["clip_grad_norm"]) == (0.08, 10.0)
        assert finetune["lr"] == mini["finetune"]["default"]["lr"]
    train, _ = sched(mini, "mini", {"model": "gfl_narrow_fpn"})
    assert train.get("clip_grad_norm") is None


def test_seeds_from_the_command_line():
    assert E.parse_seeds(None, [0]) == (0,)
    assert E.parse_seeds(3, [0]) == (0, 1, 2)
    assert E.parse_seeds(["2", "5"], [0]) == (2, 5)
    assert E.parse_seeds("1,4", [0]) == (1, 4)
    with pytest.raises(ConfigError, match="repeated seed"):
        E.parse_seeds("1,1", [0])


def _record(model: str, method: str, flops: float, seed: int, ap: float, macs: float) -> dict:
    return {
        "detector": model,
        "method": method,
        "flops_target": flops,
        "seed": seed,
        "split": "test",
        "metrics": {"AP": ap, "AP50": ap + 0.2},
        "cost": {"params": 1e6 * flops, "macs": macs},
    }


def test_two_seeds_give_the_mean_and_std_of_exactly_those_two_runs(tmp_path):
    spec = E.load_table("lcp_ssd")
    main = {"results": str(tmp_path)}
    values = {0: (0.30, 0.20), 1: (0.34, 0.26), 2: (0.90, 0.90)}  # seed 2: not asked for
    for seed, (base_ap, lcp_ap) in values.items():
        at = Path(E.experiment_dir(main, spec, "ssd", "mini", seed))
        recs = {
            f"metrics/baseline/seed{seed}.json": _record(
                "ssd_narrow", "baseline", 1.0, seed, base_ap, 100.0
            ),
            f"metrics/lcp/flops53/seed{seed}.json": _record(
                "ssd_narrow", "lcp", 0.53, seed, lcp_ap, 53.0
            ),
            f"metrics/dcp/flops53/seed{seed}.json": _record(
                "ssd_narrow", "dcp", 0.53, seed, 0.1, 52.0
            ),
        }
        for rel, rec in recs.items():
            (at / rel).parent.mkdir(parents=True, exist_ok=True)
            (at / rel).write_text(json.dumps(rec))
    assert len(table_files(main, spec, "mini", [0, 1])) == 6
    df = build_paper_table(main, spec, "mini", [0, 1], load_reported(E.REPORTED))
    lcp = df[df["method"] == "LCP"].iloc[0]
    assert lcp["seeds"] == 2
    assert lcp["repro pruned"] == pytest.approx(23.0)
    assert lcp["repro std"] == pytest.approx(statistics.stdev([20.0, 26.0]))
    assert lcp["repro base"] == pytest.approx(32.0)
    assert lcp["Δrepro"] == pytest.approx(-9.0)
    # the paper: 21.9 -> 20.9
    assert (lcp["paper base"], lcp["paper pruned"]) == (21.9, 20.9)
    assert lcp["Δpaper"] == pytest.approx(-1.0)
    assert lcp["Δrepro − Δpaper"] == pytest.approx(-8.0)
    assert lcp["flops_kept (%)"] == pytest.approx(53.0)
    dcp = df[df["method"] == "DCP"].iloc[0]
    assert dcp["note"] == "not reported" and math.isnan(dcp["paper pruned"])
    one = build_paper_table(main, spec, "mini", [1], load_reported(E.REPORTED))
    assert one["repro pruned"].iloc[0] == pytest.approx(26.0)
    assert math.isnan(one["repro std"].iloc[0])  # one run: no spread


def test_a_missing_row_stays_empty(tmp_path):
    spec = E.load_table("miep_t1")
    chex = [r for r in spec.rows if r.missing]
    assert len(chex) == 1
    files = table_files({"results": str(tmp_path)}, spec, "mini", [0])
    assert not any("/chex/" in f for f in files)


def test_a_paper_row_gets_the_paired_interval_of_its_change(tmp_path):
    """Per seed the row and its own baseline are paired over the same test resamples:
    a row that is exactly 3 points below its baseline on every resample has the interval
    [-3, -3]; without bootstrap records the interval is empty."""
    spec = E.load_table("lcp_ssd")
    main = {"results": str(tmp_path)}
    rng = np.random.default_rng(0)
    base_vec = rng.uniform(0.25, 0.35, size=1000)
    at = Path(E.experiment_dir(main, spec, "ssd", "mini", 0))
    recs = {
        "metrics/baseline/seed0.json": _record("ssd_narrow", "baseline", 1.0, 0, 0.30, 100.0),
        "metrics/lcp/flops53/seed0.json": _record("ssd_narrow", "lcp", 0.53, 0, 0.27, 53.0),
        "metrics/dcp/flops53/seed0.json": _record("ssd_narrow", "dcp", 0.53, 0, 0.1, 52.0),
    }
    boot = {"resamples": 1000, "seed": 0, "images": 500, "image_ids_sha256": "same"}
    recs["metrics/baseline/seed0.json"]["bootstrap"] = {**boot, "AP": base_vec.tolist()}
    lcp_vec = (base_vec - 0.03).tolist()
    recs["metrics/lcp/flops53/seed0.json"]["bootstrap"] = {**boot, "AP": lcp_vec}
    for rel, rec in recs.items():
        (at / rel).parent.mkdir(parents=True, exist_ok=True)
        (at / rel).write_text(json.dumps(rec))
    df = build_paper_table(main, spec, "mini", [0], load_reported(E.REPORTED))
    lcp = df[df["method"] == "LCP"].iloc[0]
    assert lcp["Δrepro"] == pytest.approx(-3.0)
    assert lcp["Δrepro lo"] == pytest.approx(-3.0) and lcp["Δrepro hi"] == pytest.approx(-3.0)
    dcp = df[df["method"] == "DCP"].iloc[0]
    assert math.isnan(dcp["Δrepro lo"]) and math.isnan(dcp["Δrepro hi"])
    assert "-3.0 ± 0.0" in to_markdown(df)
