"""Config errors as a user meets them: `disent config show` and `disent --help` run as commands (exit 2, one
clear message, no traceback). Loading, overrides and checks in-process: tests/unit/test_config.py."""
import subprocess
import sys

import pytest
import yaml

from disent.config import ConfigError, load_config
from tests.support.train_helpers import ROOT


def disent(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "disent.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_config_show_prints_resolved_yaml():
    out = disent("config", "show", "configs/fashion_mnist.yaml", "model.z_dim=32")
    assert out.returncode == 0, out.stderr
    assert "z_dim: 32" in out.stdout
    assert yaml.safe_load(out.stdout)["model"]["z_dim"] == 32


def test_help_lists_commands():
    out = disent("--help")
    assert out.returncode == 0 and "config" in out.stdout


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {ROOT / 'configs/base.yaml'}\nmodel:\n  z_dimm: 8\n")
    out = disent("config", "show", str(bad))
    assert out.returncode == 2
    assert "model.z_dimm" in out.stderr and str(bad) in out.stderr and "model.z_dim" in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_type_names_key_expected_type_and_value():
    out = disent("config", "show", "configs/base.yaml", "train.steps=many")
    assert out.returncode == 2
    assert "train.steps" in out.stderr and "must be int" in out.stderr and "'many'" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_required_value_is_named(tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("name: x\ndata:\n  image_size: 28\n")
    out = disent("config", "show", str(partial))
    assert out.returncode == 2
    assert "missing required config key 'data.url'" in out.stderr


def test_missing_file_and_bad_yaml(tmp_path):
    out = disent("config", "show", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
