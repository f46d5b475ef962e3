"""Train FCOS with any assigner on a COCO-format dataset, on CPU, a GPU, or many through torchrun.

    python -m detectors.fcos.train --data DIR --assigner ota --epochs 12 --out runs/NAME [--resume]
    torchrun --nproc_per_node 2 -m detectors.fcos.train --data DIR ...

``DIR`` holds ``annotations/instances_train.json`` and ``instances_val.json`` with image paths
relative to ``DIR`` (what ``python -m detectors.data.colorboxes`` writes). ``--out`` receives
``last.pth`` (atomic, every epoch; ``--resume`` continues from it), ``metrics.jsonl`` and, when
``tensorboard`` is installed, TensorBoard logs. Defaults are sized for a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from detectors.common.backbone import build_resnet
from detectors.common.checkpoint import (
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from detectors.common.config import parse_config
from detectors.common.data import CocoDetection, collate, default_transforms
from detectors.common.dist import barrier, init_distributed, is_main, rank, world_size
from detectors.common.engine import evaluate, train_one_epoch
from detectors.common.evaluation import format_table
from detectors.fcos.loss import ASSIGNERS, FCOSLoss, build_assigner
from detectors.fcos.model import FCOS

__all__ = ["FCOSConfig", "build_model", "main"]


@dataclass
class FCOSConfig:
    data: str = field(default="", metadata={"help": "COCO-format dataset directory"})
    out: str = field(default="runs/fcos", metadata={"help": "output directory"})
    assigner: str = field(
        default="ota", metadata={"help": "label assignment", "choices": ASSIGNERS}
    )
    epochs: int = field(default=12, metadata={"help": "training epochs"})
    batch_size: int = field(default=8, metadata={"help": "images per step per process"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (cosine decay)"})
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = field(default=100, metadata={"help": "linear warm-up iterations"})
    clip_grad: float = field(default=10.0, metadata={"help": "max gradient norm (0: off)"})
    depth: int = field(default=18, metadata={"help": "ResNet depth: 18, 34 or 50"})
    backbone_weights: str = field(default="", metadata={"help": "local torchvision checkpoint"})
    freeze_at: int = field(default=0, metadata={"help": "freeze stem (1) and stages (2..5)"})
    channels: int = field(default=64, metadata={"help": "FPN and head width"})
    head_depth: int = field(default=2, metadata={"help": "convs per head tower (FCOS: 4)"})
    short: int = field(default=128, metadata={"help": "resize short side to this"})
    max_size: int = field(default=128, metadata={"help": "cap on the long side"})
    eps: float = field(default=0.1, metadata={"help": "ota/uot entropic regularisation"})
    tau1: float = field(default=math.inf, metadata={"help": "uot: anchor marginal penalty"})
    tau2: float = field(default=math.inf, metadata={"help": "uot: ground-truth marginal penalty"})
    radius: float = field(default=0.0, metadata={"help": "centre radius in strides (0: default)"})
    k: float = field(default=0.0, metadata={"help": "ota/uot fixed k (0: dynamic k)"})
    q: int = field(default=0, metadata={"help": "ota/uot/simota top-q for dynamic k (0: default)"})
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


def build_model(cfg: FCOSConfig, num_classes: int) -> FCOS:
    backbone = build_resnet(cfg.depth, cfg.freeze_at, cfg.backbone_weights or None)
    return FCOS(num_classes, backbone, cfg.channels, cfg.head_depth)


def _datasets(cfg: FCOSConfig):
    root = Path(cfg.data)
    ann = root / "annotations"
    train = CocoDetection(
        root, ann / "instances_train.json", default_transforms(True, cfg.short, cfg.max_size)
    )
    val = CocoDetection(
        root, ann / "instances_val.json", default_transforms(False, cfg.short, cfg.max_size)
    )
    return train, val


def _lr_lambda(warmup: int, total: int):
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


def main(argv=None) -> dict:
    cfg = parse_config(FCOSConfig, argv, description=__doc__.split("\n\n")[0])
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    distributed = init_distributed(device)
    torch.manual_seed(cfg.seed + rank())
    random.seed(cfg.seed + rank())
    np.random.seed(cfg.seed + rank())
    out = Path(cfg.out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    train_set, val_set = _datasets(cfg)
    model = build_model(cfg, train_set.num_classes).to(device)
    criterion = FCOSLoss(
        build_assigner(
            cfg.assigner,
            eps=cfg.eps,
            tau1=cfg.tau1,
            tau2=cfg.tau2,
            radius=cfg.radius or None,
            k=cfg.k or None,
            q=cfg.q or None,
        )
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    sampler = DistributedSampler(
        train_set, num_replicas=world_size(), rank=rank(), shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        train_set,
        cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.workers,
        drop_last=False,
    )
    val_loader = DataLoader(
        Subset(val_set, range(rank(), len(val_set), world_size())),
        cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.workers,
    )
    total = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_iters, total))
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
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
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
            metrics = evaluate(model, model.detect, val_loader, val_set, device, cfg.progress)
            if is_main():
                record.update(metrics)
                print(f"epoch {epoch + 1}: loss {stats['loss']:.4f}, AP {100 * metrics['AP']:.1f}")
        if is_main():
            _log(out, record, writer)
        barrier()
    if is_main():
        print("\n" + format_table(metrics, f"FCOS-{cfg.assigner}"))
        if writer is not None:
            writer.close()
    return metrics


if __name__ == "__main__":
    main()
