"""Training engine: schedule, determinism on the CPU, resume after an interruption."""

from pathlib import Path

import pytest
import torch

from detprune.data.coco import CocoDetection
from detprune.data.synth import write_synthetic
from detprune.data.transforms import get_transform
from detprune.models import build_model
from detprune.train import checkpoint
from detprune.train.engine import fit, lr_factor

SCHED = {
    "epochs": 2,
    "batch_size": 4,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "warmup_iters": 2,
    "schedule": "cosine",
    "augment": "hflip",
    "amp": False,
    "device": "cpu",
    "max_iters_per_epoch": 2,
}


def test_lr_factor_warms_up_then_follows_the_schedule():
    cos = lr_factor({**SCHED, "epochs": 10, "warmup_iters": 10}, iters_per_epoch=10)
    assert cos(0) == pytest.approx(0.001)
    assert cos(10) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.1)).item()))
    assert cos(100) == pytest.approx(0.0, abs=1e-12)
    step = lr_factor(
        {
            **SCHED,
            "epochs": 10,
            "warmup_iters": 0,
            "schedule": "step",
            "milestones": [3, 6],
            "gamma": 0.1,
        },
        iters_per_epoch=5,
    )
    assert [step(i) for i in (0, 14, 15, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(
        root, seed=1, num_train=8, num_val=2, image_size=64, min_objects=1, max_objects=3
    )
    return CocoDetection(
        root / "instances_train.json", root / "train", transforms=get_transform("hflip", train=True)
    )


def _fit(data, out: Path, loss_hook=None):
    torch.manual_seed(0)
    spec = checkpoint.model_spec("fasterrcnn_narrow_fpn", data.num_classes, {"image_size": 64})
    model = build_model(spec["name"], spec["num_classes"], spec["kwargs"])
    fit(
        model,
        spec=spec,
        history=[],
        sched=SCHED,
        train_set=data,
        seed=5,
        out=out,
        meta={"fingerprint": "test"},
        loss_hook=loss_hook,
    )
    return checkpoint.load(out)["state_dict"]


def test_same_seed_same_weights_and_resume_matches_uninterrupted(data, tmp_path: Path):
    a = _fit(data, tmp_path / "a.pt")
    b = _fit(data, tmp_path / "b.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)

    calls = {"n": 0}

    def crash_in_second_epoch(model, images, targets, losses):
        calls["n"] += 1
        if calls["n"] == 3:  # first iteration of epoch 2
            raise KeyboardInterrupt("preempted")
        return losses

    with pytest.raises(KeyboardInterrupt):
        _fit(data, tmp_path / "c.pt", loss_hook=crash_in_second_epoch)
    assert not (tmp_path / "c.pt").exists(), "no half-written final checkpoint"
    resume = checkpoint.load(tmp_path / "c.pt.resume.pt")
    assert resume["epoch"] == 1
    c = _fit(data, tmp_path / "c.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not (tmp_path / "c.pt.resume.pt").exists()


class _Quadratic(torch.nn.Module):
    """``model(images, targets) -> {name: loss}`` with a gradient of norm 2e3 * |w|."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), 1.0))

    def forward(self, images: list, targets: list) -> dict[str, torch.Tensor]:
        return {"loss": 1e3 * self.w.pow(2).sum()}


def test_clip_grad_norm_bounds_each_step():
    from detprune.train.engine import train_one_epoch

    moved = {}
    for clip in (None, 0.5):
        model = _Quadratic()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
        loader = [([torch.zeros(3, 4, 4)], [{}])]
        train_one_epoch(model, opt, sched, loader, torch.device("cpu"), 0, clip=clip)
        moved[clip] = float((model.w.detach() - 1.0).norm())
    assert moved[None] == pytest.approx(0.01 * 2e3 * 2.0)  # lr x |grad| = 0.01 x 4000
    assert moved[0.5] == pytest.approx(0.01 * 0.5)  # lr x the clipped norm


class _HeadHook:
    """A loss hook with a parameter of its own and its optimizer, as LCP's auxiliary head:
    adds ``sum((h * w)^2)``, whose gradient for ``h`` (= 2) is 4 at ``w`` = 1."""

    def __init__(self) -> None:
        self.head = torch.nn.Parameter(torch.full((4,), 2.0))
        self.optimizer = torch.optim.SGD([self.head], lr=0.1)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def __call__(self, model, images, targets, losses):
        return {**losses, "aux": (self.head * model.w).pow(2).sum()}


def _one_step(scaler: torch.amp.GradScaler | None) -> tuple[torch.nn.Module, _HeadHook]:
    from detprune.train.engine import train_one_epoch

    model, hook = _Quadratic(), _HeadHook()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    loader = [([torch.zeros(3, 4, 4)], [{}])]
    train_one_epoch(
        model, opt, sched, loader, torch.device("cpu"), 0, scaler=scaler, loss_hook=hook
    )
    return model, hook


@pytest.mark.parametrize("scale", [None, 2.0**16])
def test_a_loss_hooks_optimizer_steps_on_unscaled_gradients(scale):
    # the engine runs the AMP path (autocast, GradScaler) whenever it gets a scaler; on the
    # CPU here, with element-wise losses that autocast leaves in float32
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    model, hook = _one_step(scaler)
    # the head's step in the same iteration: 2 - lr 0.1 x 4 (scaled: 2 - 0.1 x 4 x 65536)
    assert torch.equal(hook.head.detach(), torch.full((4,), 2.0 - 0.1 * 4.0))
    assert torch.equal(hook.head.grad, torch.full((4,), 4.0))
    # the model's: d/dw (1e3 w^2 + h^2 w^2) = 2e3 + 8
    assert torch.allclose(model.w.detach(), torch.full((4,), 1.0 - 1e-4 * 2008.0))
    if scaler is not None:
        assert scaler.get_scale() == scale  # no inf/NaN: the scale stays


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
def test_an_overflowing_step_is_skipped_for_the_hooks_optimizer_as_for_the_models():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # 4 x 2^126 overflows float32
    model, hook = _one_step(scaler)
    assert torch.equal(hook.head.detach(), torch.full((4,), 2.0))
    assert torch.equal(model.w.detach(), torch.full((4,), 1.0))
    assert scaler.get_scale() == 2.0**125  # backed off, as GradScaler does
