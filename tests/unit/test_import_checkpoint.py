"""model.checkpoint: the baseline from torchvision's detector files or a detprune checkpoint.

Each equality test saves a torchvision detector (random weights, random BatchNorm
statistics) as torchvision ships its COCO files (FrozenBatchNorm2d buffers: no
``num_batches_tracked``), imports it through the stage, and compares the baseline's
detections with torchvision's on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import detection as D
from torchvision.ops.misc import FrozenBatchNorm2d

from detprune.stages import import_baseline
from detprune.train import checkpoint

SIZE = 128


def _frozen(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by FrozenBatchNorm2d (as shipped)."""
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for buf in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buf).copy_(getattr(child, buf).detach())
                setattr(m, child_name, frozen)
    return model


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters, so a dropped one would show: random
    affine parameters, running statistics measured on random images (not 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batch below
    model.backbone.train()
    with torch.no_grad():
        model.backbone(2 * torch.rand(2, 3, SIZE, SIZE, generator=gen) - 0.5)
    model.eval()


def _coco(tmp_path: Path, ids) -> Path:
    ann = tmp_path / "train.json"
    cats = [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in ids]
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    return ann


# name, torchvision builder, registry kwargs, torchvision kwargs (same test-time behaviour)
CASES = {
    "fasterrcnn_r50_fpn": (
        D.fasterrcnn_resnet50_fpn,
        {"box_score_thresh": 0.05},
        {"box_score_thresh": 0.05},
    ),
    "retinanet_r50_fpn": (D.retinanet_resnet50_fpn, {"score_thresh": 0.3}, {"score_thresh": 0.3}),
    "fcos_r50_fpn": (D.fcos_resnet50_fpn, {"score_thresh": 0.3}, {"score_thresh": 0.3}),
}


def _torchvision(name: str, seed: int) -> nn.Module:
    build, _, tv_kwargs = CASES[name]
    torch.manual_seed(seed)
    tv = build(weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE, **tv_kwargs)
    _randomize(tv, seed)
    if name == "fasterrcnn_r50_fpn":  # spread scores (random ones are all ~1/91: ties)
        tv.roi_heads.box_predictor.cls_score.weight.data *= 10
    else:  # scores ~0.5 (not the prior's 0.01); channel 0 (no COCO category, never
        # positive in the shipped files) stays below the threshold
        logits = tv.head.classification_head.cls_logits
        logits.bias.data.zero_()
        logits.bias.data.view(-1, 91)[:, 0] = -50.0
    return _frozen(tv).eval()


def _shipped(tv: nn.Module, path: Path) -> Path:
    state = tv.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in state)
    torch.save(state, path)
    return path


def _config(name: str, ckpt: Path) -> dict:
    kwargs = {"image_size": SIZE, "max_size": SIZE, **CASES[name][1]}
    return {"seed": 0, "model": {"name": name, "kwargs": kwargs, "checkpoint": str(ckpt)}}


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, SIZE, 96, generator=gen), torch.rand(3, 100, SIZE, generator=gen)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_torchvision_file_gives_torchvision_detections(name, tmp_path):
    tv = _torchvision(name, seed=3)
    src = _shipped(tv, tmp_path / "tv.pth")
    out = tmp_path / "baseline.pt"
    info = import_baseline(
        _config(name, src), str(src), str(_coco(tmp_path, range(1, 91))), str(out)
    )
    assert info["kind"] == "torchvision" and info["num_classes"] == 90
    model, ckpt = checkpoint.load_model(out)
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)  # prunable, not frozen
    assert ckpt["pruning_history"] == [] and ckpt["meta"]["source"]["path"] == str(src)
    images = [im.double() for im in _images()]  # float64: see _assert_same_detections
    with torch.no_grad():
        want, got = tv.double()(images), model.double().eval()(images)
    for w, g in zip(want, got, strict=True):
        assert len(w["boxes"]) > 0
        _assert_same_detections(g, w)
    if name == "fasterrcnn_r50_fpn":
        _assert_prunable(model, ckpt["model"], tmp_path)


def _assert_prunable(model: nn.Module, spec: dict, tmp_path: Path) -> None:
    """The FrozenBatchNorm statistics landed in ordinary BatchNorm: torch-pruning shrinks
    a backbone stage of the imported model and the pruned checkpoint reloads."""
    import torch_pruning as tp

    model.float().eval()
    example = checkpoint.example_inputs(spec)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=(example,))
    conv = model.backbone.body.layer1[0].conv1
    dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(16))).prune()
    assert model.backbone.body.layer1[0].bn1.num_features == 48
    pruned = tmp_path / "pruned.pt"
    history = dg.pruning_history()
    checkpoint.save(pruned, spec=spec, model=model, history=history, meta={})
    again, _ = checkpoint.load_model(pruned)
    assert again.backbone.body.layer1[0].bn1.num_features == 48


def _assert_same_detections(got: dict, want: dict) -> None:
    """The same detections, boxes within 1e-4 and scores within 1e-5, in any order among
    equal scores. Both models run in float64: torchvision's FrozenBatchNorm2d folds its
    statistics into one scale and shift, which rounds differently from BatchNorm2d (in
    float32 the features agree to ~2e-5 relative, enough to move an RPN proposal)."""
    assert len(got["boxes"]) == len(want["boxes"])
    torch.testing.assert_close(got["scores"], want["scores"], atol=1e-5, rtol=0)
    diff = (got["boxes"][:, None] - want["boxes"][None]).abs().amax(-1)
    same = (diff <= 1e-4) & (got["labels"][:, None] == want["labels"][None])
    close = (got["scores"][:, None] - want["scores"][None]).abs() <= 1e-5
    match = same & close
    assert bool(match.any(1).all()) and bool(match.any(0).all()), diff.amin(1).max()
    assert int(match.sum()) == len(got["boxes"])  # one to one


def test_coco_80_labels_take_their_category_channels(tmp_path):
    """With COCO's 80 category ids (gaps), label i + 1 reads channel ids[i]."""
    tv = D.fcos_resnet50_fpn(weights=None, weights_backbone=None)
    src = tmp_path / "tv.pth"
    torch.save({k: v for k, v in tv.state_dict().items() if "num_batches" not in k}, src)
    ids = [i for i in range(1, 91) if i % 9 != 0][:80]
    out = tmp_path / "baseline.pt"
    import_baseline(_config("fcos_r50_fpn", src), str(src), str(_coco(tmp_path, ids)), str(out))
    model, _ = checkpoint.load_model(out)
    w = tv.head.classification_head.cls_logits.weight
    got = model.head.classification_head.cls_logits.weight
    assert got.shape[0] == 80 and torch.equal(got, w[torch.tensor(ids)])


def _fasterrcnn_file(tmp_path: Path) -> tuple[dict, Path]:
    tv = D.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    return state, tmp_path / "tv.pth"


def test_missing_unexpected_and_misshaped_keys_are_named_at_once(tmp_path):
    state, path = _fasterrcnn_file(tmp_path)
    del state["backbone.body.layer2.0.conv1.weight"]
    state["backbone.body.extra.weight"] = torch.zeros(1)
    state["rpn.head.conv.0.0.bias"] = torch.zeros(7)
    torch.save(state, path)
    cfg = _config("fasterrcnn_r50_fpn", path)
    with pytest.raises(ValueError) as err:
        import_baseline(cfg, str(path), str(_coco(tmp_path, range(1, 91))), str(tmp_path / "b.pt"))
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys 'backbone.body.layer2.0.conv1.weight'" in msg
    assert "unexpected keys 'backbone.body.extra.weight'" in msg
    assert "'rpn.head.conv.0.0.bias' (7,)" in msg
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("content", ["truncated", "list", "text", "dict"])
def test_a_truncated_or_non_checkpoint_file_is_named(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "truncated":
        torch.save({"a": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "dict":
        torch.save({"epoch": 3, "weights": [1, 2]}, path)
    else:
        path.write_text("not weights\n")
    cfg = _config("fasterrcnn_r50_fpn", path)
    with pytest.raises(ValueError, match="model.checkpoint: .*weights.pth"):
        import_baseline(cfg, str(path), str(_coco(tmp_path, range(1, 91))), str(tmp_path / "b.pt"))


def test_a_project_checkpoint_is_taken_as_is_and_must_match_the_config(tmp_path):
    from detprune.models import build_model

    spec = checkpoint.model_spec("fasterrcnn_narrow_fpn", 3, {"image_size": 64})
    model = build_model(spec["name"], 3, spec["kwargs"])
    src = tmp_path / "own.pt"
    checkpoint.save(src, spec=spec, model=model, history=[], meta={})
    cfg = {"seed": 0, "model": {"name": "fasterrcnn_narrow_fpn", "checkpoint": str(src)}}
    out = tmp_path / "b.pt"
    info = import_baseline(cfg, str(src), str(_coco(tmp_path, [1, 2, 3])), str(out))
    assert info["kind"] == checkpoint.FORMAT
    loaded, ckpt = checkpoint.load_model(out)
    assert ckpt["model"] == spec
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(ValueError, match="own.pt holds fasterrcnn_narrow_fpn with 3 classes"):
        import_baseline(cfg, str(src), str(_coco(tmp_path, [1, 2])), str(out))


def test_the_cli_writes_the_baseline(tmp_path, default_config):
    """`detprune import-checkpoint` (rule import_baseline's command) with the config file."""
    import yaml

    from detprune.cli import main
    from detprune.models import build_model

    spec = checkpoint.model_spec("fasterrcnn_narrow_fpn", 2, {})
    src = tmp_path / "own.pt"
    model = build_model(spec["name"], 2, spec["kwargs"])
    checkpoint.save(src, spec=spec, model=model, history=[], meta={})
    cfg = {**default_config, "model": {**default_config["model"], "checkpoint": str(src)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out, log = tmp_path / "b.pt", tmp_path / "import.log"
    argv = ["import-checkpoint", "--config", str(tmp_path / "config.yaml"), "--weights"]
    argv += [str(src), "--train-ann", str(_coco(tmp_path, [4, 7])), "--out", str(out)]
    main([*argv, "--seed", "3", "--log", str(log)])
    _, ckpt = checkpoint.load_model(out)
    assert ckpt["meta"]["seed"] == 3 and ckpt["meta"]["class_names"] == ["c4", "c7"]
    assert "fasterrcnn_narrow_fpn" in ckpt["meta"]["config"]["model"]["name"]
