"""The training CLIs as a user runs them: real commands in a subprocess. Nothing lost (an
--overwrite keeps the old run until the new one has its first checkpoint), nothing silent (a
changed setting on --resume is refused or recorded), one line per error, one line per epoch."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.detectors.helpers import ROOT, TINY_RUN

FCOS = ["-m", "detectors.fcos.train"]
SMALL = [*TINY_RUN, "--channels", "32", "--head-depth", "1", "--eval-every", "0"]


def _run(*argv, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _one_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, run.stderr  # no usage block, no traceback
    assert lines[0].startswith("error: ")
    return lines[0]


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished one-epoch FCOS-OTA run, copied afresh for each test that changes it."""
    out = tmp_path_factory.mktemp("cli") / "run"
    run = _run(*FCOS, "--data", str(data), "--out", str(out), "--epochs", "1", *SMALL)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(data, run_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    # bad inputs: refused before anything is touched
    line = _one_line(
        _run(*FCOS, "--data", str(tmp_path / "nope"), "--out", str(run_dir), "--overwrite", *SMALL)
    )
    assert "instances_train.json" in line
    # a file that breaks in the first epoch: the old run is still whole, and the message says so
    broken = tmp_path / "cb"
    shutil.copytree(data, broken)
    image = broken / "train" / "000002.png"
    image.write_bytes(image.read_bytes()[:120])
    line = _one_line(
        _run(
            *FCOS,
            "--data",
            str(broken),
            "--out",
            str(run_dir),
            "--overwrite",
            "--epochs",
            "1",
            *SMALL,
        )
    )
    assert "000002.png" in line and "previous run" in line and "untouched" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # a good run: replaced, one run in the log
    old = _records(run_dir)[0]["run"]
    run = _run(
        *FCOS, "--data", str(data), "--out", str(run_dir), "--overwrite", "--epochs", "1", *SMALL
    )
    assert run.returncode == 0, run.stderr[-2000:]
    records = _records(run_dir)
    assert [r["epoch"] for r in records] == [1] and records[0]["run"] != old


@pytest.mark.slow
def test_resume_refuses_changed_settings_unless_accepted(data, run_dir):
    common = ["--data", str(data), "--out", str(run_dir), "--resume", "--epochs", "2", *SMALL]
    line = _one_line(_run(*FCOS, *common, "--assigner", "atss"))
    assert "--assigner 'ota' -> 'atss'" in line and "--accept-changes" in line
    assert [r["epoch"] for r in _records(run_dir)] == [1]  # nothing trained
    run = _run(*FCOS, *common, "--assigner", "atss", "--accept-changes")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--accept-changes: continuing with --assigner 'ota' -> 'atss'" in run.stdout
    first, second = _records(run_dir)
    assert first["assigner"] == "ota" and second["assigner"] == "atss"  # every line says
    assert second["changed"] == {"assigner": ["ota", "atss"]} and "changed" not in first


@pytest.mark.slow
def test_cli_errors_are_one_line_and_leave_nothing_behind(data, tmp_path):
    out = tmp_path / "out"
    line = _one_line(_run(*FCOS, "--data", str(data), "--out", str(out), "--depth", "19"))
    assert "--depth must be one of [18, 34, 50], got '19'" in line or "depth" in line
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: [1,\nlr: 0.1\n")
    line = _one_line(_run(*FCOS, "--config", str(config), "--data", str(data), "--out", str(out)))
    assert "not valid YAML" in line and "line" in line
    line = _one_line(_run(*FCOS, "--data", str(tmp_path / "missing"), "--out", str(out)))
    assert "instances_train.json" in line
    line = _one_line(_run(*FCOS, "--out", str(out)))
    assert "--data is required" in line
    assert not out.exists()  # no empty --out left behind


def test_a_missing_extra_is_one_line(tmp_path):
    """Without torchvision (the detectors extra), the CLI names what to install."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torchvision'] = None\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    line = _one_line(_run(*FCOS, "--help", env=env))
    assert "torchvision" in line and "pip install -e '.[detectors]'" in line


@pytest.mark.slow
def test_one_line_per_epoch_in_a_log(data, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--epochs", "2"]
    argv += [a for a in SMALL if a != "--no-progress"]  # progress on, but not a terminal
    run = _run(*FCOS, *argv)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [x for x in run.stdout.splitlines() if x.startswith("epoch ")]
    assert len(lines) == 2 and all("ETA" in x and ", lr " in x for x in lines)
    assert "\r" not in run.stderr
