"""Capture the assignment problems real training makes: the corpus that decides whether a solver
change helps.

Every :func:`uotmatch.match` call the assigners and matchers make while a detector trains is
recorded (the cost, background, masses, mask and the regime, on the CPU), for four sources:

* ``demo``: the bundled FCOS with OTA on Color Boxes, ``make demo``'s setting (400 images of
  128 px, lr 0.02);
* ``yolo``: Ultralytics YOLOv8n through ``trainer(OTAAssigner())``
  (``uotmatch.integrations.ultralytics``) on crowded Color Boxes (``train_frameworks.py``'s data);
* ``torchvision``: torchvision FCOS through ``use_assigner(model, OTAAssigner())``, same data;
* ``detr``: the bundled DETR with ``--matcher uot`` (the UOT matcher's defaults).

    python benchmarks/capture_corpus.py --out runs/corpus            # ~10 minutes on 2 cores
    python benchmarks/capture_corpus.py --out runs/corpus --sources yolo --epochs 3

Each source is written to ``OUT/<source>.pt`` (``torch.load(..., weights_only=True)``): a dict
with ``"problems"``, a list of ``match`` keyword dicts (``cost``, ``eps``, ``tau1``, ``tau2``,
``a``, ``b``, ``gt_mask``, ``background_cost``, ``max_iter``, ``tol``, plus ``"step"``, the
training step it came from). A source already written is skipped (delete its file to capture
it again). ``benchmarks/bench_corpus.py`` solves the corpus. Nothing here is committed: the
corpus is generated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # detectors/ from a clone

import uotmatch  # noqa: E402
from detectors.data import colorboxes  # noqa: E402
from detectors.data.yolo import write_yolo  # noqa: E402

SOURCES = ("demo", "yolo", "torchvision", "detr")


@contextlib.contextmanager
def recording(problems: list):
    """Record every :func:`uotmatch.match` call (the assigners and matchers call it through the
    package) into ``problems`` while the block runs; each call is still solved as usual."""
    real = uotmatch.match
    step = [0]

    def record(cost, eps, tau1=math.inf, tau2=math.inf, **kwargs):
        stored = dict(kwargs)
        solver = stored.pop("solver", None)  # stored as plain values: loads with weights_only
        if solver is not None:
            stored.update({f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)})

        def cpu(x):
            return x.detach().cpu().clone() if isinstance(x, torch.Tensor) else x

        problems.append(
            {"cost": cpu(cost), "eps": eps, "tau1": tau1, "tau2": tau2, "step": step[0]}
            | {k: cpu(v) for k, v in stored.items()}
        )
        step[0] += 1
        return real(cost, eps, tau1, tau2, **kwargs)

    with mock.patch.object(uotmatch, "match", record):
        yield problems


def _data(out: Path, crowded: bool, size: int = 128, **kwargs) -> Path:
    name = f"colorboxes-{'crowded' if crowded else 'plain'}-{size}"
    data = out / "data" / name
    if not (data / "annotations" / "instances_val.json").exists():
        colorboxes.generate(
            data, train=400, val=100, size=size, crowded=crowded, progress=False, **kwargs
        )
    return data


def capture_demo(out: Path, epochs: int, tmp: Path) -> list:
    from detectors.fcos import train

    data = _data(out, crowded=False)
    problems: list = []
    with recording(problems):
        train.main(
            ["--data", str(data), "--assigner", "ota", "--epochs", str(epochs), "--lr", "0.02"]
            + ["--eval-every", "0", "--out", str(tmp / "demo"), "--no-progress"]
        )
    return problems


def capture_yolo(out: Path, epochs: int, tmp: Path) -> list:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp / "yolo-config"))
    from ultralytics import YOLO

    from uotmatch.detection import OTAAssigner
    from uotmatch.integrations.ultralytics import trainer

    data = _data(out, crowded=True)
    yolo_data = out / "data" / "yolo-crowded-128"
    if not (yolo_data / "data.yaml").exists():
        write_yolo(data, yolo_data)
    problems: list = []
    with recording(problems):
        YOLO("yolov8n.yaml").train(
            data=str(yolo_data / "data.yaml"),
            trainer=trainer(OTAAssigner()),
            epochs=epochs,
            imgsz=128,
            batch=8,
            device="cpu",
            amp=False,
            plots=False,
            workers=0,
            seed=0,
            project=str(tmp / "yolo"),
            name="ota",
            exist_ok=True,
            verbose=False,
            val=False,
        )
    return problems


def capture_torchvision(out: Path, epochs: int, tmp: Path) -> list:
    sys.path.insert(0, str(Path(__file__).parent))
    import train_frameworks

    data = _data(out, crowded=True)
    args = argparse.Namespace(
        device="cpu", batch_size=8, size=128, tv_channels=64, tv_convs=2, tv_lr=0.02
    )
    args.tv_epochs = epochs
    problems: list = []
    with recording(problems):
        train_frameworks.train_torchvision("tv-fcos-ota", data, args, seed=0)
    return problems


def capture_detr(out: Path, epochs: int, tmp: Path) -> list:
    from detectors.detr import train

    data = _data(out, crowded=False, size=96, max_boxes=4)
    problems: list = []
    with recording(problems):
        train.main(
            ["--data", str(data), "--matcher", "uot", "--epochs", str(epochs), "--short", "96"]
            + ["--max-size", "96", "--num-queries", "10", "--eval-every", "0"]
            + ["--out", str(tmp / "detr"), "--no-progress"]
        )
    return problems


CAPTURE = {
    "demo": capture_demo,
    "yolo": capture_yolo,
    "torchvision": capture_torchvision,
    "detr": capture_detr,
}


def main(argv=None) -> dict[str, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/corpus"))
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--epochs", type=int, default=2, help="training epochs per source")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = {}
    for source in args.sources:
        path = args.out / f"{source}.pt"
        written[source] = path
        if path.exists():
            print(f"{source}: {path} exists (delete it to capture again)")
            continue
        print(f"{source}: training {args.epochs} epochs, recording every match() call")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # slow solves are what we capture
            problems = CAPTURE[source](args.out, args.epochs, Path(tmp))
        partial = path.with_name(path.name + ".tmp")
        torch.save({"source": source, "epochs": args.epochs, "problems": problems}, partial)
        partial.replace(path)  # atomic: a file that exists is complete
        items = sum(int(q["cost"].shape[0]) if q["cost"].dim() == 3 else 1 for q in problems)
        print(
            f"  {len(problems)} problems, {items} items, {time.perf_counter() - start:.0f} s "
            f"-> {path}"
        )
    return written


if __name__ == "__main__":
    main()
