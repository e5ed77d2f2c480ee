"""Process control for training: torchrun launch, DDP process groups, data shards,
BatchNorm synchronisation and preemption signals.

Multi-process training follows the linear scaling rule (Goyal et al., "Accurate, Large
Minibatch SGD: Training ImageNet in 1 Hour", 2017): a schedule's ``batch_size`` is the
batch of one process and ``lr`` the learning rate for that batch; with W processes the
global batch is W x ``batch_size`` and the learning rate W x ``lr``. Each process reads the
rank-th stride of the epoch's seeded permutation, so step i of W processes sees exactly
the images of step i of one process with a W times larger batch.

A training process that receives SIGTERM or SIGUSR1 finishes its current iteration,
writes an iteration-exact resume point and exits with :data:`PREEMPTED_EXIT`
(:class:`Preempted`); the next start continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

log = logging.getLogger("detprune.train")

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, try again"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # signals seen by the handlers below, oldest first


class Preempted(SystemExit):
    """Training stopped at a signal after writing its resume point.

    A ``SystemExit`` with code :data:`PREEMPTED_EXIT`: uncaught, the process exits with
    that code, so a scheduler (Snakemake ``retries``, SLURM ``RequeueExit``) can restart it.
    """

    def __init__(self, signum: int, epoch: int, iteration: int) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.signum, self.epoch, self.iteration = signum, epoch, iteration


# ---------------------------------------------------------------- preemption signals


def _record(signum: int, frame: Any) -> None:
    _received.append(signum)


def install_handlers() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying (call early: a signal that arrives during
    start-up stops training after its first iteration)."""
    for sig in SIGNALS:
        signal.signal(sig, _record)


def stop_requested() -> int | None:
    """The first recorded preemption signal of this process, if any."""
    return _received[0] if _received else None


@contextmanager
def preemption_guard() -> Iterator[None]:
    """Record SIGTERM/SIGUSR1 while training runs; restore the previous handlers after.

    Signals received before entering (see :func:`install_handlers`) count too; the record
    is cleared on exit.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _record) for sig in SIGNALS} if main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


# ---------------------------------------------------------------- process groups


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


@dataclass
class DistContext:
    """Rank, world size and device of this training process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> int:
    """WORLD_SIZE as set by torchrun (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_name: str = "auto") -> DistContext:
    """The process group of a torchrun launch (created if needed), else a single process.

    Under torchrun with CUDA each process takes GPU ``LOCAL_RANK`` and NCCL; on the CPU
    the processes talk over gloo.
    """
    device = resolve_device(device_name)
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and env_world() <= 1:
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not initialized:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` itself for one process, else DistributedDataParallel around it."""
    if ctx.world == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when ``flag`` is true on one (a collective: call on all ranks)."""
    if ctx.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective)."""
    if ctx.world == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for all ranks."""
    if ctx.world > 1:
        dist.barrier()


def seed_rank(seed: int, rank: int) -> None:
    """Distinct random streams per rank (augmentation, proposal sampling), fixed by seed."""
    s = seed * 1000 + 7919 * rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The state of every random generator training draws from (CUDA on ``device``)."""
    keys = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys[1].astype(np.int64)),
            "pos": int(keys[2]),
            "has_gauss": int(keys[3]),
            "gauss": float(keys[4]),
        },
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        npk = state["numpy"]
        np.random.set_state(
            (
                "MT19937",
                npk["keys"].numpy().astype(np.uint32),
                npk["pos"],
                npk["has_gauss"],
                npk["gauss"],
            )
        )
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- BatchNorm


def sync_batchnorm(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """Make every BatchNorm of ``model`` a SyncBatchNorm, in place (CUDA + DDP only).

    The modules keep their identity, parameters and state_dict keys (hooks built before
    training, e.g. sparsity regularizers, keep working); only the class changes, so the
    batch statistics are computed over the global batch. :func:`restore_batchnorm` undoes it.
    """
    swapped = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            swapped.append((m, type(m)))
            m.__class__ = nn.SyncBatchNorm
            m.process_group = None
    return swapped


def restore_batchnorm(swapped: list[tuple[nn.Module, type]]) -> None:
    """Give the modules changed by :func:`sync_batchnorm` their class back."""
    for m, cls in swapped:
        m.__class__ = cls
        del m.process_group


# ---------------------------------------------------------------- data shards


def shard(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world: int) -> list[int]:
    """Rank ``rank``'s indices of the epoch's order: the permutation seeded by
    ``seed * 1000 + epoch`` (or 0..n-1), padded by wrapping to a multiple of ``world``,
    then every ``world``-th element from position ``rank``.

    The permutation is the one a shuffling DataLoader with that generator draws (it takes
    one int64 for its worker seed first), so single-process orders match earlier versions.
    """
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        torch.empty((), dtype=torch.int64).random_(generator=gen)
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    size = math.ceil(n / world) * world
    while order and len(order) < size:
        order += order[: size - len(order)]
    return order[rank::world]


class EpochSampler(Sampler[int]):
    """The indices of :func:`shard`, from sample ``start`` to ``stop`` (mid-epoch resume)."""

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        order = shard(n, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world=world)
        self.indices = order[start:stop]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------- torchrun launch


def is_worker() -> bool:
    """True inside a process started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return env_world() > 1


def auto_nproc(device_name: str) -> int:
    """Processes to train with when ``--nproc`` is not given: one per visible GPU when the
    schedule may use CUDA, else 1."""
    if device_name == "cpu" or not torch.cuda.is_available():
        return 1
    return max(1, torch.cuda.device_count())


def _split_threads(argv: Sequence[str], nproc: int) -> list[str]:
    out = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")]
    out = [a for a in out if not a.startswith("--nproc=")]
    for i, arg in enumerate(out):
        if arg == "--threads" and i + 1 < len(out):
            out[i + 1] = str(max(1, int(out[i + 1]) // nproc))
        elif arg.startswith("--threads="):
            out[i] = f"--threads={max(1, int(arg.split('=', 1)[1]) // nproc)}"
    return out


def launch(argv: Sequence[str], nproc: int, entry: str) -> int:
    """Run ``python -m <entry> '<argv as JSON>'`` as ``nproc`` torchrun workers on this
    node (``entry``: the caller's worker module, :mod:`detprune.worker` for the CLI);
    return the exit code (:data:`PREEMPTED_EXIT` when this process was told to stop and
    the workers stopped). ``--threads`` is divided among the workers. SIGTERM/SIGUSR1 sent
    to this process are passed to torchrun as SIGTERM, which forwards it to every worker.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        entry,  # the arguments as one JSON word: torchrun's parser would take --nproc,
        json.dumps(_split_threads(argv, nproc)),  # --log for its own
    ]
    log.info("launching %d training processes: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd)
    forwarded: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        if not forwarded:
            forwarded.append(signum)
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    if _received:  # a signal that came before the workers existed
        forward(_received[0], None)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded and rc != 0:
        return PREEMPTED_EXIT
    return rc
