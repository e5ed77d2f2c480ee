"""Methods through the pruning core on the registry detector; adding a method."""

from pathlib import Path

import pytest
import torch
import torch_pruning as tp

from detprune import stages
from detprune.models import MODELS, build_model
from detprune.pruning.base import Method, PruneContext
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.oneshot import macs_counter
from detprune.train import checkpoint

NAME = "fasterrcnn_narrow_fpn"


def _ctx(model, spec, options=None) -> PruneContext:
    entry = MODELS[NAME]
    return PruneContext(
        model=model,
        spec=spec,
        entry=entry,
        options={"tolerance": 0.02, "max_layer_ratio": 0.9, **(options or {})},
        seed=0,
        device=torch.device("cpu"),
        batches=lambda: iter(()),
        example=checkpoint.example_inputs(spec),
        macs_fn=macs_counter(64, entry.per_roi_modules, 100),
        ignored=list(entry.ignored_layers),
    )


def test_uniform_keeps_the_same_share_in_every_layer():
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 3, {"image_size": 64})
    model = build_model(NAME, 3, spec["kwargs"]).eval()
    method = METHODS["uniform"]
    result = method.procedure(_ctx(model, spec), method, 0.5)
    ignored = set(MODELS[NAME].ignored_layers)
    shares = {
        n: kept / orig for n, (kept, orig) in result.report["layers"].items() if n not in ignored
    }
    pruned = {n: s for n, s in shares.items() if s < 1}
    assert len(pruned) == len(shares), "every prunable layer is pruned"
    keep = 1 - result.report["ratio"]  # the same share for every layer, up to one channel
    for name, (_, orig) in result.report["layers"].items():
        if name in pruned:
            assert abs(pruned[name] - keep) <= 1.0 / orig + 1e-9, name
    assert result.report["allocation"] == "per-layer"
    assert abs(result.report["flops_kept"] / 0.5 - 1) <= 0.02


def test_global_l1_allocates_unevenly():
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 3, {"image_size": 64})
    model = build_model(NAME, 3, spec["kwargs"]).eval()
    method = METHODS["l1"]
    result = method.procedure(_ctx(model, spec), method, 0.5)
    shares = [k / o for k, o in result.report["layers"].values() if k < o]
    assert max(shares) - min(shares) > 0.1


def l2_importance(ctx):
    """Group L2 magnitude (a user's own criterion for this test)."""
    return tp.importance.GroupMagnitudeImportance(p=2)


def test_a_user_adds_a_method_with_one_callable_and_one_entry(
    monkeypatch, tiny_config, tmp_path: Path
):
    monkeypatch.setitem(METHODS, "my-l2", Method("my L2 criterion", l2_importance))
    from detprune.data.synth import write_synthetic

    write_synthetic(
        tmp_path / "d", seed=0, num_train=4, num_val=2, image_size=64, min_objects=1, max_objects=3
    )
    spec = checkpoint.model_spec(NAME, 6, {"image_size": 64})
    base = tmp_path / "base.pt"
    checkpoint.save(
        base, spec=spec, model=build_model(NAME, 6, spec["kwargs"]), history=[], meta={}
    )
    record = stages.prune(
        tiny_config,
        "my-l2",
        0.25,
        str(base),
        str(tmp_path / "d/instances_train.json"),
        str(tmp_path / "d/train"),
        str(tmp_path / "p.pt"),
        str(tmp_path / "p.json"),
    )
    assert record["method"] == "my-l2"
    assert abs(record["flops_kept"] / 0.25 - 1) <= 0.02
    model, ckpt = checkpoint.load_model(tmp_path / "p.pt")
    assert sum(p.numel() for p in model.parameters()) == record["params_after"]
    assert ckpt["meta"]["method"] == "my-l2"


@pytest.mark.parametrize("method", ["random", "fpgm", "taylor", "slim", "depgraph"])
def test_baselines_reach_the_target_on_the_detector(method, tmp_path: Path, tiny_config):
    from detprune.data.synth import write_synthetic

    write_synthetic(
        tmp_path / "d", seed=0, num_train=4, num_val=2, image_size=64, min_objects=1, max_objects=3
    )
    torch.manual_seed(0)
    spec = checkpoint.model_spec(NAME, 6, {"image_size": 64})
    model = build_model(NAME, 6, spec["kwargs"])
    with torch.no_grad():  # spread the BN scales as sparse training would
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.01, 1.0)
    base = tmp_path / "base.pt"
    checkpoint.save(base, spec=spec, model=model, history=[], meta={})
    cfg = {
        **tiny_config,
        "prune": {**tiny_config["prune"], "calib_batches": 1},
        "train": {**tiny_config["train"], "batch_size": 2},
    }
    record = stages.prune(
        cfg,
        method,
        0.1,
        str(base),
        str(tmp_path / "d/instances_train.json"),
        str(tmp_path / "d/train"),
        str(tmp_path / "p.pt"),
        str(tmp_path / "p.json"),
    )
    assert abs(record["flops_kept"] / 0.1 - 1) <= 0.02
    model, _ = checkpoint.load_model(tmp_path / "p.pt")
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    assert out[0]["boxes"].shape[-1] == 4
