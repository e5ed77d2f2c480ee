from pathlib import Path

import pytest
import yaml

from detprune.config import ConfigError, finetune_schedule, load_config


def test_default_config_validates(default_config):
    assert default_config["model"]["name"] == "fasterrcnn_narrow_fpn"
    assert default_config["prune"]["flops_targets"] == [0.5, 0.25, 0.1]


def test_bad_field_is_named_with_the_file(tmp_path: Path, default_config):
    bad = dict(default_config)
    bad["train"] = {**default_config["train"], "lr": -1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.lr" in msg and "-1" in msg


def test_unknown_key_and_shell_unsafe_path_are_rejected(tmp_path: Path, default_config):
    bad = {**default_config, "resutls": "x", "results": "out; rm -rf /"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "resutls" in str(err.value)
    assert "field 'results'" in str(err.value)


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="nope.yaml: config file does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_finetune_schedule_is_keyed_by_method(default_config):
    cfg = dict(default_config)
    cfg["finetune"] = {**cfg["finetune"], "methods": {"l1": {"epochs": 99}}}
    assert finetune_schedule(cfg, "l1")["epochs"] == 99
    assert (
        finetune_schedule(cfg, "other")["epochs"] == default_config["finetune"]["default"]["epochs"]
    )


def test_extends_merges_over_the_base_like_snakemake(tmp_path: Path, root):
    child = tmp_path / "child.yaml"
    child.write_text(
        f"extends: {root / 'config/config.yaml'}\nresults: out\nprune:\n  methods: [l1, slim]\n"
    )
    cfg = load_config(child)
    base = load_config(root / "config/config.yaml")
    assert cfg["results"] == "out" and cfg["prune"]["methods"] == ["l1", "slim"]
    assert cfg["prune"]["flops_targets"] == base["prune"]["flops_targets"]  # kept from base
    assert cfg["train"] == base["train"]


def test_extends_cycle_is_reported(tmp_path: Path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\n")
    b.write_text(f"extends: {a}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


@pytest.mark.parametrize("name", ["miep", "lcp", "gcp"])
def test_method_family_configs_validate_and_name_registered_methods(root, name):
    from detprune.pruning.methods import METHODS

    cfg = load_config(root / "config" / f"{name}.yaml")
    # the default run's folder (its data, baseline and shared methods are reused), own table
    assert cfg["results"] == "results" and cfg["report"]["name"] == name
    assert set(cfg["prune"]["methods"]) <= set(METHODS)


def test_threads_are_one_number_or_one_per_stage(tmp_path: Path, default_config):
    from detprune.workflow import stage_threads

    assert stage_threads(default_config, "train") == 2
    assert stage_threads(default_config, "finetune") == 1
    assert stage_threads({**default_config, "threads": 3}, "evaluate") == 3
    bad = {**default_config, "threads": {"train": 2, "prune": 1}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "threads" in str(err.value)
