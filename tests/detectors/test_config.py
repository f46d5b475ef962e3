"""Dataclass configs: YAML defaults (safe_load), command-line precedence, errors."""

import math

import pytest

from detectors.common.config import parse_config
from detectors.fcos.train import FCOSConfig


def test_yaml_then_command_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: some/dir\nepochs: 3\nassigner: uot\ntau1: inf\neps: 0.2\n")
    cfg = parse_config(FCOSConfig, ["--config", str(cfg_file), "--epochs", "5", "--no-amp"])
    assert cfg.data == "some/dir" and cfg.epochs == 5 and cfg.assigner == "uot"
    assert math.isinf(cfg.tau1) and cfg.eps == 0.2 and cfg.amp is False


def test_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nepoch: 3\n")
    with pytest.raises(SystemExit):
        parse_config(FCOSConfig, ["--config", str(bad)])
    assert "unknown keys ['epoch']" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit):
        parse_config(FCOSConfig, ["--config", str(tmp_path / "list.yaml")])
    assert "expected a mapping" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(FCOSConfig, ["--data", "x", "--epochs", "0"])
    assert "--epochs and --batch-size must be >= 1" in capsys.readouterr().err
