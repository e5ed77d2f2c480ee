"""Shared fixtures: the repository root and small configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def default_config() -> dict:
    from detprune.config import load_config

    return load_config(ROOT / "config" / "config.yaml")


TINY = {
    "threads": 1,
    "data": {
        "synth": {
            "num_train": 16,
            "num_val": 8,
            "num_test": 12,
            "image_size": 64,
            "seed": 3,
            "min_objects": 1,
            "max_objects": 3,
        }
    },
    "model": {"kwargs": {"image_size": 64}},
    "train": {"epochs": 1, "batch_size": 4, "warmup_iters": 1, "max_iters_per_epoch": 2},
    "prune": {"methods": ["l1", "slim"], "flops_targets": [0.5]},
    "sparse": {
        "schedule": {"epochs": 1, "batch_size": 4, "warmup_iters": 0, "max_iters_per_epoch": 2}
    },
    "finetune": {
        "default": {"epochs": 1, "batch_size": 4, "warmup_iters": 1, "max_iters_per_epoch": 2}
    },
    "evaluate": {"latency": {"runs": 2, "warmup": 1, "rounds": 2}},
    "report": {"name": "tiny"},
}


@pytest.fixture()
def tiny_config(default_config: dict) -> dict:
    """The default config shrunk so that the whole DAG runs in about a minute."""
    from detprune.config import deep_merge, validate

    cfg = deep_merge(copy.deepcopy(default_config), TINY)
    validate(cfg, "tiny")
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
