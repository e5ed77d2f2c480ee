"""The from-scratch control ``scratch-<m>`` (Liu et al., ICLR 2019): a pruned method's
widths, re-initialised from the registry, reported at the source's FLOPs share.

The sources are one torch-pruning step of the ``l1`` criterion (global) and of ``uniform``
(per-layer) at ratio 0.5, on the default detector, on GFL (one-stage, GroupNorm towers,
learned scales) and on the narrow ResNet classifier, 64 px: no bisection, to keep the
module fast; :func:`from_scratch` only reads the widths, whatever reached them. Each
source is then "trained" (every parameter and BN statistic moved) and goes through a
checkpoint as the prune stage's input would.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from detprune.config import SCRATCH_PREFIX, finetune_schedule, is_scratch
from detprune.models import MODELS, build_model
from detprune.pruning.base import PruneContext
from detprune.pruning.importance.magnitude import l1_importance
from detprune.pruning.methods import METHODS
from detprune.pruning.procedures.oneshot import layer_widths, macs_counter, make_pruner
from detprune.pruning.procedures.scratch import INIT_SEED_OFFSET, from_scratch
from detprune.train import checkpoint

SIZE = 64
FRCNN, GFL = "fasterrcnn_narrow_fpn", "gfl_narrow_fpn"
CLS = "resnet_narrow_cls"
SOURCES = [(FRCNN, "l1"), (FRCNN, "uniform"), (GFL, "l1"), (CLS, "l1")]


def _macs_fn(name: str, spec: dict):
    entry = MODELS[name]
    rois = int(spec["kwargs"].get("rpn_post_nms_top_n_test", 0)) if entry.per_roi_modules else 0
    return macs_counter(SIZE, entry.per_roi_modules, rois)


def _ctx(name: str, spec: dict, model: nn.Module, history: list, seed: int = 0) -> PruneContext:
    entry = MODELS[name]
    return PruneContext(
        model=model,
        spec=spec,
        entry=entry,
        options={"tolerance": 0.02, "max_layer_ratio": 0.9},
        seed=seed,
        device=torch.device("cpu"),
        batches=lambda: iter(()),
        example=checkpoint.example_inputs(spec),
        macs_fn=_macs_fn(name, spec),
        ignored=list(entry.ignored_layers),
        history=history,
    )


def _source(name: str, method: str, tmp: Path) -> dict:
    """``method``'s pruned model (one step at ratio 0.5), its weights moved as training
    would, saved and reloaded as the prune stage loads its input checkpoint."""
    torch.manual_seed(0)
    spec = checkpoint.model_spec(name, 3, {"image_size": SIZE})
    model = build_model(name, 3, spec["kwargs"]).eval()
    macs_fn = _macs_fn(name, spec)
    base = macs_fn(model)
    entry = MODELS[name]
    opts = {"global_pruning": method == "l1", "max_layer_ratio": 0.9}
    with warnings.catch_warnings():  # GFL's learned scales: torch-pruning's notice
        warnings.simplefilter("ignore")
        pruner = make_pruner(
            model,
            checkpoint.example_inputs(spec),
            l1_importance(),
            0.5,
            list(entry.ignored_layers),
            opts,
        )
        pruner.step()
    history = pruner.DG.pruning_history()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": every parameter and BN statistic moves
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    path = tmp / f"{name}_{method}.pt"
    checkpoint.save(path, spec=spec, model=model, history=history, meta={"method": method})
    loaded, ckpt = checkpoint.load_model(path)
    return {
        "name": name,
        "method": method,
        "spec": spec,
        "model": loaded.eval(),
        "history": ckpt["pruning_history"],
        "kept": macs_fn(loaded) / base,
        "widths": layer_widths(loaded),
        "path": path,
    }


def _scratch(src: dict, seed: int = 0, history: list | None = None, target: float | None = None):
    meth = METHODS[f"scratch-{src['method']}"]
    ctx = _ctx(
        src["name"], src["spec"], src["model"], src["history"] if history is None else history, seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return meth.procedure(ctx, meth, src["kept"] if target is None else target)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """``source(name, method)``: built once per module."""
    cache: dict[tuple[str, str], dict] = {}

    def get(name: str, method: str) -> dict:
        if (name, method) not in cache:
            cache[name, method] = _source(name, method, tmp_path_factory.mktemp("scratch"))
        return cache[name, method]

    return get


@pytest.fixture(scope="module", params=SOURCES, ids=[f"{n}-{m}" for n, m in SOURCES])
def pair(request, source):
    src = source(*request.param)
    return src, _scratch(src)


def test_scratch_has_exactly_the_widths_of_its_source(pair):
    src, res = pair
    got = {k: tuple(v.shape) for k, v in res.model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in src["model"].state_dict().items()}
    assert got == want  # same keys, same shapes: every parameter and buffer
    assert layer_widths(res.model) == src["widths"]
    assert src["kept"] < 0.4  # the source really is pruned
    rep = res.report
    assert res.history == []  # the stage appends it to the source's history
    assert rep["flops_kept"] == pytest.approx(src["kept"], rel=1e-12)  # of the unpruned MACs
    assert rep["source_method"] == src["method"] and rep["reinitialised"] is True
    assert rep["params_after"] == sum(p.numel() for p in src["model"].parameters())
    full = build_model(src["name"], 3, src["spec"]["kwargs"])
    assert rep["params_before"] == sum(p.numel() for p in full.parameters())
    # the channels-per-layer figure: [kept, unpruned] for every conv/linear layer
    assert rep["layers"] == {n: [src["widths"][n], w] for n, w in layer_widths(full).items()}
    assert any(k < w for k, w in rep["layers"].values())


def test_no_trained_weight_survives(pair):
    src, res = pair
    source = dict(src["model"].named_parameters())
    for name, p in res.model.named_parameters():
        assert not (p == source[name]).any(), f"{name}: a weight of the source survived"
    for name, m in res.model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean)), name
            assert torch.equal(m.running_var, torch.ones_like(m.running_var)), name
            assert int(m.num_batches_tracked) == 0, name


def test_weights_are_the_registry_init_of_the_kept_channels_rescaled_to_fan_in(pair):
    src, res = pair
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 + INIT_SEED_OFFSET)
        full = build_model(src["name"], 3, src["spec"]["kwargs"]).eval()
    init = checkpoint.apply_history(copy.deepcopy(full), src["spec"], src["history"])
    ref = dict(init.named_parameters())
    rescaled = res.report["rescaled_layers"]
    convs = 0
    for name, m in res.model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        convs += 1
        fan_full = full.get_submodule(name).weight[0].numel()
        fan_kept = m.weight[0].numel()
        factor = math.sqrt(fan_full / fan_kept)
        assert rescaled.get(name, 1.0) == pytest.approx(factor), name
        torch.testing.assert_close(m.weight, factor * ref[f"{name}.weight"])
        if m.bias is not None:  # biases (the focal-loss prior) as initialised
            assert torch.equal(m.bias, ref[f"{name}.bias"]), name
    assert 0 < len(rescaled) < convs  # the stem (3 input channels) keeps its scale
    for name, p in res.model.named_parameters():  # norms, GFL's scales: as initialised
        owner = res.model.get_submodule(name.rsplit(".", 1)[0])
        if not isinstance(owner, (nn.Conv2d, nn.Linear)):
            assert torch.equal(p, ref[name]), name


def test_the_same_seed_gives_the_same_model_another_seed_another(source):
    src = source(FRCNN, "l1")
    a, b, c = (_scratch(src, seed=s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    convs = [k for k, v in a.items() if k.endswith("weight") and v.dim() == 4]
    assert convs and all(not torch.equal(a[k], c[k]) for k in convs)
    # not the baseline's own initialisation either (train: seed, then build): that would be
    # the lottery-ticket setting, not Liu et al.'s random re-initialisation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        own = build_model(FRCNN, 3, src["spec"]["kwargs"]).eval()
    own = checkpoint.apply_history(own, src["spec"], src["history"]).state_dict()
    assert all(not torch.equal(a[k], own[k]) for k in convs)


def test_the_saved_scratch_checkpoint_reloads_with_the_source_widths(pair, tmp_path: Path):
    src, res = pair
    path = tmp_path / "scratch.pt"
    history = list(src["history"]) + list(res.history)  # what the prune stage saves
    checkpoint.save(path, spec=src["spec"], model=res.model, history=history, meta={})
    reloaded, ckpt = checkpoint.load_model(path)
    assert ckpt["pruning_history"] == src["history"]
    sd, ref = reloaded.state_dict(), res.model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    reloaded.train()
    images = list(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)))
    if MODELS[src["name"]].task == "classification":
        target = {"labels": torch.tensor([1])}
    else:
        target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    losses = reloaded(images, [target, target])  # two images: GFL's BN sees P7 at 1 x 1
    assert all(torch.isfinite(v) for v in losses.values())


def test_wrong_inputs_are_refused(source):
    src = source(FRCNN, "l1")
    with pytest.raises(ValueError, match="history is empty"):
        _scratch(src, history=[])
    torch.manual_seed(0)
    baseline = build_model(FRCNN, 3, src["spec"]["kwargs"]).eval()
    with pytest.raises(ValueError, match=r"keeps 1\.0000 of the unpruned"):
        _scratch({**src, "model": baseline}, history=[], target=0.25)
    with pytest.raises(ValueError, match="scratch_of"):
        from_scratch(_ctx(FRCNN, src["spec"], src["model"], src["history"]), METHODS["l1"], 0.25)


def test_the_prune_stage_writes_the_scratch_checkpoint(source, tiny_config: dict, tmp_path: Path):
    from detprune import stages
    from detprune.data.synth import write_synthetic

    write_synthetic(
        tmp_path / "d",
        seed=0,
        num_train=4,
        num_val=2,
        image_size=SIZE,
        min_objects=1,
        max_objects=3,
    )
    src = source(FRCNN, "l1")
    record = stages.prune(
        tiny_config,
        "scratch-l1",
        src["kept"],
        str(src["path"]),
        str(tmp_path / "d/instances_train.json"),
        str(tmp_path / "d/train"),
        str(tmp_path / "s.pt"),
        str(tmp_path / "s.json"),
    )
    assert record["source_method"] == "l1"
    model, ckpt = checkpoint.load_model(tmp_path / "s.pt")
    assert ckpt["pruning_history"] == src["history"]
    assert layer_widths(model) == src["widths"]


def test_finetune_schedule_of_a_scratch_control_is_the_baseline_schedule(default_config):
    cfg = {**default_config, "finetune": {**default_config["finetune"]}}
    assert finetune_schedule(cfg, "scratch-l1") == default_config["train"]
    assert finetune_schedule(cfg, "l1") == default_config["finetune"]["default"]
    cfg["finetune"]["methods"] = {"scratch-l1": {"epochs": 24}, "l1": {"epochs": 3}}
    assert finetune_schedule(cfg, "scratch-l1") == {**default_config["train"], "epochs": 24}
    assert finetune_schedule(cfg, "l1")["epochs"] == 3


def test_every_pruning_method_has_its_scratch_control():
    assert METHODS["scratch-l1"].scratch_of == "l1"
    sources = [n for n, m in METHODS.items() if m.scratch_of is None]
    controls = {n: m for n, m in METHODS.items() if m.scratch_of is not None}
    assert sorted(controls) == sorted(f"{SCRATCH_PREFIX}{n}" for n in sources)
    for name, m in controls.items():
        assert is_scratch(name) and name == SCRATCH_PREFIX + m.scratch_of
        assert m.scratch_of in sources
        assert m.procedure is from_scratch and m.family == "control"
        assert m.sparsity is None and m.distill is None and m.importance is None
        assert "Liu et al. 2019" in m.description
    assert not any(is_scratch(n) for n in sources)


def test_the_config_module_stays_torch_free():
    code = "import sys, detprune.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
