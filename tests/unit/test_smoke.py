"""Smoke mode of the paper profile (detprune.smoke): the same experiments, models, methods
and jobs as the paper plan, every schedule and budget cut; the fixture's layout."""

from __future__ import annotations

import json

import pytest

from detprune import experiments as E
from detprune import smoke as S
from detprune.config import ConfigError
from detprune.data.classification import check_imagefolder
from detprune.data.coco import check_coco
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def plans():
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        tables = [E.load_table(n) for n in E.table_names()]
        paper = E.plan({"results": "results"}, tables, "paper")
        smoke = E.plan({"results": "results/smoke", "smoke": True}, tables, "paper")
    finally:
        os.chdir(cwd)
    return paper, smoke


def test_smoke_is_a_boolean_of_the_paper_profile_only():
    assert S.flag({"smoke": "true"}) and S.flag({"smoke": True})
    assert not S.flag({}) and not S.flag({"smoke": "false"})
    with pytest.raises(ConfigError, match="not a boolean"):
        S.flag({"smoke": "yes"})
    with pytest.raises(ConfigError, match="profile=paper"):
        S.check({"smoke": True, "profile": "mini"})
    with pytest.raises(ConfigError, match="profile=paper"):
        E.plan({"results": "r", "smoke": True}, [], "mini")
    assert S.results_root("results/") == "results/smoke"


def test_smoke_plans_the_papers_experiments_models_and_jobs(plans):
    paper, smoke = plans
    assert len(paper) == len(smoke) == 9
    for (rp, ep), (rs, es) in zip(sorted(paper.items()), sorted(smoke.items()), strict=True):
        assert rs == rp.replace("results/", "results/smoke/", 1)
        assert es.targets == ep.targets
        cp, cs = ep.config, es.config
        assert cs["model"]["name"] == cp["model"]["name"]
        # only the input size changes: widths, blocks, backbone are the paper's
        extra = set(cs["model"]["kwargs"]) - set(cp["model"]["kwargs"])
        assert extra <= {"image_size", "max_size"}
        assert cs["finetune"].get("methods", {}).keys() == cp["finetune"].get("methods", {}).keys()
        assert cs["sparse"]["regularizers"] == cp["sparse"]["regularizers"]
        assert cs["data"]["source"] == cp["data"]["source"]
        assert cs["data"]["source"] != "coco" or cs["data"]["coco"]["tune_images"] == 2
        assert cs["smoke"] is True and "smoke" not in cp


def test_smoke_cuts_every_schedule_and_budget(plans):
    _, smoke = plans
    for exp in smoke.values():
        cfg = exp.config
        scheds = [cfg["train"], cfg["sparse"]["schedule"], cfg["finetune"]["default"]]
        for s in scheds + list(cfg["finetune"].get("methods", {}).values()):
            assert s["max_iters_per_epoch"] == 2 and s["device"] == "cpu" and not s["amp"]
        for s in scheds:
            assert (s["epochs"], s["batch_size"]) == (1, 2)
        assert cfg["threads"] == 2
        assert cfg["prune"]["calib_batches"] == 1
        assert cfg["evaluate"]["latency"]["runs"] == 1
        for method, _ in exp.targets:
            opts = cfg["prune"]["options"][method]
            assert opts["calib_batches"] == 1
            if method in ("dcp", "lcp"):
                assert opts["aux_iters"] == opts["batches"] == opts["select_steps"] == 1
            if method.startswith(("miep", "groupfisher")):
                assert (opts["steps"], opts["interval"]) == (2, 1)
        size = cfg["model"]["kwargs"]["image_size"]
        assert size == S.FIXED_SIZE.get(cfg["model"]["name"], size) <= 300
        # the fixture under the smoke run's own folder
        data = json.dumps(cfg["data"])
        assert "results/smoke/data/" in data and "data/coco/" not in data.replace("smoke/data", "")


def test_fixture_is_laid_out_as_the_paper_profile_reads_it(tmp_path):
    S.write_coco(tmp_path / "coco")
    ann = tmp_path / "coco/annotations/instances_train2017.json"
    info = check_coco(ann, tmp_path / "coco/train2017")
    assert info["num_images"] == S.TRAIN_IMAGES and info["num_categories"] == 80
    data = json.loads(ann.read_text())
    ids = [c["id"] for c in data["categories"]]
    assert ids == list(S.COCO_IDS) and 12 not in ids and ids[-1] == 90  # COCO's gaps
    assert {a["category_id"] for a in data["annotations"]} <= set(S.COCO_USED)
    val = tmp_path / "coco/annotations/instances_val2017.json"
    assert check_coco(val, tmp_path / "coco/val2017")["num_images"] == S.VAL_IMAGES

    S.write_voc(tmp_path / "voc")
    for name in ("voc0712_trainval.json", "voc07_test.json"):
        info = check_coco(tmp_path / "voc" / name, tmp_path / "voc/JPEGImages")
        assert info["num_categories"] == 20 and info["categories"][0] == "aeroplane"
    assert len(list((tmp_path / "voc/JPEGImages").iterdir())) == S.TRAIN_IMAGES + S.VAL_IMAGES

    S.write_imagenet(tmp_path / "imagenet", num_classes=3)
    for split in ("train", "val"):
        assert check_imagefolder(tmp_path / "imagenet" / split)["num_classes"] == 3
