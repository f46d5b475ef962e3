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
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ('epochs: "two"', "epochs must be an integer, got 'two'"),
        ('lr: "fast"', "lr must be a number, got 'fast'"),
        ("epochs: 1.5", "epochs must be an integer, got 1.5"),
        ("assigner: hungarian", "assigner must be one of"),
        ('amp: "no"', "amp must be true or false, got 'no'"),
        ("depth: 19", r"depth must be one of \[18, 34, 50\], got 19"),
        ("tau1: -1", "tau1 must be >= 0"),
    ],
)
def test_yaml_values_get_the_command_lines_checks(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: x\n{yaml_text}\n")
    with pytest.raises(SystemExit) as exc:
        parse_config(FCOSConfig, ["--config", str(path), "--assigner", "uot"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err


def test_yaml_numbers_as_yaml_writes_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: x\nlr: 1e-4\ntau1: .inf\nassigner: uot\namp: false\n")
    cfg = parse_config(FCOSConfig, ["--config", str(path)])
    assert cfg.lr == 1e-4 and math.isinf(cfg.tau1) and cfg.amp is False


def test_assigner_flags_that_do_not_apply_are_errors(capsys):
    for argv, message in [
        (["--assigner", "ota", "--tau1", "1"], "--tau1 does not apply to --assigner ota"),
        (["--assigner", "atss", "--radius", "2"], "--radius does not apply to --assigner atss"),
        (["--assigner", "fcos", "--eps", "0.1"], "--eps does not apply to --assigner fcos"),
        (["--assigner", "uot", "--eps", "-1"], "eps must be > 0"),
        (["--assigner", "ota", "--k", "0"], "k must be > 0"),
    ]:
        with pytest.raises(SystemExit):
            parse_config(FCOSConfig, ["--data", "x", *argv])
        assert message in capsys.readouterr().err


def test_help_prints_each_default_once_and_the_module(capsys):
    with pytest.raises(SystemExit):
        parse_config(FCOSConfig, ["--help"], prog="python -m detectors.fcos.train")
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m detectors.fcos.train")
    assert "(default: 12)" in out and "(default: None)" not in out
    assert "(default: 12) (default" not in out
