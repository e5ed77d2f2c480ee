"""Image classification through the detection pipeline: the synthetic ImageFolder set and
its checks, the ResNet classifiers behind the detectors' API, top-1/top-5, every pruning
method on the CPU classifier, and data -> train -> prune -> fine-tune -> evaluate."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from detprune import cli, stages
from detprune.data.classification import (
    CLASSES,
    ImageFolderDataset,
    RandomResizedCrop,
    check_imagefolder,
    classification_transform,
    write_synthetic_classification,
)
from detprune.data.coco import DatasetError
from detprune.evaluation.classification import evaluate_classifier
from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model
from detprune.models.classification import Classifier
from detprune.pruning.base import PruneContext
from detprune.pruning.importance.foi import FeatureRecorder, object_weights
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.oneshot import macs_counter
from detprune.train import checkpoint
from detprune.train.engine import make_loader
from tests.conftest import write_config

torch.set_num_threads(1)

NAME = "resnet_narrow_cls"
SIZE = 64
K = 4


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """24 train / 8 val images, 4 classes, 64 px."""
    root = tmp_path_factory.mktemp("synth_cls")
    write_synthetic_classification(
        root, num_train=24, num_val=8, image_size=SIZE, num_classes=K, seed=0
    )
    return root


# --------------------------------------------------------------------------- data


def test_synthetic_set_is_byte_identical_for_a_seed_with_the_requested_counts(tmp_path: Path):
    kw = {"num_train": 10, "num_val": 5, "image_size": SIZE, "num_classes": 5}
    summary = write_synthetic_classification(tmp_path / "a", seed=7, **kw)
    write_synthetic_classification(tmp_path / "b", seed=7, **kw)
    write_synthetic_classification(tmp_path / "c", seed=8, **kw)
    a, b, c = (_tree(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c
    classes = list(CLASSES[:5])
    assert summary["classes"] == classes
    for split, n in (("train", 10), ("val", 5)):
        files = [k for k in a if k.startswith(f"{split}/")]
        assert len(files) == n
        per_class = {name: sum(k.split("/")[1] == name for k in files) for name in classes}
        assert per_class == summary[split] == dict.fromkeys(classes, n // 5)
        assert all(k.endswith(".png") for k in files)
    # a rerun with fewer images removes the extra files
    write_synthetic_classification(tmp_path / "a", seed=7, **{**kw, "num_train": 5})
    assert len([k for k in _tree(tmp_path / "a") if k.startswith("train/")]) == 5


def test_synthetic_set_rejects_splits_without_every_class(tmp_path: Path):
    with pytest.raises(ValueError, match="num_val"):
        write_synthetic_classification(tmp_path, num_train=8, num_val=3, num_classes=4)


def test_imagefolder_dataset_reads_images_and_labels(synth: Path):
    data = ImageFolderDataset(synth / "train")
    assert len(data) == 24 and data.num_classes == K
    assert data.class_names == list(CLASSES[:K])
    image, target = data[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [0] and target["image_id"] == 0
    labels = [int(data[i][1]["labels"]) for i in range(len(data))]
    assert labels == sorted(labels) and set(labels) == set(range(K))
    # the engine's loader batches it as (images, targets) tuples
    images, targets = next(iter(make_loader(data, 4, shuffle=True, seed=0)))
    assert len(images) == 4 and all("labels" in t for t in targets)


def test_check_imagefolder_accepts_the_set_and_names_each_problem(synth: Path, tmp_path: Path):
    summary = check_imagefolder(synth / "val")
    assert summary["num_images"] == 8 and summary["num_classes"] == K
    assert summary["per_class"] == dict.fromkeys(CLASSES[:K], 2)

    bad = tmp_path / "bad"
    (bad / "empty_class").mkdir(parents=True)
    (bad / "cat").mkdir()
    good = next((synth / "val" / CLASSES[0]).iterdir())
    (bad / "cat" / "ok.png").write_bytes(good.read_bytes())
    (bad / "cat" / "broken.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError) as err:
        check_imagefolder(bad)
    msg = str(err.value)
    assert "2 problems" in msg
    assert f"class folder {bad / 'empty_class'}: empty" in msg
    assert f"unreadable image {bad / 'cat' / 'broken.png'}" in msg
    assert "ok.png" not in msg

    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        check_imagefolder(tmp_path / "flat")


def test_cli_synth_and_check_dispatch_on_classification_data(tiny_config: dict, tmp_path: Path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["source"] = "synth_cls"
    cfg["data"]["synth_cls"] = {
        "num_train": 4,
        "num_val": 2,
        "num_test": 2,
        "image_size": 48,
        "num_classes": 2,
        "seed": 1,
    }
    path = write_config(cfg, tmp_path / "c.yaml")
    out = tmp_path / "d"
    cli.main(["data", "synth", "--config", str(path), "--out-dir", str(out)])
    assert len(list((out / "train").glob("*/*.png"))) == 4
    assert len(list((out / "val").glob("*/*.png"))) == 2
    assert len(list((out / "test").glob("*/*.png"))) == 2  # the held-out split
    val = str(out / "val")
    cli.main(["data", "check", "--ann", val, "--images", val, "--out", str(tmp_path / "ok.json")])
    assert json.loads((tmp_path / "ok.json").read_text())["summary"]["num_images"] == 2
    for f in (out / "val" / CLASSES[0]).iterdir():
        f.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exc:
        cli.main(["data", "check", "--ann", val, "--images", val])
    assert exc.value.code == 2


def test_classification_transform_crops_and_flips():
    torch.manual_seed(0)
    image = torch.arange(3 * 40 * 60, dtype=torch.float32).reshape(3, 40, 60)
    crop = RandomResizedCrop((0.25, 0.5))
    for _ in range(20):
        top, left, h, w = crop.box(40, 60)
        assert 0.2 * 2400 <= h * w <= 0.55 * 2400
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w
    t = classification_transform("hflip", train=True, scale=(0.5, 1.0))
    out, target = t(image, {"labels": torch.tensor([1])})
    assert out.shape[0] == 3 and target["labels"].tolist() == [1]
    # without augmentation and for evaluation: the centre square of crop_ratio of the
    # shorter side (ImageNet: resize to 256, centre 224; the model resizes to 224)
    none = classification_transform("none", train=True)
    assert torch.equal(none(image, {})[0], image[:, :, 10:50])
    square = torch.rand(3, 64, 64)
    assert classification_transform("hflip", train=False)(square, {})[0] is square
    imagenet = classification_transform("hflip", train=False, crop_ratio=0.875)
    assert imagenet(torch.rand(3, 256, 300), {})[0].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        classification_transform("mosaic", train=True)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["resnet50_cls", NAME])
def test_declared_modules_exist(name: str):
    entry = MODELS[name]
    assert entry.task == "classification"
    model = build_model(name, 10)
    paths = [*entry.ignored_layers, *entry.neck_outputs, *entry.cls_logits, *entry.distill_taps]
    paths += [p for p, _ in entry.aux_features]
    paths += [p for prefixes in entry.groups.values() for p in prefixes]
    for path in paths:
        model.get_submodule(path)
    assert entry.ignored_layers == ("net.fc",)
    assert model.get_submodule("net.fc").out_features == 10


def test_resnet50_cls_has_the_published_size():
    """torchvision's ResNet-50 (He et al. 2016): 25.6 M parameters and 4.1 GFLOPs
    (multiply-accumulates) at 224 px with 1000 classes; MIEP's ImageNet table uses it."""
    model = build_model("resnet50_cls", 1000)
    assert count_params(model) == 25_557_032  # published: 25.6 M
    macs = count_macs(model, 224)["macs"]
    assert macs == 4_089_184_256  # what count_macs reports; torchvision lists 4.09 GFLOPS
    assert macs == pytest.approx(4.1e9, rel=0.01)  # published: 4.1 GFLOPs (MACs)
    sched = MODELS["resnet50_cls"].schedule
    assert (sched["epochs"], sched["lr"], sched["batch_size"]) == (90, 0.1, 256)
    assert sched["milestones"] == [30, 60] and sched["weight_decay"] == 1e-4


def test_classifier_follows_the_detection_api():
    torch.manual_seed(0)
    model = build_model(NAME, K)
    assert isinstance(model, Classifier)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 50, 90)]
    targets = [{"labels": torch.tensor([1])}, {"labels": torch.tensor([3])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier"} and torch.isfinite(losses["loss_classifier"])
    model.eval()
    with torch.no_grad():
        out = model(images)
        logits = model(torch.rand(2, 3, SIZE, SIZE))
    assert len(out) == 2 and out[0]["scores"].shape == (K,)
    assert float(out[0]["scores"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(out[0]["labels"]) == int(out[0]["scores"].argmax())
    assert logits.shape == (2, K)
    # train and eval mode build the same batch (a guide or teacher in eval mode sees what
    # the training student sees)
    seen = []
    model.net.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model.train()
        model(images, targets)
        model.eval()
        model(images)
    assert seen[0].shape == (2, 3, SIZE, SIZE) and torch.equal(seen[0], seen[1])


def test_pretrained_weights_load_from_a_local_file_without_a_mismatched_fc(tmp_path: Path):
    torch.manual_seed(0)
    source = build_model(NAME, 10)
    torch.save(source.net.state_dict(), tmp_path / "w.pt")
    model = build_model(NAME, K, {"pretrained_backbone": str(tmp_path / "w.pt")})
    assert torch.equal(model.net.conv1.weight, source.net.conv1.weight)
    assert model.net.fc.out_features == K
    same = build_model(NAME, 10, {"pretrained_backbone": str(tmp_path / "w.pt")})
    assert torch.equal(same.net.fc.weight, source.net.fc.weight)
    with pytest.raises(FileNotFoundError, match="pretrained_backbone"):
        build_model(NAME, K, {"pretrained_backbone": str(tmp_path / "missing.pt")})


def test_classifier_trains_on_the_synthetic_set(synth: Path):
    torch.manual_seed(0)
    data = ImageFolderDataset(synth / "train")
    model = build_model(NAME, data.num_classes)
    images, targets = zip(*[data[i] for i in range(0, 24, 3)], strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    losses = []
    for _ in range(12):
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


class _Oracle(nn.Module):
    """Knows each image's class (by its bytes); scores it 1 and the others 0, or shifts
    the answer by ``shift`` classes."""

    def __init__(self, data: ImageFolderDataset, shift: int = 0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.k = data.num_classes
        self.answer = {
            data[i][0].numpy().tobytes(): (int(data[i][1]["labels"]) + shift) % self.k
            for i in range(len(data))
        }

    def forward(self, images):
        return [
            {"scores": nn.functional.one_hot(torch.tensor(c), self.k).float(), "labels": c}
            for c in (self.answer[im.numpy().tobytes()] for im in images)
        ]


def test_top1_and_top5(synth: Path):
    data = ImageFolderDataset(synth / "val")
    cpu = torch.device("cpu")
    assert evaluate_classifier(_Oracle(data), data, cpu, batch_size=3) == {
        "top1": 1.0,
        "top5": 1.0,
    }
    # always wrong at top-1; with 4 classes the label is still among the top 5
    assert evaluate_classifier(_Oracle(data, shift=1), data, cpu, 3) == {"top1": 0.0, "top5": 1.0}


# --------------------------------------------------------------------------- pruning


def test_foi_weights_a_classifier_by_its_softmax_confidence():
    feats = [torch.zeros(2, 8, 3, 3)]
    student = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    guide = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    (w,) = object_weights(feats, [student], [guide])
    assert w.shape == (2, 3, 3)
    assert torch.allclose(w[0], torch.full((3, 3), torch.softmax(student[0], 0).max().item()))
    assert torch.allclose(w[1], torch.full((3, 3), 0.5))
    model = build_model(NAME, K).eval()
    rec = FeatureRecorder(model, MODELS[NAME].neck_outputs, MODELS[NAME].cls_logits)
    with torch.no_grad(), rec.record():
        model([torch.rand(3, SIZE, SIZE)])
    assert [tuple(t.shape) for t in rec.logits] == [(1, K)]
    assert [tuple(t.shape) for t in rec.feats] == [(1, 256, 2, 2)]


FAST = {
    "tolerance": 0.02,
    "max_layer_ratio": 0.9,
    "calib_batches": 1,
    # progressive (groupfisher, miep*)
    "interval": 1,
    "steps": 3,
    # dcp
    "batches": 1,
    "aux_batches": 1,
    "aux_iters": 3,
    "select_steps": 1,
    "sgd_iters": 1,
}


def _context(synth: Path) -> PruneContext:
    data = ImageFolderDataset(synth / "train")

    def batches() -> Iterator[tuple[list, list]]:
        epoch = 0
        while True:
            for images, targets in make_loader(data, 4, shuffle=True, seed=0, epoch=epoch):
                yield list(images), list(targets)
            epoch += 1

    torch.manual_seed(0)
    entry = MODELS[NAME]
    spec = checkpoint.model_spec(NAME, data.num_classes, {})
    model = build_model(NAME, data.num_classes, spec["kwargs"])
    with torch.no_grad():  # spread the BN scales as sparse training would
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
    return PruneContext(
        model=model.eval(),
        spec=spec,
        entry=entry,
        options=dict(FAST),
        seed=0,
        device=torch.device("cpu"),
        batches=batches,
        example=checkpoint.example_inputs(spec),
        macs_fn=macs_counter(SIZE, (), 0),
        ignored=list(entry.ignored_layers),
        schedule={"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
    )


# scratch-<m> needs <m>'s pruned model as input (it re-initialises an architecture, it
# does not prune): tests/unit/test_scratch.py runs it on this classifier too
@pytest.mark.parametrize(
    "method", sorted(m for m in METHODS if m != "lcp" and METHODS[m].scratch_of is None)
)
def test_every_method_prunes_the_classifier_to_half_the_flops(
    method: str, synth: Path, tmp_path: Path
):
    ctx = _context(synth)
    base, params = ctx.macs_fn(ctx.model), count_params(ctx.model)
    meth = METHODS[method]
    result = meth.procedure(ctx, meth, 0.5)
    pruned = result.model
    kept = ctx.macs_fn(pruned) / base
    assert abs(kept / 0.5 - 1) <= 0.02, (method, kept)
    assert count_params(pruned) < params
    assert pruned.get_submodule("net.fc").out_features == K
    if method == "miep":  # FOI weighted by the softmax confidence: 0 before pruning
        info = [s["info"] for s in result.report["progress"]]
        assert info[0] == pytest.approx(0.0, abs=1e-5) and all(v > 1e-3 for v in info[1:])
    if method == "dcp":  # classification auxiliary networks after stages 1-3
        assert result.report["dcp"]["aux_features"] == ["net.layer1", "net.layer2", "net.layer3"]
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    pruned.train()
    loss = pruned([image, image.flip(-1)], [{"labels": torch.tensor([c])} for c in (0, 2)])
    assert torch.isfinite(loss["loss_classifier"])
    pruned.eval()
    path = tmp_path / "p.pt"
    checkpoint.save(path, spec=ctx.spec, model=pruned, history=result.history, meta={})
    reloaded, _ = checkpoint.load_model(path)
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(pruned([image])[0]["scores"], reloaded([image])[0]["scores"])


def test_lcp_rejects_a_classifier(synth: Path):
    ctx = _context(synth)
    with pytest.raises(ValueError, match="lcp needs a detector with boxes"):
        METHODS["lcp"].procedure(ctx, METHODS["lcp"], 0.5)


# --------------------------------------------------------------------------- stages


def test_stages_round_trip_on_the_synthetic_classification_set(tiny_config: dict, tmp_path: Path):
    cfg = copy.deepcopy(tiny_config)
    cfg["data"]["source"] = "synth_cls"
    cfg["data"]["synth_cls"] = {
        "num_train": 16,
        "num_val": 8,
        "num_test": 8,
        "image_size": SIZE,
        "num_classes": K,
        "seed": 0,
    }
    cfg["model"] = {"name": NAME, "kwargs": {}, "pretrained_backbone": None}
    cfg["evaluate"]["batch_size"] = 4
    path = write_config(cfg, tmp_path / "c.yaml")
    from detprune.config import load_config

    cfg = load_config(path)
    d = tmp_path / "data"
    cli.main(["data", "synth", "--config", str(path), "--out-dir", str(d)])
    train, test = str(d / "train"), str(d / "test")
    base, pruned, tuned = (str(tmp_path / f"{n}.pt") for n in ("base", "pruned", "tuned"))

    stages.train(cfg, train, train, base)
    model, ckpt = checkpoint.load_model(base)
    assert ckpt["model"]["name"] == NAME and ckpt["model"]["num_classes"] == K
    assert ckpt["meta"]["class_names"] == list(CLASSES[:K])

    record = stages.prune(
        cfg, "l1", 0.5, base, train, train, pruned, str(tmp_path / "summary.json")
    )
    assert abs(record["flops_kept"] / 0.5 - 1) <= 0.02
    stages.finetune(cfg, "l1", pruned, base, train, train, tuned)
    # SAD distillation from the unpruned classifier's stage outputs
    stages.finetune(cfg, "gcp-sad", pruned, base, train, train, str(tmp_path / "sad.pt"))

    out = tmp_path / "metrics.json"
    stages.evaluate_checkpoint(cfg, tuned, test, test, str(out), "l1", 0.5)
    rec = json.loads(out.read_text())
    assert rec["split"] == "test" and "bootstrap" not in rec  # accuracy: no AP resamples
    assert set(rec["metrics"]) == {"top1", "top5"}
    assert 0.0 <= rec["metrics"]["top1"] <= rec["metrics"]["top5"] <= 1.0
    assert rec["detector"] == NAME and rec["method"] == "l1" and rec["flops_target"] == 0.5
    assert rec["cost"]["input_size"] == [SIZE, SIZE]
    assert rec["cost"]["macs"] == pytest.approx(0.5 * count_macs(model, SIZE)["macs"], rel=0.02)
    assert rec["cost"]["params"] == record["params_after"]
    assert "Top-1 accuracy" in rec["coco_summary"]
