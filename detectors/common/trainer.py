"""The training run shared by the bundled detectors: config fields, setup, the epoch loop with
checkpoints, resume, evaluation and logging, and checkpoint evaluation.

A detector supplies its config (a :class:`TrainConfig` subclass), a model with ``detect(outputs)``,
a criterion ``(outputs, batch) -> {"loss": ..., ...}`` and an optimizer; :func:`fit` does the rest,
on one CPU, one GPU, or many processes through torchrun (rank 0 alone prints, logs and writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from detectors.common.checkpoint import (
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from detectors.common.data import CocoDetection, collate, default_transforms, images_only
from detectors.common.dist import barrier, init_distributed, is_main, rank, world_size
from detectors.common.engine import evaluate, train_one_epoch
from detectors.common.evaluation import format_table

__all__ = ["TrainConfig", "datasets", "evaluate_checkpoint", "fit", "setup", "warmup_cosine"]


@dataclass
class TrainConfig:
    """What every bundled detector's training run reads (``--flag`` per field)."""

    data: str = field(default="", metadata={"help": "COCO-format dataset directory"})
    out: str = field(default="runs/train", metadata={"help": "output directory"})
    epochs: int = field(default=12, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={"help": "images per step per process"})
    lr: float = field(default=0.01, metadata={"help": "learning rate"})
    weight_decay: float = 1e-4
    warmup_iters: int = field(default=100, metadata={"help": "linear warm-up iterations"})
    clip_grad: float = field(default=10.0, metadata={"help": "max gradient norm (0: off)"})
    depth: int = field(default=18, metadata={"help": "ResNet depth: 18, 34 or 50"})
    backbone_weights: str = field(default="", metadata={"help": "local torchvision checkpoint"})
    freeze_at: int = field(default=0, metadata={"help": "freeze stem (1) and stages (2..5)"})
    short: int = field(default=128, metadata={"help": "resize short side to this"})
    max_size: int = field(default=128, metadata={"help": "cap on the long side"})
    amp: bool = field(default=True, metadata={"help": "mixed precision (CUDA only)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    workers: int = field(default=0, metadata={"help": "data-loading workers"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every N epochs (0: at end)"})
    seed: int = 0
    resume: bool = field(default=False, metadata={"help": "continue from OUT/last.pth"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def __post_init__(self):
        if not self.data:
            raise ValueError("--data is required (a COCO-format dataset directory)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")


def setup(cfg: TrainConfig) -> tuple[torch.device, bool]:
    """Device, process group (under torchrun), per-rank seeds, the output directory."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    distributed = init_distributed(device)
    torch.manual_seed(cfg.seed + rank())
    random.seed(cfg.seed + rank())
    np.random.seed(cfg.seed + rank())
    if is_main():
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return device, distributed


def datasets(cfg: TrainConfig) -> tuple[CocoDetection, CocoDetection]:
    """``DIR/annotations/instances_{train,val}.json``, with the default transforms."""
    root = Path(cfg.data)
    ann = root / "annotations"
    train = CocoDetection(
        root, ann / "instances_train.json", default_transforms(True, cfg.short, cfg.max_size)
    )
    val = CocoDetection(
        root, ann / "instances_val.json", default_transforms(False, cfg.short, cfg.max_size)
    )
    return train, val


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor per iteration: linear warm-up from 0.001, then cosine decay to 0 at ``total``."""

    def f(it: int) -> float:
        if it < warmup:
            return 0.001 + (1 - 0.001) * it / warmup
        return 0.5 * (1 + math.cos(math.pi * min(it - warmup, total) / max(total - warmup, 1)))

    return f


def _log(out: Path, record: dict, writer) -> None:
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, v in record.items():
            if isinstance(v, (int, float)) and key != "epoch":
                writer.add_scalar(key, v, record["epoch"])


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    criterion,
    optimizer: torch.optim.Optimizer,
    lr_lambda: Callable[[int, int], Callable[[int], float]],
    train_set: CocoDetection,
    val_set: CocoDetection,
    device: torch.device,
    distributed: bool,
    title: str,
    inputs: Callable = images_only,
) -> dict:
    """Train ``model`` for ``cfg.epochs`` (from ``OUT/last.pth`` with ``cfg.resume``).

    Every epoch: a checkpoint (atomic; model, optimizer, LR schedule, AMP scaler, epoch, RNG
    states, config), a line of ``OUT/metrics.jsonl`` (and TensorBoard when installed), COCO
    evaluation every ``cfg.eval_every`` epochs and after the last. ``lr_lambda(iters_per_epoch,
    total_iters)`` gives the LR factor per iteration. Returns the last COCO metrics.
    """
    out = Path(cfg.out)
    sampler = DistributedSampler(
        train_set, num_replicas=world_size(), rank=rank(), shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        train_set, cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=cfg.workers
    )
    val_loader = DataLoader(
        Subset(val_set, range(rank(), len(val_set), world_size())),
        cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.workers,
    )
    total = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(len(loader), total))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    start = 0
    ckpt = out / "last.pth"
    if cfg.resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start = state["epoch"]
        if is_main():
            print(f"resumed from {ckpt} at epoch {start}")
    elif cfg.resume and is_main():
        print(f"--resume: no {ckpt} yet, starting from scratch")
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    writer = None
    if is_main():
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(out / "tensorboard")
        except ImportError:
            pass
    metrics = {}
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(
            net,
            criterion,
            loader,
            optimizer,
            scheduler,
            scaler,
            device,
            epoch,
            cfg.clip_grad,
            cfg.progress,
            inputs,
        )
        if is_main():
            save_checkpoint(
                ckpt,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "rng": get_rng_state(),
                    "config": dataclasses.asdict(cfg),
                    "num_classes": train_set.num_classes,
                },
            )
        last = epoch + 1 == cfg.epochs
        record = {"epoch": epoch + 1, **stats}
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            metrics = evaluate(
                model, model.detect, val_loader, val_set, device, cfg.progress, inputs
            )
            if is_main():
                record.update(metrics)
                print(f"epoch {epoch + 1}: loss {stats['loss']:.4f}, AP {100 * metrics['AP']:.1f}")
        if is_main():
            _log(out, record, writer)
        barrier()
    if is_main():
        print("\n" + format_table(metrics, title))
        if writer is not None:
            writer.close()
    return metrics


def evaluate_checkpoint(
    argv,
    config_cls,
    build_model: Callable,
    name: str,
    doc: str,
    title: Callable[[TrainConfig], str],
    inputs: Callable = images_only,
) -> dict:
    """The ``evaluate`` CLI of a detector: ``--checkpoint FILE --data DIR [--split val]``;
    ``title(config)`` heads the printed table."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="COCO-format dataset directory")
    p.add_argument("--split", default="val", help="annotations/instances_SPLIT.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        if "config" not in state or "model" not in state:
            raise ValueError(f"{args.checkpoint} is not a {name} training checkpoint")
        names = {f.name for f in dataclasses.fields(config_cls)}
        if set(state["config"]) != names:
            raise ValueError(f"{args.checkpoint} is not a {name} training checkpoint")
        cfg = config_cls(**{**state["config"], "data": str(args.data), "backbone_weights": ""})
        dataset = CocoDetection(
            args.data,
            args.data / "annotations" / f"instances_{args.split}.json",
            default_transforms(False, cfg.short, cfg.max_size),
        )
    except ValueError as exc:
        p.error(str(exc))
    if dataset.num_classes != state["num_classes"]:
        p.error(
            f"{args.data} has {dataset.num_classes} classes, the checkpoint {state['num_classes']}"
        )
    device = torch.device(args.device)
    model = build_model(cfg, dataset.num_classes).to(device)
    model.load_state_dict(state["model"])
    loader = DataLoader(dataset, args.batch_size, collate_fn=collate)
    metrics = evaluate(model, model.detect, loader, dataset, device, inputs=inputs)
    print(format_table(metrics, f"{title(cfg)} ({args.split})"))
    return metrics
