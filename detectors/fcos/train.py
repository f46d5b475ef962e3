"""Train FCOS with any assigner on a COCO-format dataset, on CPU, a GPU, or many through torchrun.

    python -m detectors.fcos.train --data DIR --assigner ota --epochs 12 --out runs/NAME [--resume]
    torchrun --nproc_per_node 2 -m detectors.fcos.train --data DIR ...

``DIR`` holds ``annotations/instances_train.json`` and ``instances_val.json`` with image paths
relative to ``DIR`` (what ``python -m detectors.data.colorboxes`` writes). ``--out`` receives
``last.pth`` (atomic, every epoch; ``--resume`` continues from it), ``metrics.jsonl`` and, when
``tensorboard`` is installed, TensorBoard logs. Defaults are sized for a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from detectors.common.backbone import build_resnet
from detectors.common.config import TrainConfig, chosen_options, parse_config
from detectors.common.trainer import (
    build,
    command,
    datasets,
    fit,
    setup,
    warmup_cosine,
)
from detectors.fcos.loss import FCOSLoss
from detectors.fcos.model import FCOS
from uotmatch.detection import ASSIGNERS, SIMOTA_GEOMETRIES, build_assigner, options_of
from uotmatch.detection._ota import DECODINGS

__all__ = ["ASSIGNER_FIELDS", "FCOSConfig", "build_model", "main"]


#: The config fields that are assigner options (``--eps`` ... ``--decode``): each is passed to the
#: assigner only when given, and one the chosen assigner does not take is an error.
ASSIGNER_FIELDS = (
    "eps",
    "tau1",
    "tau2",
    "radius",
    "k",
    "candidate_topk",
    "topk",
    "geometry",
    "decode",
    "max_iter",
    "tol",
)


@dataclass
class FCOSConfig(TrainConfig):
    out: str = field(default="runs/fcos", metadata={"help": "output directory"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (cosine decay)"})
    assigner: str = field(
        default="ota", metadata={"help": "label assignment", "choices": tuple(ASSIGNERS)}
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    channels: int = field(default=64, metadata={"help": "FPN and head width"})
    head_depth: int = field(default=2, metadata={"help": "convs per head tower (FCOS: 4)"})
    eps: float | None = field(
        default=None, metadata={"help": "ota, uot: entropic regularisation", "default_help": "0.1"}
    )
    tau1: float | None = field(
        default=None, metadata={"help": "uot: anchor marginal penalty", "default_help": "inf"}
    )
    tau2: float | None = field(
        default=None, metadata={"help": "uot: ground-truth marginal penalty", "default_help": "inf"}
    )
    radius: float | None = field(
        default=None,
        metadata={
            "help": "fcos, simota, ota, uot: centre radius in strides",
            "default_help": "fcos 1.5, simota per --geometry, ota/uot 2.5",
        },
    )
    k: float | None = field(
        default=None, metadata={"help": "ota, uot: fixed k", "default_help": "dynamic k"}
    )
    candidate_topk: int | None = field(
        default=None,
        metadata={
            "help": "simota, ota, uot: top IoUs summed for the dynamic k",
            "default_help": "simota 10, ota/uot 20",
        },
    )
    topk: int | None = field(
        default=None, metadata={"help": "atss: candidates per level", "default_help": "9"}
    )
    geometry: str | None = field(
        default=None,
        metadata={
            "help": "simota: candidate geometry",
            "choices": tuple(SIMOTA_GEOMETRIES),
            "default_help": "yolox-0.3",
        },
    )
    decode: str | None = field(
        default=None,
        metadata={
            "help": "ota, uot: plan decoding",
            "choices": DECODINGS,
            "default_help": "official",
        },
    )

    max_iter: int | None = field(
        default=None,
        metadata={"help": "ota, uot: solver iterations at most", "default_help": "1000"},
    )
    tol: float | None = field(
        default=None,
        metadata={
            "help": "ota, uot: solver tolerance (relative marginal error)",
            "default_help": "the assigner's",
        },
    )

    def __post_init__(self):
        super().__post_init__()
        given = chosen_options(
            self, ASSIGNER_FIELDS, "assigner", self.assigner, ASSIGNERS[self.assigner]
        )
        self.assigner_options = given
        build_assigner(self.assigner, **given)  # every value checked now, not at the first step

    def recorded(self) -> dict:
        return {"assigner": self.assigner, "assigner_options": self.assigner_options}

    #: Fields of checkpoints written before the one detection API: old name -> new name.
    LEGACY_FIELDS: ClassVar[dict] = {"q": "candidate_topk"}

    @classmethod
    def upgrade(cls, stored: dict) -> dict:
        """A config stored by an older version: ``q`` is ``candidate_topk``, 0 meant "the
        assigner's default" (now: not given), and the solver options it always stored (eps,
        tau1, tau2) are kept only where the assigner takes them."""
        stored = {cls.LEGACY_FIELDS.get(k, k): v for k, v in stored.items()}
        for name in ("radius", "k", "candidate_topk"):
            if stored.get(name) == 0:
                stored[name] = None
        stored.setdefault("overwrite", False)
        stored.setdefault("accept_changes", False)
        for name in ASSIGNER_FIELDS:
            stored.setdefault(name, None)
        takes = options_of(ASSIGNERS.get(stored.get("assigner"), object))
        for name in ("eps", "tau1", "tau2"):
            if name not in takes:
                stored[name] = None
        return stored


def build_model(cfg: FCOSConfig, num_classes: int) -> FCOS:
    backbone = build_resnet(cfg.depth, cfg.freeze_at, cfg.backbone_weights or None)
    return FCOS(num_classes, backbone, cfg.channels, cfg.head_depth)


@command("python -m detectors.fcos.train")
def main(argv=None) -> dict:
    cfg = parse_config(
        FCOSConfig,
        argv,
        description=__doc__.split("\n\n")[0],
        prog="python -m detectors.fcos.train",
    )
    device, distributed = setup(cfg)
    train_set, val_set = datasets(cfg)
    model = build(build_model, cfg, train_set.num_classes).to(device)
    criterion = FCOSLoss(build_assigner(cfg.assigner, **cfg.assigner_options))
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
