"""Multi-process training (DDP over gloo on the CPU) under the linear scaling rule.

W processes with batch b and learning rate W*lr take the same steps as one process with
batch W*b and learning rate W*lr: the shards of a step are that step's batch, DDP averages
the gradients. What equality holds:
- a model without BatchNorm and without random sampling: equal to float rounding (1e-5);
- the detector: BatchNorm normalises each process's own images (SyncBatchNorm needs CUDA)
  and the RPN/RoI samplers draw from per-process random streams, so the test freezes
  BatchNorm (eval mode) and samples every anchor and proposal; the remaining difference
  is the losses' per-batch normalisation (anchor/RoI counts differ per image), bounded
  here at 1% of the training update (measured 0.05%); omitting the lr scaling is off by 48%.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader

from detprune.config import load_config
from detprune.data.coco import CocoDetection
from detprune.data.transforms import get_transform
from detprune.models import build_model
from detprune.train import checkpoint
from detprune.train.distributed import PREEMPTED_EXIT, EpochSampler, shard
from detprune.train.engine import epoch_iters, fit
from detprune.utils.io import torch_load
from tests.conftest import write_config
from tests.helpers import BIN, ENV, SCHED, flat, run, synth

# every anchor and proposal is sampled: the samplers' random order does not matter
DET_KWARGS = {
    "image_size": 64,
    "rpn_batch_size_per_image": 100000,
    "box_batch_size_per_image": 100000,
}


def test_shards_of_a_step_are_the_single_process_batch():
    assert shard(5, seed=0, epoch=0, shuffle=False, rank=0, world=2) == [0, 2, 4]
    assert shard(5, seed=0, epoch=0, shuffle=False, rank=1, world=2) == [1, 3, 0]  # wraps
    order = shard(10, seed=4, epoch=3, shuffle=True, rank=0, world=1)
    assert sorted(order) == list(range(10))
    # the order of a shuffling DataLoader seeded with seed * 1000 + epoch
    gen = torch.Generator().manual_seed(4003)
    loader = DataLoader(list(range(10)), batch_size=3, shuffle=True, generator=gen)
    assert order == [i for batch in loader for i in batch.tolist()]
    r0, r1 = (shard(10, seed=4, epoch=3, shuffle=True, rank=r, world=2) for r in (0, 1))
    for step in range(3):  # 2 per process per step against 4 for one process
        assert sorted(r0[2 * step : 2 * step + 2] + r1[2 * step : 2 * step + 2]) == sorted(
            order[4 * step : 4 * step + 4]
        )
    # a mid-epoch resume starts at the sample after the last finished batch
    assert list(EpochSampler(10, seed=4, epoch=3, rank=1, world=2, start=2, stop=4)) == r1[2:4]
    assert epoch_iters(10, 2, world=2) == 3 and epoch_iters(10, 2, world=2, max_iters=2) == 2


class Toy(nn.Module):
    """A detector-shaped regressor without BatchNorm or randomness: counts the boxes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.head = nn.Linear(4, 1)

    def forward(self, images: list, targets: list) -> dict[str, torch.Tensor]:
        x = torch.stack(images)
        pred = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3))).squeeze(1)
        count = torch.tensor([float(len(t["boxes"])) for t in targets])
        return {"loss_count": ((pred - count) ** 2).mean()}


def _frozen_bn_detector(num_classes: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    spec = checkpoint.model_spec("fasterrcnn_narrow_fpn", num_classes, DET_KWARGS)
    model = build_model(spec["name"], spec["num_classes"], spec["kwargs"])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # running statistics, whatever fit asks
            m.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), m)
    return model, spec


def _train_both(root: Path, out: Path, batch: int, lr_scale: float) -> None:
    data = CocoDetection(
        root / "instances_train.json", root / "train", transforms=get_transform("none", True)
    )
    sched = {**SCHED, "batch_size": batch, "lr": SCHED["lr"] * lr_scale}
    toy = Toy()
    fit(
        toy,
        spec={},
        history=[],
        sched=sched,
        train_set=data,
        seed=5,
        out=out / "toy.pt",
        meta={"fingerprint": "toy"},
    )
    det, spec = _frozen_bn_detector(data.num_classes)
    fit(
        det,
        spec=spec,
        history=[],
        sched=sched,
        train_set=data,
        seed=5,
        out=out / "det.pt",
        meta={"fingerprint": "det"},
    )


def _worker(rank: int, world: int, port: int, root: str, out: str, cfg: str) -> None:
    from detprune import stages

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        _train_both(Path(root), Path(out), batch=SCHED["batch_size"], lr_scale=1.0)
        # what `detprune train --nproc 2` runs in each worker, uninterrupted
        train_ann, train_images = f"{root}/instances_train.json", f"{root}/train"
        stages.train(load_config(cfg), train_ann, train_images, f"{out}/stage.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, default_config):
    from detprune.config import deep_merge, validate
    from tests.conftest import TINY

    root = synth(tmp_path_factory.mktemp("ddp_data"), num_train=16)
    two, one, unscaled = (tmp_path_factory.mktemp(n) for n in ("two", "one", "unscaled"))
    # the CLI test's config: per process 2 images a step, 4 steps, hflip (random) on
    cfg = deep_merge(default_config, TINY)
    cfg["train"].update(device="cpu", epochs=1, batch_size=2, max_iters_per_epoch=4)
    validate(cfg, "ddp test")
    cfg_path = write_config(cfg, root / "cfg.yaml")
    args = (2, _free_port(), str(root), str(two), str(cfg_path))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    torch.set_num_threads(1)
    # one process, twice the batch: the lr that the two processes used (2 x lr) ...
    _train_both(root, one, batch=2 * SCHED["batch_size"], lr_scale=2.0)
    # ... and, for contrast, without the scaling
    _train_both(root, unscaled, batch=2 * SCHED["batch_size"], lr_scale=1.0)
    return {k: v for k, v in (("two", two), ("one", one), ("unscaled", unscaled))}, root


def test_two_gloo_processes_equal_one_process_with_the_global_batch(runs):
    dirs, _ = runs
    a = torch_load(dirs["two"] / "toy.pt")  # not a registry model: no checkpoint.load
    b = torch_load(dirs["one"] / "toy.pt")
    init = Toy().state_dict()
    assert not torch.equal(flat(a["state_dict"]), flat(init))  # it trained
    for k in b["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-7)
    # the mean loss of rank 0's shard is not the global mean, but the steps are the same
    assert len(a["meta"]["train_log"]) == len(b["meta"]["train_log"]) == SCHED["epochs"]


def test_detector_under_ddp_matches_one_process_within_the_stated_tolerance(runs):
    dirs, root = runs
    data = CocoDetection(root / "instances_train.json", root / "train")
    init = flat(_frozen_bn_detector(data.num_classes)[0].state_dict())
    two, one, unscaled = (flat(checkpoint.load(dirs[k] / "det.pt")["state_dict"]) for k in dirs)
    update = (one - init).norm()
    assert update > 0
    diff = float((two - one).norm() / update)
    off = float((unscaled - one).norm() / update)
    print(json.dumps({"ddp_vs_one_rel": diff, "unscaled_vs_one_rel": off}))
    assert diff < 0.01, diff  # measured 5e-4
    assert off > 0.3, off  # the tolerance separates a right run from a wrong one


def test_cli_under_torchrun_stops_on_sigterm_and_resumes_to_the_same_checkpoint(runs):
    """`detprune train --nproc 2`: torchrun with 2 gloo workers; SIGTERM to the command
    stops both after the same iteration (exit 75), rank 0 writes one resume point with
    both RNG states, the restart ends with the bytes of an uninterrupted 2-process run."""
    dirs, root = runs
    out, logf = root / "cli.pt", root / "cli.log"
    cmd = [
        str(BIN / "detprune"), "train", "--config", str(root / "cfg.yaml"),
        "--train-ann", str(root / "instances_train.json"), "--train-images", str(root / "train"),
        "--out", str(out), "--threads", "2", "--nproc", "2", "--log", str(logf),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (logf.exists() and "rank 0 of 2" in logf.read_text()):  # workers are up
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == PREEMPTED_EXIT, output[-3000:]
    text = logf.read_text()
    lr = 2 * load_config(root / "cfg.yaml")["train"]["lr"]  # linear scaling: 2 x lr
    assert f"rank 0 of 2 on cpu: global batch 4, lr {lr:g}" in text  # 2 x 2 images
    assert "[rank 1]" not in text  # only rank 0 writes the log file ...
    state = checkpoint.load(f"{out}.resume.pt")  # ... and the resume point
    assert (state["epoch"], state["world"], len(state["rng"])) == (0, 2, 2)
    assert 1 <= state["iteration"] < 4  # mid-epoch (1 unless the signal was slow)
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    run(cmd, cwd=root)
    assert f"at epoch 0, iteration {state['iteration']}" in logf.read_text()
    assert not Path(f"{out}.resume.pt").exists()
    ref = dirs["two"] / "stage.pt"
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(ref.read_bytes()).digest()
    model, ckpt = checkpoint.load_model(out)
    assert len(ckpt["meta"]["train_log"]) == 1
