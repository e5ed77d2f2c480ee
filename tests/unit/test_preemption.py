"""Preemption: a `detprune train` process stopped by SIGUSR1/SIGTERM writes an
iteration-exact resume point, exits 75, and the restarted run ends bitwise-identical
(checkpoint file sha256) to an uninterrupted one."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from pathlib import Path

import pytest

from detprune.train import checkpoint
from detprune.train.distributed import PREEMPTED_EXIT
from tests.conftest import write_config
from tests.helpers import BIN, ENV, run, synth


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_config):
    from detprune.config import deep_merge, validate
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("preempt")
    root = synth(tmp / "data", num_train=8)
    cfg = deep_merge(default_config, TINY)
    # 2 epochs of 4 iterations; hflip draws random numbers, so the RNG state must resume too
    cfg["train"].update(
        device="cpu", epochs=2, batch_size=2, max_iters_per_epoch=4, augment="hflip"
    )
    validate(cfg, "preemption test")
    return tmp, root, write_config(cfg, tmp / "cfg.yaml")


def _cmd(root: Path, cfg: Path, out: Path, logf: Path) -> list[str]:
    return [
        str(BIN / "detprune"), "train", "--config", str(cfg),
        "--train-ann", str(root / "instances_train.json"), "--train-images", str(root / "train"),
        "--out", str(out), "--threads", "1", "--log", str(logf),
    ]  # fmt: skip


def _interrupt(cmd: list[str], logf: Path, sig: int, after: str | None) -> str:
    """Start ``cmd``, send ``sig`` once the log exists (signal handlers are in place before
    it is created) or, with ``after``, once the log contains that text; expect exit 75."""
    logf.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (logf.exists() and (after is None or after in logf.read_text())):
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.02)
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == PREEMPTED_EXIT, out[-3000:]
    return logf.read_text()


def test_signal_mid_epoch_then_restart_gives_the_uninterrupted_checkpoint(setup):
    tmp, root, cfg = setup
    ref, out, logf = tmp / "ref.pt", tmp / "run.pt", tmp / "run.log"
    run(_cmd(root, cfg, ref, tmp / "ref.log"), cwd=tmp)
    resume = Path(f"{out}.resume.pt")
    cmd = _cmd(root, cfg, out, logf)

    # 1. SIGUSR1 (SLURM's warning signal) during start-up: one iteration, then stop
    text = _interrupt(cmd, logf, signal.SIGUSR1, after=None)
    assert f"stopping on signal {int(signal.SIGUSR1)} at epoch 0, iteration 1" in text
    state = checkpoint.load(resume)
    assert (state["epoch"], state["iteration"], state["world"]) == (0, 1, 1)
    assert set(state["sums"]) >= {"loss", "loss_classifier"}  # the epoch's running means
    assert not out.exists()

    # 2. SIGTERM once epoch 0 is done: the restart resumed at iteration 1, stops in epoch 1
    text = _interrupt(cmd, logf, signal.SIGTERM, after="epoch 0:")
    assert "resumed from" in text and "at epoch 0, iteration 1" in text
    state = checkpoint.load(resume)
    assert state["epoch"] == 1 and 0 <= state["iteration"] < 4
    assert len(state["log"]) == 1

    # 3. the last start finishes: same bytes as the run that was never interrupted
    run(cmd, cwd=tmp)
    assert f"at epoch 1, iteration {state['iteration']}" in logf.read_text()
    assert not resume.exists()
    assert _sha(out) == _sha(ref)
    a, b = checkpoint.load(ref), checkpoint.load(out)
    assert a["meta"]["train_log"] == b["meta"]["train_log"]
