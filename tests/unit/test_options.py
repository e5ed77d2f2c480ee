"""Declared options: a typo or a wrong type in a method's, regularizer's, distillation's
or model's options fails when the config loads (CLI and Snakemake), naming the field,
its owner and the accepted keys; nothing of that imports torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detprune.config import ConfigError, deep_merge, load_config, validate
from detprune.pruning.methods import METHODS, options_of
from detprune.pruning.procedures.options import PROGRESSIVE, SHARED
from detprune.utils.options import Option, defaults, problems
from tests.conftest import write_config

BIN = Path(sys.executable).parent


def _load(tmp_path: Path, default_config: dict, override: dict) -> dict:
    return load_config(write_config(deep_merge(default_config, override), tmp_path / "c.yaml"))


def _error(tmp_path: Path, default_config: dict, override: dict) -> str:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, default_config, override)
    return str(err.value)


def test_an_unknown_method_option_names_the_field_the_method_and_the_accepted_keys(
    tmp_path, default_config
):
    msg = _error(tmp_path, default_config, {"prune": {"options": {"miep": {"iri_ratoi": 0.05}}}})
    assert "field 'prune.options.miep.iri_ratoi': unknown option of method 'miep'" in msg
    assert "accepted keys: calib_batches, channels_per_step, clip_grad_norm," in msg
    assert "iri_ratio" in msg and str(tmp_path / "c.yaml") in msg


def test_a_method_option_of_the_wrong_type_is_refused(tmp_path, default_config):
    msg = _error(tmp_path, default_config, {"prune": {"options": {"miep": {"iri_ratio": "0.2"}}}})
    assert "field 'prune.options.miep.iri_ratio': method 'miep' expects a number, got '0.2'" in msg
    msg = _error(tmp_path, default_config, {"prune": {"options": {"dcp": {"batches": True}}}})
    assert "field 'prune.options.dcp.batches': method 'dcp' expects an integer, got True" in msg
    msg = _error(tmp_path, default_config, {"prune": {"options": {"gcp": {"fractions": [0.5]}}}})
    assert "'prune.options.gcp.fractions': method 'gcp' expects a mapping or null" in msg


def test_a_valid_override_loads_and_reaches_the_procedure(tmp_path, default_config):
    override = {"iri_ratio": 0.2, "interval": 3, "clip_grad_norm": None, "tolerance": 0.05}
    cfg = _load(tmp_path, default_config, {"prune": {"options": {"miep": override}}})
    assert cfg["prune"]["options"]["miep"] == override
    from detprune.pruning.procedures.progressive import resolve_options

    opts = resolve_options(METHODS["miep"], cfg["prune"]["options"]["miep"])
    assert (opts["iri_ratio"], opts["interval"], opts["clip_grad_norm"]) == (0.2, 3, None)
    assert opts["iri"] and opts["foi"]  # MIEP's preset, untouched
    # an integer is a number; the shared prune keys may be set per method
    _load(tmp_path, default_config, {"prune": {"options": {"l1": {"max_layer_ratio": 1}}}})


def test_unknown_names_fail_at_load(tmp_path, default_config):
    msg = _error(tmp_path, default_config, {"prune": {"methods": ["l1", "mlep"]}})
    assert "field 'prune.methods.1': unknown method 'mlep'; known:" in msg
    msg = _error(tmp_path, default_config, {"prune": {"options": {"mlep": {"steps": 1}}}})
    assert "field 'prune.options.mlep': unknown method 'mlep'" in msg
    msg = _error(tmp_path, default_config, {"model": {"name": "fasterrcnn_nope"}})
    assert "field 'model.name': unknown model 'fasterrcnn_nope'; known:" in msg
    assert "fasterrcnn_narrow_fpn" in msg


def test_regularizer_distillation_and_model_options_are_checked(tmp_path, default_config):
    msg = _error(tmp_path, default_config, {"sparse": {"regularizers": {"bn_l1": {"rate": 1}}}})
    assert "'sparse.regularizers.bn_l1.rate': unknown option of regularizer 'bn_l1'" in msg
    assert "accepted keys: s" in msg
    msg = _error(tmp_path, default_config, {"sparse": {"regularizers": {"bn_l2": {"s": 1}}}})
    assert "'sparse.regularizers.bn_l2': unknown regularizer 'bn_l2'" in msg
    sad = {"finetune": {"methods": {"gcp-sad": {"distill_options": {"temprature": 2.0}}}}}
    msg = _error(tmp_path, default_config, sad)
    assert "'finetune.methods.gcp-sad.distill_options.temprature': unknown option of " in msg
    assert "distillation 'sad'; accepted keys: box_taps, box_weight, kl_weight," in msg
    plain = {"finetune": {"methods": {"l1": {"distill_options": {"temperature": 2.0}}}}}
    msg = _error(tmp_path, default_config, plain)
    assert "'finetune.methods.l1.distill_options': set, but method 'l1' is fine-tuned " in msg
    msg = _error(tmp_path, default_config, {"finetune": {"methods": {"l1": {"distill": "kd"}}}})
    assert "'finetune.methods.l1.distill': unknown distillation 'kd'; known: lcp, sad" in msg
    msg = _error(tmp_path, default_config, {"model": {"kwargs": {"image_sise": 64}}})
    assert "'model.kwargs.image_sise': unknown option of model 'fasterrcnn_narrow_fpn'" in msg
    msg = _error(tmp_path, default_config, {"model": {"kwargs": {"image_size": "64"}}})
    assert "'model.kwargs.image_size': model 'fasterrcnn_narrow_fpn' expects an integer" in msg
    # valid ones load: an lcp override, a default SAD option, a model setting
    ok = {
        "finetune": {
            "default": {"distill_options": {"temperature": 2.0}},
            "methods": {"lcp": {"distill_options": {"weight": 0.5, "m": 2}}},
        },
        "prune": {"methods": ["l1", "gcp-sad", "lcp"]},
        "model": {"kwargs": {"image_size": 64, "widths": [8, 16, 32, 64]}},
    }
    _load(tmp_path, default_config, ok)


def test_validate_reports_the_schema_first(default_config):
    bad = deep_merge(default_config, {"finetune": {"methods": {"l1": {"epohcs": 3}}}})
    with pytest.raises(ConfigError, match=r"field 'finetune.methods.l1': Additional properties"):
        validate(bad, "x")


def test_declarations_hold_their_own_defaults_and_every_method_declares_its_keys():
    for name, method in METHODS.items():
        declared = options_of(method)
        assert set(SHARED) <= set(declared), name
        assert not problems("x", defaults(declared), declared, name), name
        assert not problems("x", dict(method.preset), declared, name), name
    assert options_of(METHODS["groupfisher"]) is PROGRESSIVE
    assert Option(1.0).accepts(1) and not Option(1).accepts(1.5)
    assert not Option(1).accepts(True) and Option(True).accepts(False)
    assert Option(None, (object,)).accepts(True)


def test_the_torch_free_tables_match_the_registries():
    from detprune.config import DISTILL_OPTIONS
    from detprune.models.catalog import catalog_text
    from detprune.train.distill import DISTILLERS
    from detprune.train.options import REGULARIZER_OPTIONS
    from detprune.train.sparsity import REGULARIZERS

    assert set(REGULARIZER_OPTIONS) == set(REGULARIZERS)
    assert set(DISTILL_OPTIONS) == set(DISTILLERS)
    committed = Path(__file__).parents[2] / "src/detprune/schemas/models.yaml"
    assert committed.read_text() == catalog_text(), (
        "src/detprune/schemas/models.yaml is stale: python -m detprune.models.catalog"
    )
    for method in METHODS.values():  # every lazy reference resolves
        for fn in (method.importance, method.procedure):
            assert fn is None or callable(fn)


def test_the_config_check_and_the_workflow_plan_do_not_import_torch(root):
    code = (
        "import sys\n"
        "from detprune import config, experiments, workflow\n"
        "cfg = config.load_config('config/config.yaml')\n"
        "[workflow.finetune_rule(cfg, m) for m in cfg['prune']['methods']]\n"
        "workflow.regularizers(cfg)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_a_dry_run_with_a_typo_fails_within_seconds_naming_the_field(
    root, default_config, tmp_path
):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(root / "Snakefile", proj / "Snakefile")
    shutil.copytree(root / "workflow", proj / "workflow")
    cfg = deep_merge(default_config, {"prune": {"options": {"miep": {"iri_ratoi": 0.05}}}})
    cfg["prune"]["methods"] = ["l1", "miep"]
    write_config(cfg, proj / "config" / "config.yaml")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.monotonic()
    res = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--cores", "1", "--quiet"],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "field 'prune.options.miep.iri_ratoi': unknown option of method 'miep'" in out
    assert "accepted keys: calib_batches, channels_per_step," in out and "iri_ratio" in out
    assert elapsed < 30, elapsed
