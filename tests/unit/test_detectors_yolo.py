"""YOLOv4 and YOLOv4-tiny: letterbox, target assignment, output layout, GCP's groups; the
CPU configurations train, are evaluated, pruned to 50% FLOPs and reloaded; paper sizes."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from detprune.data.coco import CocoDetection
from detprune.data.synth import write_synthetic
from detprune.evaluation.cost import count_macs, count_params
from detprune.models import MODELS, build_model
from detprune.models.darknet import CSPDarknet53, YOLOv4Neck, yolov4_darknet_convs
from detprune.models.yolo import Letterbox, build_yolov4, split_prediction
from detprune.pruning.importance.magnitude import l1_importance
from detprune.pruning.procedures.oneshot import macs_counter, prune_to_flops
from detprune.train import checkpoint
from detprune.train.engine import evaluate, make_loader, train_one_epoch

SIZE = 64


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def test_letterbox_maps_boxes_there_and_back():
    lb = Letterbox(64)
    image = torch.rand(3, 50, 100)
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1])}
    batch, targets, metas = lb([image], [target])
    # scale 64/100 = 0.64 -> 32x64, padded by 16 rows above and below
    assert batch.shape == (1, 3, 64, 64) and metas == [(0.64, 0, 16, 50, 100)]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[6.4, 22.4, 32.0, 41.6]]))
    assert torch.all(batch[0, :, :16] == 0.5) and torch.all(batch[0, :, 48:] == 0.5)
    back = lb.postprocess([{"boxes": targets[0]["boxes"].clone()}], metas)
    torch.testing.assert_close(back[0]["boxes"], target["boxes"])


def test_each_box_goes_to_its_best_anchor_per_scale():
    # at 608 px (and scale 1) the anchors are yolov4.cfg's own; a 40x28 box at (100, 60)
    model = build_model("yolov4_narrow", 3, {"image_size": 608, "anchor_scale": 1.0})
    gt = torch.tensor([[0.0, 2.0, 80.0, 46.0, 120.0, 74.0]])  # image, label, xyxy
    # scale 0: anchor (40, 28) is an exact fit (IoU 1): anchor 2, cell (x 12, y 7)
    b, a, gj, gi, kept = model.build_targets(0, gt, (76, 76))
    assert (b.tolist(), a.tolist(), gj.tolist(), gi.tolist()) == ([0], [2], [7], [12])
    assert torch.equal(kept, gt)
    # scale 1: best (36, 75), IoU 36*28 / (1120 + 2700 - 1008) = .358 > .213: cell (6, 3)
    b, a, gj, gi, _ = model.build_targets(1, gt, (38, 38))
    assert (b.tolist(), a.tolist(), gj.tolist(), gi.tolist()) == ([0], [0], [3], [6])
    # scale 2: best (142, 110), IoU 1120 / 15620 = .072: not assigned
    assert len(model.build_targets(2, gt, (19, 19))[0]) == 0


def _channel_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each channel of ``a`` with the same channel of ``b``."""
    a, b = (t.transpose(0, 1).flatten(1) for t in (a, b))
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _neck_vs_backbone(overrides: dict) -> list[torch.Tensor]:
    """Per scale, the correlation of each neck output channel with the backbone channel of
    the same index, at initialisation (train-mode BN, 8 random images)."""
    torch.manual_seed(0)
    model = build_model("yolov4_narrow", 6, {"image_size": SIZE, **overrides}).train()
    with torch.no_grad():
        feats = model.backbone(torch.rand(8, 3, SIZE, SIZE))
        outs = model.neck(feats)
    return [_channel_corr(o, f[:, : o.shape[1]]) for o, f in zip(outs, feats, strict=True)]


def test_pass_through_init_starts_every_neck_output_as_its_backbone_feature():
    # exact identities and BN bias 3 (leaky ReLU in its linear part): each output channel
    # is an affine function of the backbone channel it passes through
    for corr in _neck_vs_backbone({"identity_init": 0.0, "neck_bn_bias": 3.0}):
        assert corr.min() > 0.999
    # the CPU entry's start (identities plus 0.1 x the default init): still above 0.9
    for corr in _neck_vs_backbone({}):
        assert corr.min() > 0.9
    # PyTorch's default initialisation scrambles them (mean |corr| 0.05 / 0.08 / 0.15)
    for corr in _neck_vs_backbone({"identity_init": None, "neck_bn_bias": 0.0}):
        assert corr.abs().mean() < 0.25


def test_default_initialisation_is_pytorchs_and_only_the_cpu_entry_changes_it():
    def neck(**kwargs) -> nn.Module:
        torch.manual_seed(0)
        return build_yolov4(6, image_size=SIZE, width=0.25, depth=0.34, **kwargs).neck

    torch.manual_seed(0)  # the same graph built by hand, in build_yolov4's order
    bare = YOLOv4Neck(CSPDarknet53(0.25, 0.34).out_channels)
    conv = "spp.post.0.conv.weight"  # an identity (from the concat's input part) if changed
    assert torch.equal(neck().state_dict()[conv], bare.state_dict()[conv])
    assert not torch.equal(neck(identity_init=0.1).state_dict()[conv], bare.state_dict()[conv])
    biases = [m.bias for m in neck().modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(float(b.detach().abs().max()) == 0 for b in biases)
    for name in ("yolov4_416", "yolov4_tiny", "yolov4_tiny_narrow"):
        assert not {"identity_init", "neck_bn_bias", "anchor_scale"} & set(MODELS[name].defaults)
    narrow = MODELS["yolov4_narrow"].defaults
    assert (narrow["anchor_scale"], narrow["identity_init"], narrow["neck_bn_bias"]) == (2, 0.1, 3)


def test_cpu_anchors_give_each_scale_a_share_of_the_embedded_boxes(tmp_path: Path):
    # the default run's synthetic set (128 px, 2-6 objects); the level of each box's best
    # anchor (width-height IoU over the nine), as build_targets' darknet rule uses it
    write_synthetic(tmp_path, seed=0, num_train=100, num_val=1, image_size=128,
                    min_objects=2, max_objects=6)  # fmt: skip
    boxes = CocoDetection(tmp_path / "instances_train.json", tmp_path / "train")
    wh = torch.cat([boxes[i][1]["boxes"] for i in range(len(boxes))])
    wh = wh[:, 2:] - wh[:, :2]

    def shares(overrides: dict) -> list[float]:
        anchors = build_model("yolov4_narrow", 6, overrides).anchors
        inter = torch.minimum(wh[:, None], anchors[None]).prod(-1)
        iou = inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)
        level = iou.argmax(1) // 3
        return [float((level == k).float().mean()) for k in range(3)]

    assert min(shares({})) > 0.1  # the entry's anchors (x2): 17 / 21 / 63 % on 600 images
    assert shares({"anchor_scale": 1.0})[0] < 0.01  # yolov4.cfg's at 128 px: none at stride 8


def test_class_logits_are_channels_5_on_of_each_anchor():
    k = 3
    out = torch.arange(3 * (5 + k), dtype=torch.float32).view(1, -1, 1, 1).expand(2, -1, 2, 2)
    pred = split_prediction(out, 3)
    assert pred.shape == (2, 3, 2, 2, 5 + k)
    assert pred[0, 1, 0, 0, 4].item() == 1 * (5 + k) + 4  # objectness of anchor 1
    assert pred[0, 2, 1, 1, 5:].tolist() == [21.0, 22.0, 23.0]  # its classes


def test_groups_mirror_gcp_darknet_split():
    model = build_model("yolov4_narrow", 3, {"depth": 1.0})  # the full-depth graph
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    darknet = {i: f"{p}.conv" if not p.startswith("head.preds") else p
               for i, p in yolov4_darknet_convs().items()}  # fmt: skip
    assert len(darknet) == 110 and set(darknet.values()) == convs
    bounds = [0, 56, 86, 117, 137, 162]
    groups = MODELS["yolov4_416"].groups
    sizes = []
    for g, (name, prefixes) in enumerate(groups.items()):
        inside = {
            i for i, path in darknet.items() if any(path.startswith(p + ".") for p in prefixes)
        }
        assert inside == {i for i in darknet if bounds[g] <= i < bounds[g + 1]}, name
        sizes.append(len(inside))
    assert sizes == [39, 20, 19, 14, 18]  # convs per group, 110 in all


def tapped_shapes(model: nn.Module, paths: list[str], size: int) -> dict[str, list]:
    """Output shapes of the modules at ``paths`` in one eval forward pass."""
    shapes: dict[str, list] = {}
    handles = []
    for path in paths:

        def hook(_m, _i, out, path=path):
            outs = out if isinstance(out, (list, tuple)) else [out]
            shapes[path] = [tuple(o.shape) for o in outs]

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    with torch.no_grad():
        model.eval()([torch.rand(3, size, size)])
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize(("name", "paper"), [("yolov4_narrow", "yolov4_416"),
                                             ("yolov4_tiny_narrow", "yolov4_tiny")])  # fmt: skip
def test_declared_taps_exist_with_their_strides(name: str, paper: str):
    entry = MODELS[name]
    for field in ("ignored_layers", "cls_logits", "aux_features", "groups", "distill_taps"):
        assert getattr(entry, field) == getattr(MODELS[paper], field)
    model = build_model(name, 4, {"image_size": SIZE})
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:  # the groups split the convs
        owners = [g for g, ps in entry.groups.items() if any(_under(conv, p) for p in ps)]
        assert len(owners) == 1, (conv, owners)
    aux = dict(entry.aux_features)
    paths = [*aux, *entry.neck_outputs, *entry.cls_logits, *entry.distill_taps]
    shapes = tapped_shapes(model, paths, SIZE)
    for path, stride in aux.items():
        assert shapes[path][0][-1] == SIZE // stride, path
    strides = model.strides
    assert [s[-1] for s in shapes["neck"]] == [SIZE // s for s in strides]
    for path, stride in zip(entry.cls_logits, strides, strict=True):
        assert shapes[path] == [(1, 3 * (5 + 4), SIZE // stride, SIZE // stride)]
    assert entry.per_roi_modules == () and entry.image_size == 128


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(
        root, seed=2, num_train=8, num_val=4, image_size=SIZE, min_objects=1, max_objects=3
    )
    train = CocoDetection(root / "instances_train.json", root / "train")
    val = CocoDetection(root / "instances_val.json", root / "val")
    return train, val


def check_detector(name: str, data, tmp_path: Path, lr: float) -> None:
    """Train a few iterations (loss falls), evaluate, prune to 50% FLOPs, reload."""
    torch.manual_seed(0)
    train, val = data
    spec = checkpoint.model_spec(name, train.num_classes, {"image_size": SIZE})
    model = build_model(name, train.num_classes, spec["kwargs"])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cpu = torch.device("cpu")
    means = [
        train_one_epoch(model, opt, sched, make_loader(train, 4, shuffle=False, seed=0), cpu, e)
        for e in range(4)
    ]
    assert means[-1]["loss"] < 0.9 * means[0]["loss"], [m["loss"] for m in means]

    metrics, _ = evaluate(model, val, cpu, batch_size=4)
    assert metrics["AP"] is not None and 0.0 <= metrics["AP"] <= 1.0

    entry = MODELS[name]
    macs_fn = macs_counter(SIZE, entry.per_roi_modules, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning's shape-inference depth note
        result = prune_to_flops(
            model.eval(),
            importance=l1_importance(),
            target=0.5,
            example=checkpoint.example_inputs(spec),
            ignored=list(entry.ignored_layers),
            macs_fn=macs_fn,
        )
    pruned = result.model
    assert abs(macs_fn(pruned) / macs_fn(model) / 0.5 - 1) <= 0.02
    assert count_params(pruned) < 0.8 * count_params(model)
    layers = result.report["layers"]
    assert sum(after < before for after, before in layers.values()) >= len(layers) // 2
    for layer in entry.ignored_layers:
        assert layers[layer][0] == layers[layer][1]

    images, targets = next(iter(make_loader(train, 2, shuffle=False, seed=0)))
    pruned.train()
    losses = pruned(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())

    path = tmp_path / "pruned.pt"
    checkpoint.save(path, spec=spec, model=pruned, history=result.history, meta={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded, _ = checkpoint.load_model(path)
    assert count_params(reloaded) == count_params(pruned)
    pruned.eval()
    reloaded.eval()
    pruned.score_thresh = reloaded.score_thresh = 0.0  # compare non-empty detections
    with torch.no_grad():
        a, b = pruned(images), reloaded(images)
    for da, db in zip(a, b, strict=True):
        assert set(da) == {"boxes", "scores", "labels"} and len(da["boxes"]) > 0
        assert torch.equal(da["boxes"], db["boxes"]) and torch.equal(da["scores"], db["scores"])


def test_yolov4_narrow_trains_evaluates_prunes_and_reloads(data, tmp_path: Path):
    torch.set_num_threads(1)
    check_detector("yolov4_narrow", data, tmp_path, lr=0.05)


def test_yolov4_tiny_narrow_trains_evaluates_prunes_and_reloads(data, tmp_path: Path):
    torch.set_num_threads(1)
    check_detector("yolov4_tiny_narrow", data, tmp_path, lr=0.05)


def test_yolov4_416_has_the_published_size():
    torch.set_num_threads(1)
    # GCP+SAD paper, YOLOv4 on VOC (20 classes) at 416: 64.0M parameters, 59.7 GFLOPs,
    # which is 2 x MACs (29.83 G MACs here; darknet's BFLOPs count 2 per MAC as well)
    voc = build_model("yolov4_416", 20)
    assert count_params(voc) == pytest.approx(64.0e6, rel=0.05)
    assert 2 * count_macs(voc, 416)["macs"] == pytest.approx(59.7e9, rel=0.05)
    # darknet's yolov4.cfg (COCO, 80 classes) at 416: 64.36M parameters, 60.1 BFLOPs
    # (AlexeyAB/darknet's printed count); 64.363M and 60.10 here
    coco = build_model("yolov4_416", 80)
    assert count_params(coco) == pytest.approx(64.36e6, rel=0.05)
    assert 2 * count_macs(coco, 416)["macs"] == pytest.approx(60.1e9, rel=0.05)


def test_yolov4_tiny_has_the_published_size():
    # darknet's yolov4-tiny.cfg (COCO) at 416: 6.06M parameters, 6.9 BFLOPs (2 x MACs)
    tiny = build_model("yolov4_tiny", 80)
    assert count_params(tiny) == pytest.approx(6.06e6, rel=0.05)
    assert 2 * count_macs(tiny, 416)["macs"] == pytest.approx(6.9e9, rel=0.05)
    assert [p.out_channels for p in tiny.head.preds] == [255, 255]


def test_images_without_objects_train_as_background_only():
    model = build_model("yolov4_tiny_narrow", 3, {"image_size": SIZE}).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([torch.rand(3, SIZE, SIZE)] * 2, [empty, empty])
    assert losses["loss_box"].item() == 0 and losses["loss_cls"].item() == 0
    assert losses["loss_obj"].item() > 0
    sum(losses.values()).backward()
