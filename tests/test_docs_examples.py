"""The runnable examples of the docs' Integrations page run, against the real libraries."""

import os
import runpy
import sys
import tempfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["torchvision_fcos", "detr_plan_loss", "transformers_deformable_detr", "rfdetr_criterion"],
)
def test_example_runs(name, capsys):
    if name.startswith(("transformers", "rfdetr")):
        pytest.importorskip(name.split("_")[0])
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "loss" in out or "classification" in out
    if name == "detr_plan_loss":  # random outputs, near-identical queries: every target paired
        assert "targets paired: [2, 1] of [2, 1]" in out
    if name == "transformers_deformable_detr":  # 3 steps x 2 decoder layers, all ours
        assert "matchings made: 6" in out and "step 2: loss" in out
    if name == "rfdetr_criterion":  # final, auxiliary and encoder layers
        assert "matchings made: 3" in out


@pytest.mark.slow
def test_ultralytics_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", os.environ.get("YOLO_CONFIG_DIR", tempfile.mkdtemp()))
    pytest.importorskip("ultralytics")
    monkeypatch.setattr(sys, "argv", ["ultralytics_yolo.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "ultralytics_yolo.py"), run_name="__main__")
    assert (tmp_path / "runs" / "ota" / "weights" / "last.pt").exists()
    assert "weights:" in capsys.readouterr().out


@pytest.mark.slow
def test_ultralytics_rtdetr_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", os.environ.get("YOLO_CONFIG_DIR", tempfile.mkdtemp()))
    pytest.importorskip("ultralytics")
    monkeypatch.setattr(sys, "argv", ["ultralytics_rtdetr.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "ultralytics_rtdetr.py"), run_name="__main__")
    assert (tmp_path / "runs" / "uot" / "weights" / "last.pt").exists()
    assert "weights:" in capsys.readouterr().out
