"""The benchmark scripts run (tiny sizes) and their solvers meet the stated error."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_solver_quick(capfd, tmp_path):
    out = tmp_path / "solver.md"
    rows = _load("bench_solver").main(["--quick", "--large", "--repeats", "1", "--out", str(out)])
    assert len(rows) == 4 + 5  # OTA, OTA dense, DETR x 2 taus; Deformable-DETR, DINO x 2, YOLO-1280
    for row in rows:
        ours_error, pot_error = row[5], row[11]
        assert ours_error < 1e-3 and pot_error < 1e-3
        # The returned plan alone is [B, M, N + 1]: at least one copy of the cost.
        assert row[7] >= 1.0
    captured = capfd.readouterr()  # what the process wrote, the C++ side's output included
    printed = captured.out
    assert "| OTA-like (error < 0.001) |" in printed and "| YOLO-1280-like" in printed
    assert out.read_text().strip() in printed
    for noise in ("gpuGetDeviceCount", "profiler_start", "USDT"):  # the profiler's, silenced
        assert noise not in captured.out + captured.err


def test_peak_memory_counts_what_a_call_holds():
    peak_memory = _load("bench_solver").peak_memory
    x = torch.ones(1000, 1000)
    # Tensor bytes, and a few bytes of Python objects that tracemalloc sees.
    assert 1_000_000 <= peak_memory(lambda: torch.empty(250_000), (x,)) < 1_010_000  # float32
    # x * 2 and its exp are alive at once; x itself (an input) is not counted.
    assert 8_000_000 <= peak_memory(lambda: (x * 2).exp(), (x,)) < 8_010_000


def test_bench_assigners_quick(capsys, tmp_path):
    rows = _load("bench_assigners").main(
        ["--quick", "--repeats", "1", "--out", str(tmp_path / "assigners.md")]
    )
    assert len(rows) == 2
    for row in rows:  # tiny scenes: the same assignment as the official procedure
        assert row["vs_dense"]["differ"] == 0 and row["vs_official"]["differ"] == 0
        assert row["vs_official"]["unserved"][0] == 0
    out = capsys.readouterr().out
    assert "| COCO-like, 7 gts/image |" in out and "| DETR matcher | batch x queries |" in out
    assert "| 0 of 4 |" in out  # the UOT matcher's defaults converge on DETR-weighted costs
    assert "| DETR matcher" in (tmp_path / "assigners.md").read_text()


@pytest.mark.slow
def test_train_assigners_quick(tmp_path, capsys):
    results = _load("train_assigners").main(
        [
            "--out",
            str(tmp_path),
            "--train",
            "8",
            "--val",
            "4",
            "--size",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--channels",
            "16",
            "--head-depth",
            "1",
            "--assigners",
            "fcos",
            "ota",
        ]
    )
    assert set(results) == {"fcos", "ota"}
    for r in results.values():
        assert 0.0 <= r["AP"] <= 1.0 and r["step_s"] > 0 and r["paired_step_s"] > 0
    out = capsys.readouterr().out
    assert "| ota |" in out and "paired training-step time" in out
    assert (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_detr_convergence_quick(tmp_path, capsys):
    summary = _load("detr_convergence").main(
        ["--out", str(tmp_path), "--train", "4", "--val", "2", "--size", "64", "--epochs", "2"]
        + ["--eval-every", "1", "--batch-size", "2", "--hidden-dim", "32", "--enc-layers", "1"]
        + ["--dec-layers", "1", "--dim-feedforward", "32", "--num-queries", "32", "--no-progress"]
    )
    runs = summary["runs"]
    assert set(runs) == {"hungarian", "ot"}
    for r in runs.values():
        assert r["epoch"] == [1, 2] and all(0.0 <= ap <= 1.0 for ap in r["AP"])
    saved = json.loads((tmp_path / "curves.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(runs))
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "| epoch | hungarian AP | ot AP |" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """scripts/gpu_check.sh runs its steps (at smoke sizes on the CPU) and writes every table;
    asked for CUDA where there is none, it stops at once with a one-line reason."""
    script = BENCH.parent / "scripts" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(tmp_path / "none")}
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(script), str(out)],
        env={**env, "GPU_CHECK_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dry run on the CPU" in (out / "env.txt").read_text()
    assert "| YOLO-1280-like (error < 0.001) |" in (out / "solver.md").read_text()
    assert "| crowded, 50 gts/image |" in (out / "assigners.md").read_text()
    assert "== tests: exit 0" in done.stdout
    if not torch.cuda.is_available():
        refused = subprocess.run(
            ["bash", str(script), str(tmp_path / "gpu")], env=env, capture_output=True, text=True
        )
        assert refused.returncode == 2
        assert "torch sees no CUDA device" in refused.stdout + refused.stderr


def test_peak_memory_sees_numpy_buffers_too():
    import numpy as np

    peak_memory = _load("bench_solver").peak_memory
    x = torch.ones(10)
    held = peak_memory(lambda: torch.from_numpy(np.zeros(1_000_000)), (x,))
    assert 8_000_000 <= held < 8_100_000  # the buffer, and tracemalloc's few bookkeeping bytes


@pytest.mark.slow
def test_train_frameworks_paired_step_times_and_table(tmp_path):
    """The step-time column comes from one alternating measurement of every run (real
    torchvision and Ultralytics models, tiny sizes); the table divides by each framework's own."""
    import argparse

    pytest.importorskip("ultralytics")
    from detectors.data import colorboxes

    tf = _load("train_frameworks")
    colorboxes.generate(tmp_path, train=4, val=0, size=64, crowded=True, progress=False)
    args = argparse.Namespace(
        size=64, batch_size=2, tv_channels=32, tv_convs=1, hf_epochs=1, hf_queries=10
    )
    times = tf.paired_step_times(tmp_path, args, rounds=1, count=1)
    assert set(times) == set(tf.RUNS) and all(t > 0 for t in times.values())
    run = {"0": {"AP": 0.1, "AP50": 0.2, "AR100": 0.3, "step_s": 9.0}}
    text = tf.table({"tv-fcos": run, "tv-fcos-ota": run}, times)
    ratio = times["tv-fcos-ota"] / times["tv-fcos"]
    assert f"| 10.0 | 20.0 | 30.0 | {ratio:.2f}x |" in text


def test_the_corpus_is_recorded_and_benchmarked(tmp_path, capsys):
    """capture_corpus's recorder sees every match() the assigners and matchers make (solved as
    usual), its file loads with weights_only=True, and bench_corpus reports iterations, POT
    and the decisions on it."""
    from tests.detection.scenes import as_inputs, scene
    from uotmatch.detection import OTAAssigner, UOTMatcher

    capture = _load("capture_corpus")
    problems: list = []
    with capture.recording(problems):
        result = OTAAssigner()(**as_inputs(*scene(0, B=2, G=3)))
        outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_boxes": torch.rand(2, 5, 4) * 0.5}
        outputs["pred_boxes"][..., 2:] += 0.1
        targets = [
            {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)},
            {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.2]])},
        ]
        UOTMatcher()(outputs, targets)
    assert int(result.num_fg.sum()) > 0  # the assignment itself went through
    assert [p["step"] for p in problems] == [0, 1] and problems[0]["b"].shape == (2, 3)
    # the solver options as plain values: the OTA assigner's Newton stages, the matcher's sweeps
    assert (problems[0]["method"], problems[1]["method"]) == ("auto", "sweeps")
    assert problems[1]["tol"] == 1e-3 and problems[1]["max_iter"] == 1000
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    torch.save({"source": "demo", "problems": problems[:1]}, corpus / "demo.pt")
    torch.save({"source": "detr", "problems": problems[1:]}, corpus / "detr.pt")
    text = _load("bench_corpus").main(
        ["--corpus", str(corpus), "--pot-max-iter", "2000", "--matcher-seeds", "1"]
    )
    assert "| demo | 1 | 2 |" in text and "| detr | 1 | 2 |" in text

    # the decisions see the loosest tolerance change anchors, and none at 1e-5
    def table(block: str) -> dict[str, list[str]]:  # a markdown table's rows by first cell
        cells = [line.split("|")[1:-1] for line in block.splitlines() if line.startswith("| ")]
        return {c[0].strip(): [x.strip() for x in c[1:]] for c in cells[1:]}

    demo = table(text.split("Decisions, demo (anchors")[1].split("Decisions,")[0])
    assert int(demo["0.1"][0]) > 0 and int(demo["1e-05"][0]) == 0
    # the matcher's generated batches: at 1e-5 every pair is the reference's, and the loosest
    # tolerance stops sooner (its median and largest iteration counts)
    rows = table(text.split("UOTMatcher on generated DETR batches")[1])
    assert [int(x) for x in rows["1e-05"][:4]] == [0, 0, 0, 0]
    assert float(rows["0.1"][-1]) < float(rows["1e-05"][-1])
    assert float(rows["0.1"][-2]) < float(rows["1e-05"][-2])
    assert (corpus / "corpus.md").read_text().strip() == text.strip()


@pytest.mark.slow
def test_study_statistics_and_resume(tmp_path, capsys):
    """The study's intervals against hand-computed values, its report's readings, and a rerun
    that finds every run done trains nothing."""
    import math

    study = _load("study")
    mean, low, high = study.t_interval([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.3027
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(study.t_interval([1.0])[1])
    a = {i: 0.5 for i in range(50)}
    b = {i: 0.5 + 0.1 for i in range(50)}  # every image 0.1 better: a zero-width interval
    assert study.paired_bootstrap(a, b) == pytest.approx((0.1, 0.1, 0.1))
    assert study._reading(-0.1, 0.2) == "no detectable difference"
    assert study._reading(0.1, 0.2) == "better"
    results = {}
    for seed, (own, ota) in enumerate([(0.30, 0.33), (0.31, 0.33), (0.29, 0.32)]):
        for name, ap in (("own", own), ("ota", ota)):
            results[f"tv-fcos/{name}/seed{seed}"] = {
                "AP": ap, "AP50": ap, "AR100": ap, "wall_s": 1.0,
                "per_image_ap": {str(i): ap for i in range(10)},
            }  # fmt: skip
    (tmp_path / "study.json").write_text(json.dumps(results))
    done = study.main(["--out", str(tmp_path), "--frameworks", "tv-fcos", "--seeds", "0", "1", "2"])
    assert done == results  # nothing ran: every run was finished
    text = (tmp_path / "study.md").read_text()
    assert "| tv-fcos | ota | 3 | 32.7 ± 0.6 |" in text and "| better |" in text
    assert "+2.67 (" in text and (tmp_path / "study.png").exists()


def test_study_results_from_two_sittings_at_once_are_all_kept(tmp_path):
    """Two sittings filling one directory (say, YOLO's cells and the HF cells) each add their
    finished runs: neither overwrites the other's with the results it read at its start."""
    study = _load("study")
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"yolo/tal/seed0": {"AP": 0.1}}))
    first = json.loads(path.read_text())  # what both sittings read when they started
    study._record(path, "yolo/ota/seed0", {"AP": 0.2})
    kept = study._record(path, "hf-deformable/own/seed0", {"AP": 0.0})
    assert set(kept) == set(first) | {"yolo/ota/seed0", "hf-deformable/own/seed0"}
    assert json.loads(path.read_text()) == kept
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]  # no temporary file left


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_every_benchmark_runs_from_a_clone_without_an_installed_detectors(script, tmp_path):
    """The wheel holds uotmatch only: each script finds the reference detectors (and its
    sibling benchmarks) from the clone itself, whatever the working directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-1000:]
    assert "usage:" in done.stdout
