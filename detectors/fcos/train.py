"""Train FCOS with any assigner on a COCO-format dataset, on CPU, a GPU, or many through torchrun.

    python -m detectors.fcos.train --data DIR --assigner ota --epochs 12 --out runs/NAME [--resume]
    torchrun --nproc_per_node 2 -m detectors.fcos.train --data DIR ...

``DIR`` holds ``annotations/instances_train.json`` and ``instances_val.json`` with image paths
relative to ``DIR`` (what ``python -m detectors.data.colorboxes`` writes). ``--out`` receives
``last.pth`` (atomic, every epoch; ``--resume`` continues from it), ``metrics.jsonl`` and, when
``tensorboard`` is installed, TensorBoard logs. Defaults are sized for a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from detectors.common.backbone import build_resnet
from detectors.common.config import parse_config
from detectors.common.trainer import TrainConfig, datasets, fit, setup, warmup_cosine
from detectors.fcos.loss import ASSIGNERS, FCOSLoss, build_assigner
from detectors.fcos.model import FCOS

__all__ = ["FCOSConfig", "build_model", "main"]


@dataclass
class FCOSConfig(TrainConfig):
    out: str = field(default="runs/fcos", metadata={"help": "output directory"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (cosine decay)"})
    assigner: str = field(
        default="ota", metadata={"help": "label assignment", "choices": ASSIGNERS}
    )
    momentum: float = 0.9
    channels: int = field(default=64, metadata={"help": "FPN and head width"})
    head_depth: int = field(default=2, metadata={"help": "convs per head tower (FCOS: 4)"})
    eps: float = field(default=0.1, metadata={"help": "ota/uot entropic regularisation"})
    tau1: float = field(default=math.inf, metadata={"help": "uot: anchor marginal penalty"})
    tau2: float = field(default=math.inf, metadata={"help": "uot: ground-truth marginal penalty"})
    radius: float = field(default=0.0, metadata={"help": "centre radius in strides (0: default)"})
    k: float = field(default=0.0, metadata={"help": "ota/uot fixed k (0: dynamic k)"})
    q: int = field(default=0, metadata={"help": "ota/uot/simota top-q for dynamic k (0: default)"})


def build_model(cfg: FCOSConfig, num_classes: int) -> FCOS:
    backbone = build_resnet(cfg.depth, cfg.freeze_at, cfg.backbone_weights or None)
    return FCOS(num_classes, backbone, cfg.channels, cfg.head_depth)


def main(argv=None) -> dict:
    cfg = parse_config(FCOSConfig, argv, description=__doc__.split("\n\n")[0])
    device, distributed = setup(cfg)
    train_set, val_set = datasets(cfg)
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
    return fit(
        cfg,
        model,
        criterion,
        optimizer,
        lambda per_epoch, total: warmup_cosine(cfg.warmup_iters, total),
        train_set,
        val_set,
        device,
        distributed,
        title=f"FCOS-{cfg.assigner}",
    )


if __name__ == "__main__":
    main()
