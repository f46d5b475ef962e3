"""The runnable examples of the docs' Integrations page run, against the real libraries."""

import os
import runpy
import sys
import tempfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.mark.parametrize("name", ["torchvision_fcos", "detr_plan_loss"])
def test_example_runs(name, capsys):
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "loss" in out or "classification" in out
    if name == "detr_plan_loss":  # random outputs, near-identical queries: every target paired
        assert "targets paired: [2, 1] of [2, 1]" in out


def test_ultralytics_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", os.environ.get("YOLO_CONFIG_DIR", tempfile.mkdtemp()))
    pytest.importorskip("ultralytics")
    monkeypatch.setattr(sys, "argv", ["ultralytics_yolo.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "ultralytics_yolo.py"), run_name="__main__")
    assert (tmp_path / "runs" / "ota" / "weights" / "last.pt").exists()
    assert "weights:" in capsys.readouterr().out
