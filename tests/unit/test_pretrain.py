"""Backbone pretraining (issue 22, item 1): the synthetic classification set, the
pretrain_backbone stage, strict loading of its file, and its place in the DAG."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detprune import backbone_init
from detprune.config import ConfigError, deep_merge, load_config
from detprune.data.classification import synthetic_arrays, write_synthetic_classification
from detprune.models import build_model
from detprune.train.pretrain import backbone_state, pretrain, train_classifier
from detprune.utils.io import torch_save
from detprune.workflow import dvc_yaml
from tests.helpers import BIN, ENV, project

TINY = {
    "epochs": 1,
    "batch_size": 8,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 0.0001,
    "num_train": 16,
    "num_val": 8,
    "num_classes": 4,
    "image_size": 32,
    "seed": 3,
}
NARROW_RESNET = {
    "backbone": "narrow",
    "widths": [32, 64, 128, 256],
    "blocks": [1, 1, 1, 1],
    "stem_width": 32,
}


def _config(default_config: dict, model: str, tmp_path: Path, **pretrain) -> dict:
    cfg = copy.deepcopy(default_config)
    cfg["results"] = str(tmp_path / "results")
    cfg["model"]["name"] = model
    cfg["pretrain"] = {**TINY, "init": "pretrained", **pretrain}
    return cfg


# --------------------------------------------------------------------------- data


def test_classification_set_is_byte_identical_for_a_seed(tmp_path: Path):
    a = synthetic_arrays("train", 12, 32, 6, seed=5)
    b = synthetic_arrays("train", 12, 32, 6, seed=5)
    c = synthetic_arrays("train", 12, 32, 6, seed=6)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
    assert a[0].shape == (12, 32, 32, 3) and a[0].dtype == np.uint8
    assert sorted(np.bincount(a[1]).tolist()) == [2] * 6  # balanced
    assert synthetic_arrays("val", 12, 32, 6, seed=5)[0].tobytes() != a[0].tobytes()
    # the same draws as the ImageFolder files of the classification tables
    from PIL import Image

    write_synthetic_classification(
        tmp_path, num_train=12, num_val=6, image_size=32, num_classes=6, seed=5
    )
    files = sorted((tmp_path / "train").glob("*/*.png"), key=lambda p: p.name)
    assert [np.asarray(Image.open(f).convert("RGB")).tobytes() for f in files] == [
        im.tobytes() for im in a[0]
    ]


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    ("name", "kind", "arch"),
    [
        ("fasterrcnn_narrow_fpn", "resnet", NARROW_RESNET),
        ("yolov4_narrow", "cspdarknet53", {"width": 0.25, "depth": 0.34}),
        ("yolov4_tiny_narrow", "cspdarknet53_tiny", {"width": 0.5}),
    ],
)
def test_a_detector_loaded_from_the_file_has_the_classifiers_features(
    name: str, kind: str, arch: dict, tmp_path: Path
):
    classifier, record = train_classifier(kind, arch, TINY)
    assert 0 <= record["val_accuracy"] <= 1
    torch_save(tmp_path / "b.pt", backbone_state(classifier.body))
    torch.manual_seed(123)  # another initialisation: every weight must come from the file
    detector = build_model(name, 3, {"pretrained_backbone": str(tmp_path / "b.pt")}).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = classifier.features(x)
        if kind == "resnet":  # torchvision's IntermediateLayerGetter: layer4 is "3"
            got = detector.backbone.body(classifier.normalize(x))["3"]
        else:
            got = detector.backbone(x)[-1]
    assert torch.equal(got, want)
    scratch = build_model(name, 3).eval()
    with torch.no_grad():
        other = scratch.backbone(x)[-1] if kind != "resnet" else scratch.backbone.body(x)["3"]
    assert not torch.allclose(other, want)


@pytest.mark.parametrize(
    ("name", "key"),
    [("fasterrcnn_narrow_fpn", "layer2.0.conv1.weight"), ("yolov4_tiny_narrow", "final.bn.bias")],
)
def test_a_file_with_a_missing_or_stray_key_fails_naming_it(name: str, key: str, tmp_path: Path):
    torch.manual_seed(0)
    body = build_model(name, 3).backbone
    body = body.body if hasattr(body, "body") else body
    state = {k: v for k, v in body.state_dict().items() if k != key}
    torch_save(tmp_path / "missing.pt", state)
    with pytest.raises(ValueError, match=rf"missing\.pt.*lacks keys.*{key.replace('.', '[.]')}"):
        build_model(name, 3, {"pretrained_backbone": str(tmp_path / "missing.pt")})
    torch_save(tmp_path / "stray.pt", {**body.state_dict(), "head.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"stray\.pt.*has keys the backbone lacks: head.extra"):
        build_model(name, 3, {"pretrained_backbone": str(tmp_path / "stray.pt")})
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        build_model(name, 3, {"pretrained_backbone": str(tmp_path / "nowhere.pt")})


def test_torchvision_imagenet_style_file_loads_with_its_fc(tmp_path: Path):
    """torchvision's ImageNet file: the ResNet with its 1000-class fc and without
    num_batches_tracked (older files); the detector takes everything but fc."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18()
    state = {k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "resnet18.pth")
    file = str(tmp_path / "resnet18.pth")
    model = build_model("fasterrcnn_r18_fpn", 3, {"pretrained_backbone": file})
    assert torch.equal(model.backbone.body.layer3[0].conv1.weight, net.layer3[0].conv1.weight)


# --------------------------------------------------------------------------- stage


def test_pretrain_stage_writes_the_planned_file_deterministically(
    default_config: dict, tmp_path: Path
):
    cfg = _config(default_config, "yolov4_tiny_narrow", tmp_path)
    how, out = backbone_init.resolve(cfg)
    assert how == "pretrained"
    assert out.startswith(f"{cfg['results']}/models/pretrained/cspdarknet53_tiny-")
    meta = pretrain(cfg, out, backbone_init.meta_path(out))
    record = json.loads(Path(backbone_init.meta_path(out)).read_text())
    assert record["family"] == "cspdarknet53_tiny" and record["arch"] == {"width": 0.5}
    assert record["schedule"] == TINY and 0 <= record["val_accuracy"] <= 1
    assert "torch" in record["versions"] and meta["backbone"] == Path(out).stem
    again = tmp_path / "again" / Path(out).name
    pretrain(cfg, str(again), str(again.with_suffix(".json")))
    assert again.read_bytes() == Path(out).read_bytes()  # seeded: byte-identical
    with pytest.raises(ConfigError, match="not the file this config plans"):
        pretrain(cfg, str(tmp_path / "other.pt"), str(tmp_path / "other.json"))
    # the baseline's build loads it: the detector's backbone is the file's
    model = build_model("yolov4_tiny_narrow", 3, {"pretrained_backbone": out})
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in saved.items())


def test_init_resolves_scratch_pretrained_and_files(default_config: dict, tmp_path: Path):
    cfg = _config(default_config, "fasterrcnn_narrow_fpn", tmp_path, init="scratch")
    assert backbone_init.resolve(cfg) == ("scratch", None)
    assert backbone_init.resolve(default_config) == ("scratch", None)  # the default run
    cfg["pretrain"]["init"] = "pretrained"
    bid = backbone_init.backbone_id(cfg)
    assert bid.startswith("resnet_narrow-")
    # every narrow-ResNet detector of the same widths shares the file; other widths do not
    for other in ("gfl_narrow_fpn", "ssd_narrow", "retinanet_narrow_fpn"):
        assert backbone_init.backbone_id({**cfg, "model": {"name": other}}) == bid
    wider = {**cfg, "model": {"name": "gfl_narrow_fpn", "kwargs": {"stem_width": 16}}}
    assert backbone_init.backbone_id(wider) != bid
    longer = {**cfg, "pretrain": {**cfg["pretrain"], "epochs": 2}}
    assert backbone_init.backbone_id(longer) != bid  # the schedule is part of the name
    assert backbone_init.resolve({**cfg, "model": {"name": "resnet_narrow_cls"}}) == (
        "scratch",
        None,
    )  # a classifier has nothing to pretrain
    cfg["pretrain"]["init"] = "weights/r.pth"
    assert backbone_init.resolve(cfg) == ("file", "weights/r.pth")
    cfg["pretrain"]["init"] = {"resnet50": "w/r50.pth"}
    r50 = {**cfg, "model": {"name": "gfl_r50_fpn"}}
    assert backbone_init.resolve(r50) == ("file", "w/r50.pth")
    with pytest.raises(ConfigError, match="no file for backbone family 'resnet_narrow'"):
        backbone_init.resolve(cfg)
    cfg["model"]["pretrained_backbone"] = "mine.pt"  # the model's own file wins
    assert backbone_init.resolve(cfg) == ("file", "mine.pt")


# --------------------------------------------------------------------------- DAG


def _jobs(out: str, rule: str) -> list[dict[str, str]]:
    jobs = [j for j in out.split("\nrule ") if j.startswith(f"{rule}:")]
    return [
        dict(ln.strip().split(": ", 1) for ln in j.splitlines()[1:] if ": " in ln) for j in jobs
    ]


def test_a_mini_table_run_pretrains_each_backbone_family_once(root: Path, tmp_path: Path):
    proj = project(root, tmp_path / "proj", load_config(root / "config" / "config.yaml"))
    for part in ("config/tables", "config/profiles"):
        shutil.copytree(root / part, proj / part)
    for name in ("reported.yaml", "claims.yaml"):
        shutil.copy(root / "config" / name, proj / "config" / name)
    cmd = [str(BIN / "snakemake"), "-n", "-p", "--cores", "2", "--config"]
    cmd += ["table=miep_t1,gcp_yolov4", "profile=mini"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=ENV, check=True)
    pre = _jobs(out.stdout, "pretrain_backbone")
    files = sorted(j["output"].split(", ")[0] for j in pre)
    assert len(files) == 2  # narrow ResNet (GFL and SSD share it), CSPDarknet53
    resnet, darknet = files[1], files[0]
    assert resnet.startswith("results/models/pretrained/resnet_narrow-")
    assert darknet.startswith("results/models/pretrained/cspdarknet53-")
    for job in pre:
        model, meta = job["output"].split(", ")
        assert meta == model.removesuffix(".pt") + ".json"
        assert job["Shell command"].startswith("detprune pretrain --config results/experiments/")
        assert f"--out {model} --meta {meta} " in job["Shell command"]
        assert job["log"] == model.replace("pretrained/", "pretrained/logs/").replace(".pt", ".log")
    trains = _jobs(out.stdout, "train_baseline")
    assert len(trains) == 3
    for job in trains:
        inputs = job["input"].split(", ")
        want = darknet if "yolov4_narrow" in job["output"] else resnet
        assert want in inputs and not (set(files) - {want}) & set(inputs)
    # each experiment's config names the cache of the whole run
    exp = yaml.safe_load(
        (proj / "results/experiments/mini/synth/ssd_narrow/seed0/config.yaml").read_text()
    )
    assert exp["pretrain"]["init"] == "pretrained"
    assert backbone_init.pretrained_path(exp) == resnet


def test_default_run_with_pretrained_init_plans_it_in_snakemake_and_dvc(
    root: Path, default_config: dict, tmp_path: Path
):
    """The default run plans nothing new (scratch); with `init: pretrained` one
    pretrain_backbone job feeds train_baseline, and dvc.yaml runs the same commands."""
    assert "pretrain_" not in dvc_yaml(default_config, "config/config.yaml")
    cfg = deep_merge(default_config, {"pretrain": {"init": "pretrained"}})
    proj = project(root, tmp_path / "proj", cfg)
    cmd = [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2"]
    out = subprocess.run(cmd, cwd=proj, capture_output=True, text=True, env=ENV, check=True)
    (pre,) = _jobs(out.stdout, "pretrain_backbone")
    model = backbone_init.pretrained_path(cfg)
    assert pre["output"].split(", ")[0] == model
    (train,) = _jobs(out.stdout, "train_baseline")
    assert model in train["input"].split(", ")
    planned = sorted(
        ln.removeprefix("Shell command: ")
        for ln in out.stdout.splitlines()
        if ln.startswith("Shell command: detprune")
    )
    stages = yaml.safe_load(dvc_yaml(cfg, "config/config.yaml"))["stages"]
    assert planned == sorted(s["cmd"] for s in stages.values())
    (name,) = [n for n in stages if n.startswith("pretrain_")]
    assert stages[name]["outs"][0] == {model: {"cache": False}}
    assert model in stages["train_seed0"]["deps"]
    assert stages[name]["params"] == [
        {"config/config.yaml": [f"pretrain.{k}" for k in backbone_init.SCHEDULE_KEYS]}
    ]


def test_the_train_stage_starts_from_init_and_its_checkpoint_needs_no_file(
    tiny_config: dict, tmp_path: Path
):
    from detprune import stages
    from detprune.data.synth import write_synthetic
    from detprune.train import checkpoint

    write_synthetic(
        tmp_path / "d", seed=1, num_train=4, num_val=2, image_size=64, min_objects=1, max_objects=3
    )
    torch.manual_seed(5)
    source = build_model("fasterrcnn_narrow_fpn", 3).backbone.body  # NarrowResNet's keys
    torch_save(tmp_path / "init.pt", source.state_dict())
    cfg = copy.deepcopy(tiny_config)
    cfg["pretrain"]["init"] = str(tmp_path / "init.pt")
    cfg["train"].update(lr=1e-9, weight_decay=0.0, device="cpu", amp=False)
    out = tmp_path / "base.pt"
    ann, images = tmp_path / "d/instances_train.json", tmp_path / "d/train"
    stages.train(cfg, str(ann), str(images), str(out))
    (tmp_path / "init.pt").unlink()  # later stages rebuild from the checkpoint alone
    model, ckpt = checkpoint.load_model(out)
    assert ckpt["model"]["kwargs"]["pretrained_backbone"] == str(tmp_path / "init.pt")
    got = model.backbone.body.layer3[0].conv1.weight
    assert torch.allclose(got, source.layer3[0].conv1.weight, atol=1e-6)
