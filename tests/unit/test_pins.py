"""Dependency versions are pinned once (pyproject.toml); environment.yml must agree."""

import tomllib

import yaml


def test_environment_yml_matches_pyproject(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pinned = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) == pinned
    assert all("==" in p for p in pinned), "every dependency is pinned exactly"
    assert "python=3.11" in env["dependencies"]
