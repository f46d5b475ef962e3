"""Train the same FCOS (model, seed, data, epochs) with each assigner on crowded Color Boxes.

    python benchmarks/train_assigners.py --out runs/assigners            # CPU-sized default
    python benchmarks/train_assigners.py --train 4800 --val 960 --size 256 --epochs 24 \\
        --channels 128 --head-depth 4 --out runs/assigners-gpu             # larger, on a GPU

    python benchmarks/train_assigners.py --out runs/assigners --steps-only  # step times only

Prints a table of AP, AP50, AR100 and the training step time per assigner (the OTA paper reports
OTA about 2 AP over FCOS on COCO and a larger margin on crowded scenes, at < 20% more training
time), and writes it to OUT/results.json. The step-time ratios come from a paired measurement
(same batches and initialisation, alternating rounds in one process), free of whatever else the
machine did during the sequential training runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run from a clone: the reference detectors and the sibling benchmarks are imported from it.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from train_frameworks import alternate  # noqa: E402

from detectors.data import colorboxes  # noqa: E402
from detectors.fcos import train as fcos_train  # noqa: E402

ASSIGNERS = ("fcos", "atss", "simota", "ota")


def paired_step_times(data: Path, args, rounds: int = 3, count: int = 6) -> dict[str, float]:
    """The training-step time (forward, loss with the assignment, backward) of each assigner on
    the same ``count`` batches and models of the same initialisation, timed in alternating
    rounds in one process (the machine's load the same for all): per assigner the median over
    rounds of the per-batch median, in seconds."""
    import warnings

    import torch

    from detectors.common.data import CocoDetection, collate, default_transforms
    from detectors.fcos.loss import FCOSLoss
    from detectors.fcos.train import FCOSConfig, build_model
    from uotmatch.detection import build_assigner

    train = CocoDetection(
        data,
        data / "annotations" / "instances_train.json",
        default_transforms(True, args.size, args.size),
    )
    count = max(1, min(count, len(train) // args.batch_size))
    batches = [
        collate([train[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
        for b in range(count)
    ]
    steps = {}
    for name in args.assigners:
        regime = {"tau1": 10.0, "tau2": 1.0} if name == "uot" else {}  # the study's UOT regime
        cfg = FCOSConfig(
            data=str(data),
            assigner=name,
            channels=args.channels,
            head_depth=args.head_depth,
            **regime,
        )
        torch.manual_seed(args.seed)
        model = build_model(cfg, train.num_classes).train()
        criterion = FCOSLoss(build_assigner(name))

        def step(batch, model=model, criterion=criterion):
            model.zero_grad()
            criterion(model(batch["images"]), batch)["loss"].backward()

        steps[name] = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return alternate(steps, batches, rounds)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="runs/assigners")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--head-depth", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--assigners", nargs="+", default=list(ASSIGNERS))
    p.add_argument(
        "--steps-only",
        action="store_true",
        help="only the paired step timing (no training runs): a few seconds per assigner",
    )
    p.add_argument("--step-rounds", type=int, default=3, help="rounds of the paired timing")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    if not (data / "annotations" / "instances_val.json").exists():
        colorboxes.generate(data, args.train, args.val, args.size, args.seed, crowded=True)
    paired = paired_step_times(data, args, args.step_rounds)
    base = paired.get("fcos")
    print("\npaired training-step time (same batches and initialisation, alternating rounds):")
    print("| assigner | step s | vs fcos |")
    print("|---|---|---|")
    for name, t in paired.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f}x |" if base else f"| {name} | {t:.3f} | - |")
    if args.steps_only:
        return paired
    results = {}
    for name in args.assigners:
        run = out / name
        common = [
            "--data",
            str(data),
            "--out",
            str(run),
            "--assigner",
            name,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--short",
            str(args.size),
            "--max-size",
            str(args.size),
            "--channels",
            str(args.channels),
            "--head-depth",
            str(args.head_depth),
            "--seed",
            str(args.seed),
            "--eval-every",
            "0",
        ]
        start = time.perf_counter()
        metrics = fcos_train.main(common)
        elapsed = time.perf_counter() - start
        log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        step = sum(1 / r["it_per_s"] for r in log) / len(log)
        results[name] = {
            **metrics,
            "step_s": step,
            "paired_step_s": paired[name],
            "wall_s": elapsed,
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"\ncrowded Color Boxes: {args.train} train / {args.val} val images of {args.size} px, "
        f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}\n"
    )
    print("| assigner | AP | AP50 | AR100 | step s (run) | paired step vs fcos |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rel = f"{r['paired_step_s'] / base:.2f}x" if base else "-"
        print(
            f"| {name} | {100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | {100 * r['AR100']:.1f} "
            f"| {r['step_s']:.3f} | {rel} |"
        )
    return results


if __name__ == "__main__":
    main()
