"""The FCOS training CLI: a short run, evaluation of its checkpoint, exact resume, a NaN stop,
bad input, and a 2-process gloo run through torchrun."""

import json

import pytest
import torch

from detectors.common.checkpoint import load_checkpoint
from detectors.common.engine import NonFiniteLossError, train_one_epoch
from detectors.fcos import evaluate as fcos_evaluate
from detectors.fcos import train as fcos_train
from tests.detectors.helpers import TINY_RUN, linux_only, torchrun

SMALL = [*TINY_RUN, "--channels", "32", "--head-depth", "1", "--warmup-iters", "5"]


def test_train_evaluate_and_log(data, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = fcos_train.main(["--data", str(data), "--out", str(out), "--epochs", "2", *SMALL])
    assert set(metrics) >= {"AP", "AP50", "AR100"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all("loss_cls" in x for x in lines)
    assert all(x["unconverged"] == 0 for x in lines)  # OTA's solves, counted per epoch
    assert "| FCOS-ota | AP |" in capsys.readouterr().out
    state = load_checkpoint(out / "last.pth")
    assert state["epoch"] == 2 and state["config"]["assigner"] == "ota"
    again = fcos_evaluate.main(["--checkpoint", str(out / "last.pth"), "--data", str(data)])
    assert again == pytest.approx(metrics)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_weights(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    fcos_train.main(
        ["--data", str(data), "--out", str(full), "--epochs", "3", "--eval-every", "0", *SMALL]
    )
    fcos_train.main(
        ["--data", str(data), "--out", str(cut), "--epochs", "1", "--eval-every", "0", *SMALL]
    )
    # as if killed after epoch 1, then resumed with the full schedule
    state = load_checkpoint(cut / "last.pth")
    assert state["epoch"] == 1
    fcos_train.main(
        [
            "--data",
            str(data),
            "--out",
            str(cut),
            "--epochs",
            "3",
            "--eval-every",
            "0",
            "--resume",
            *SMALL,
        ]
    )
    a, b = load_checkpoint(full / "last.pth")["model"], load_checkpoint(cut / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_non_finite_loss_stops_with_a_clear_error():
    model = torch.nn.Linear(1, 1)

    class Batch(dict):
        def to(self, device):
            return self

    def criterion(outputs, batch):
        return {"loss": outputs.sum() * float("nan")}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = [Batch(images=torch.ones(2, 1))]
    with pytest.raises(NonFiniteLossError, match="epoch 1, iteration 0: the loss is nan"):
        train_one_epoch(
            model, criterion, loader, opt, sched, scaler, torch.device("cpu"), 0, progress=False
        )


def test_bad_input(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fcos_train.main(["--out", str(tmp_path)])
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fcos_train.main(["--data", str(data), "--assigner", "nearest"])
    with pytest.raises(SystemExit):
        fcos_train.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), *SMALL])
    assert "instances_train.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fcos_evaluate.main(["--checkpoint", str(tmp_path / "none.pth"), "--data", str(data)])
    assert "none.pth does not exist" in capsys.readouterr().err


@pytest.mark.slow
@linux_only
def test_two_process_gloo_run(data, tmp_path):
    out = tmp_path / "ddp"
    argv = ["--data", str(data), "--out", str(out), "--epochs", "1", *SMALL]
    run = torchrun("detectors.fcos.train", argv, port=29517)
    state = load_checkpoint(out / "last.pth")
    assert state["epoch"] == 1
    assert run.stdout.count("| FCOS-ota | AP |") == 1  # rank 0 alone prints


def test_unconverged_solves_are_counted_in_the_log(data, tmp_path):
    """A budget too small for OTA's solves: metrics.jsonl counts, per epoch, the images whose
    problem missed tol (summed over the batches, not averaged); --max-iter and --tol reach the
    assigner, and a rule-based assigner refuses them."""
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--epochs", "1", "--eval-every", "0", *SMALL]
    with pytest.warns(RuntimeWarning, match="max_iter = 1 is small"):
        fcos_train.main([*argv, "--max-iter", "1", "--tol", "1e-9"])
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["unconverged"] == 8  # 8 training images, none converged in 1 iteration
    cfg = load_checkpoint(out / "last.pth")["config"]
    assert cfg["max_iter"] == 1 and cfg["tol"] == 1e-9
    with pytest.raises(ValueError, match="--max-iter does not apply to --assigner fcos"):
        fcos_train.FCOSConfig(data=str(data), assigner="fcos", max_iter=5)
