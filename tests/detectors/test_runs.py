"""Training runs protect their output and report a user's mistakes in one line."""

import json

import pytest
import torch

from detectors.common import engine
from detectors.common.checkpoint import load_checkpoint
from detectors.fcos import evaluate as fcos_evaluate
from detectors.fcos import train as fcos_train
from tests.detectors.helpers import TINY_RUN

SMALL = [*TINY_RUN, "--channels", "32", "--head-depth", "1", "--eval-every", "0"]


def _train(data, out, *extra, epochs="1"):
    return fcos_train.main(
        ["--data", str(data), "--out", str(out), "--epochs", epochs, *SMALL, *extra]
    )


def _one_line_error(capsys, fn, *args):
    """``fn(*args)`` exits with status 2 and one error line, no traceback; returns the line."""
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_an_existing_run_is_never_overwritten_silently(data, tmp_path, capsys):
    out = tmp_path / "run"
    _train(data, out)
    before = (out / "last.pth").read_bytes()
    line = _one_line_error(capsys, _train, data, out)
    assert "already holds a run (last.pth, metrics.jsonl)" in line
    assert "--resume" in line and "--overwrite" in line
    assert (out / "last.pth").read_bytes() == before  # untouched
    _train(data, out, "--overwrite")  # asked for: replaced, one run in the log
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]


def test_resume_of_a_finished_run_reports_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    _train(data, out, epochs="1")
    run = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["run"]
    with open(out / "metrics.jsonl", "a") as fh:  # a record with metrics, as an evaluated run
        record = {"run": run, "epoch": 1, "AP": 0.25, "AP50": 0.5, "AR100": 0.3}
        fh.write(json.dumps(record) + "\n")
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().splitlines()[-1] + "\n")
    capsys.readouterr()
    metrics = _train(data, out, "--resume")
    printed = capsys.readouterr().out
    assert "has finished its 1 epochs" in printed and "| FCOS-ota | AP |" in printed
    assert "25.0" in printed and metrics["AP"] == 0.25
    assert load_checkpoint(out / "last.pth")["epoch"] == 1


def test_resume_drops_log_records_written_after_the_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    _train(data, out, epochs="1")
    with open(out / "metrics.jsonl", "a") as fh:  # killed after logging epoch 2, before saving
        fh.write(json.dumps({"epoch": 2, "loss": 9.0}) + "\n")
    _train(data, out, "--resume", epochs="2")
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_unwritable_or_file_out_fails_before_any_work(data, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: calls.append(1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_line_error(capsys, _train, data, afile / "run")
    assert f"--out {afile / 'run'}: {afile} is a file, not a directory" in line
    line = _one_line_error(capsys, _train, data, afile)
    assert "is a file, not a directory" in line
    line = _one_line_error(capsys, _train, data, "/proc/uotmatch-cannot-write-here")
    assert "is not writable" in line
    assert not calls


def test_user_errors_are_one_line(data, tmp_path, capsys):
    missing = tmp_path / "missing"
    missing.mkdir()
    line = _one_line_error(capsys, _train, missing, tmp_path / "o1")
    assert "instances_train.json" in line
    broken = tmp_path / "broken"
    (broken / "annotations").mkdir(parents=True)
    (broken / "annotations" / "instances_train.json").write_text("{not json")
    line = _one_line_error(capsys, _train, broken, tmp_path / "o2")
    assert "is not valid JSON" in line
    line = _one_line_error(capsys, _train, data, tmp_path / "o3", "--depth", "19")
    assert "depth must be one of [18, 34, 50], got 19" in line
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    line = _one_line_error(capsys, _train, data, tmp_path / "o4", "--backbone-weights", str(junk))
    assert "--backbone-weights: cannot load" in line and "junk.pth" in line
    line = _one_line_error(
        capsys, _train, data, tmp_path / "o5", "--assigner", "uot", "--eps", "-1"
    )
    assert "eps must be > 0" in line


def test_a_corrupt_image_is_named_before_training(data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "cb"
    shutil.copytree(data, copy)
    (copy / "train" / "000003.png").write_bytes(b"garbage")
    line = _one_line_error(capsys, _train, copy, tmp_path / "o")
    assert "cannot read image" in line and "000003.png" in line and "image 3" in line


def test_an_image_damaged_past_its_header_is_named_when_read(data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "cb"
    shutil.copytree(data, copy)
    path = copy / "train" / "000002.png"
    path.write_bytes(path.read_bytes()[:120])  # header intact, pixel data cut
    line = _one_line_error(capsys, _train, copy, tmp_path / "o")
    assert "cannot read image" in line and "000002.png" in line
    assert "no epoch finished" in line and "--resume" not in line  # nothing to resume
    assert not (tmp_path / "o").exists()  # and nothing left behind


def test_bad_checkpoints_on_resume_are_one_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    _train(data, out)
    line = _one_line_error(capsys, _train, data, out, "--resume", "--channels", "16")
    assert "other settings (--channels 32 -> 16)" in line and "--accept-changes" in line
    line = _one_line_error(
        capsys, _train, data, out, "--resume", "--channels", "16", "--accept-changes"
    )
    assert "was written by a different model" in line and "size mismatch" in line
    (out / "last.pth").write_bytes((out / "last.pth").read_bytes()[:1000])
    line = _one_line_error(capsys, _train, data, out, "--resume")
    assert "--resume: cannot load checkpoint" in line and "damaged" in line


def test_ctrl_c_says_how_to_resume(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = engine.train_one_epoch

    def interrupted(*args, **kwargs):
        if args[7] == 1:  # the second epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("detectors.common.trainer.train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as exc:
        _train(data, out, epochs="3")
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted in epoch 2/3" in err and "--resume" in err and "Traceback" not in err
    assert load_checkpoint(out / "last.pth")["epoch"] == 1


def test_one_line_per_epoch_with_eta(data, tmp_path, capsys):
    """Without a terminal (a log, as here) no bar: one line per epoch, counted from 1, with the
    loss, lr, time and ETA."""
    fcos_train.main(
        ["--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "2", *TINY_RUN[:-1]]
        + ["--channels", "32", "--head-depth", "1", "--eval-every", "0"]
    )
    captured = capsys.readouterr()
    lines = [x for x in captured.out.splitlines() if x.startswith("epoch ")]
    assert [x.split(":")[0] for x in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(", lr " in x and "it/s" in x and "ETA" in x for x in lines)
    assert "\r" not in captured.err and "it/s]" not in captured.err  # no tqdm noise


def test_evaluate_cli_help_and_defaults(capsys):
    with pytest.raises(SystemExit):
        fcos_evaluate.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m detectors.fcos.evaluate")
    for flag in ("--checkpoint", "--data", "--split", "--batch-size", "--device"):
        line = next(x for x in out.splitlines() if x.strip().startswith(flag))
        assert len(line.split(maxsplit=2)) >= 2  # every flag has help text
    assert "(default: auto)" in out


def test_figure1_help(capsys):
    from tests.test_limits import figure1

    with pytest.raises(SystemExit) as exc:
        figure1.main(["--help"])
    assert exc.value.code == 0
    assert "usage: python docs/examples/figure1.py" in capsys.readouterr().out
    torch.manual_seed(0)
