"""Train DETR with Hungarian or UOT matching on a COCO-format dataset (CPU, GPU, torchrun).

    python -m detectors.detr.train --data DIR --matcher uot --epochs 50 --out runs/NAME [--resume]
    python -m detectors.detr.train --data DIR --preset uot-paper --out runs/NAME
    torchrun --nproc_per_node 2 -m detectors.detr.train --data DIR ...

``--matcher hungarian`` is DETR's; ``--matcher uot`` solves the batch's matching with
:func:`uotmatch.match` in the regime ``--eps --tau1 --tau2`` (background column at
``--background-cost``). ``--loss-weighting plan`` weights every (prediction, target) loss by the
plan (the UOT paper's loss), ``hard`` uses the decoded pairs. ``--preset uot-paper`` is the UOT
paper's DETR setting: balanced OT, eps = 0.12 / (log(2 Q) + 1) on the matching cost divided by
its maximum, matching weights class 2, L1 5, GIoU 2, plan-weighted loss. The output directory,
checkpoints, resume and logs are as for ``detectors.fcos.train``. Defaults are sized for a CPU
(a from-scratch backbone, no dropout or gradient clipping: they slow a small model's escape from
DETR's early loss plateau); DETR-R50 is ``--depth 50 --hidden-dim 256 --enc-layers 6
--dec-layers 6 --dim-feedforward 2048 --num-queries 100 --feature-level 5 --dropout 0.1
--clip-grad 0.1``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from detectors.common.backbone import build_resnet
from detectors.common.config import TrainConfig, chosen_options, parse_config
from detectors.common.trainer import build, command, datasets, fit, setup
from detectors.detr.criterion import LOSS_WEIGHTINGS, SetCriterion, detr_targets
from detectors.detr.model import DETR
from uotmatch import DECODINGS
from uotmatch.detection import MATCHERS, build_matcher

__all__ = [
    "DETRConfig",
    "MATCHER_FIELDS",
    "PRESETS",
    "build_criterion",
    "build_model",
    "detr_inputs",
    "main",
]

#: The config fields that are matcher options: passed only when given (or set by a preset); one
#: the chosen matcher does not take is an error.
MATCHER_FIELDS = (
    "eps",
    "tau1",
    "tau2",
    "background_cost",
    "normalize_cost",
    "decode",
    "max_iter",
    "tol",
)
#: The UOT paper's eps0 in eps = eps0 / (log(2 Q) + 1), on a cost normalised by its maximum.
PAPER_EPS0 = 0.12


def paper_eps(num_queries: int) -> float:
    """The UOT paper's DETR regularisation for ``num_queries`` predictions."""
    return PAPER_EPS0 / (math.log(2 * num_queries) + 1)


#: Named settings: field -> value, or a function of the config for derived values.
PRESETS = {
    "uot-paper": {
        "matcher": "uot",
        "tau1": math.inf,
        "tau2": math.inf,
        "eps": lambda cfg: paper_eps(cfg.num_queries),
        "normalize_cost": True,
        "set_cost_class": 2.0,
        "set_cost_bbox": 5.0,
        "set_cost_giou": 2.0,
        "loss_weighting": "plan",
    },
}


@dataclass
class DETRConfig(TrainConfig):
    PRESETS: ClassVar[dict] = PRESETS

    out: str = field(default="runs/detr", metadata={"help": "output directory"})
    epochs: int = field(default=50, metadata={"help": "training epochs"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (transformer)"})
    lr_backbone: float = field(default=1e-4, metadata={"help": "AdamW learning rate (backbone)"})
    lr_drop: int | None = field(
        default=None,
        metadata={"help": "epoch of the 10x LR drop", "default_help": "2/3 of --epochs"},
    )
    warmup_iters: int = field(default=0, metadata={"help": "linear warm-up iterations"})
    clip_grad: float = field(
        default=0.0, metadata={"help": "max gradient norm (0: off; DETR's is 0.1)"}
    )
    preset: str = field(
        default="", metadata={"help": "named setting (fixes its fields)", "choices": ("", *PRESETS)}
    )
    matcher: str = field(
        default="hungarian", metadata={"help": "matching", "choices": tuple(MATCHERS)}
    )
    eps: float | None = field(
        default=None, metadata={"help": "uot: entropic regularisation", "default_help": "0.05"}
    )
    tau1: float | None = field(
        default=None, metadata={"help": "uot: prediction marginal penalty", "default_help": "inf"}
    )
    tau2: float | None = field(
        default=None, metadata={"help": "uot: target marginal penalty", "default_help": "inf"}
    )
    background_cost: float | None = field(
        default=None, metadata={"help": "uot: background cost", "default_help": "0"}
    )
    normalize_cost: bool | None = field(
        default=None,
        metadata={"help": "uot: divide each image's cost by its maximum", "default_help": "on"},
    )
    decode: str | None = field(
        default=None,
        metadata={
            "help": "uot: how the plan becomes the hard loss's pairs",
            "choices": DECODINGS,
            "default_help": "hungarian: every target gets a query",
        },
    )
    max_iter: int | None = field(
        default=None, metadata={"help": "uot: solver iterations at most", "default_help": "1000"}
    )
    tol: float | None = field(
        default=None,
        metadata={
            "help": "uot: solver tolerance (relative marginal error)",
            "default_help": "1e-3, uotmatch.detection.MATCHER_TOL",
        },
    )
    loss_weighting: str = field(
        default="hard", metadata={"help": "pairs or plan-weighted", "choices": LOSS_WEIGHTINGS}
    )
    set_cost_class: float = field(default=1.0, metadata={"help": "matching cost: class"})
    set_cost_bbox: float = field(default=5.0, metadata={"help": "matching cost: L1"})
    set_cost_giou: float = field(default=2.0, metadata={"help": "matching cost: GIoU"})
    ce_loss_coef: float = field(default=1.0, metadata={"help": "loss weight: classification"})
    bbox_loss_coef: float = field(default=5.0, metadata={"help": "loss weight: L1"})
    giou_loss_coef: float = field(default=2.0, metadata={"help": "loss weight: GIoU"})
    eos_coef: float = field(default=0.1, metadata={"help": "no-object class weight"})
    focal: bool = field(default=False, metadata={"help": "sigmoid focal classification"})
    aux_loss: bool = field(default=True, metadata={"help": "losses on every decoder layer"})
    hidden_dim: int = field(default=128, metadata={"help": "transformer width"})
    nheads: int = field(default=8, metadata={"help": "attention heads"})
    enc_layers: int = field(default=2, metadata={"help": "encoder layers"})
    dec_layers: int = field(default=2, metadata={"help": "decoder layers"})
    dim_feedforward: int = field(default=512, metadata={"help": "feed-forward width"})
    dropout: float = field(default=0.0, metadata={"help": "transformer dropout (DETR's: 0.1)"})
    num_queries: int = field(default=50, metadata={"help": "object queries"})
    feature_level: int = field(
        default=4, metadata={"help": "backbone level read: 3, 4, 5 (stride 8, 16, 32)"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.preset:
            self._apply_preset(PRESETS[self.preset])
        if self.num_queries < 1:
            raise ValueError(f"--num-queries must be >= 1, got {self.num_queries}")
        given = chosen_options(
            self, MATCHER_FIELDS, "matcher", self.matcher, MATCHERS[self.matcher]
        )
        self.matcher_options = {
            **given,
            "cost_class": self.set_cost_class,
            "cost_bbox": self.set_cost_bbox,
            "cost_giou": self.set_cost_giou,
            "focal": self.focal,
        }
        build_matcher(self.matcher, **self.matcher_options)  # every value checked now

    def recorded(self) -> dict:
        options = {k: v for k, v in self.matcher_options.items() if not k.startswith("cost_")}
        return {
            "matcher": self.matcher,
            "matcher_options": options,
            "loss_weighting": self.loss_weighting,
        }

    @classmethod
    def upgrade(cls, stored: dict) -> dict:
        """A config stored by an older version: it always stored the UOT matcher's options
        (kept only for ``--matcher uot``), and ``lr_drop`` 0 meant "2/3 of the epochs"."""
        stored = dict(stored)
        stored.setdefault("overwrite", False)
        stored.setdefault("accept_changes", False)
        for name in MATCHER_FIELDS:
            stored.setdefault(name, None)
        if stored.get("lr_drop") == 0:
            stored["lr_drop"] = None
        if stored.get("matcher") != "uot":
            for name in MATCHER_FIELDS:
                stored[name] = None
        return stored

    def _apply_preset(self, preset: dict) -> None:
        """Set the preset's fields. On the command line a field given explicitly is checked by
        :func:`~detectors.common.config.parse_config`; here a field away from both its default
        and the preset's value is an error (nothing is silently overridden)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in preset.items():
            value = value(self) if callable(value) else value
            given = getattr(self, name)
            if given != defaults[name] and given != value:
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"--preset {self.preset} sets {flag} to {value!r}, but {flag} {given!r} "
                    "was given too: drop one of them"
                )
            setattr(self, name, value)


def build_model(cfg: DETRConfig, num_classes: int) -> DETR:
    backbone = build_resnet(cfg.depth, cfg.freeze_at, cfg.backbone_weights or None)
    return DETR(
        num_classes,
        backbone,
        hidden_dim=cfg.hidden_dim,
        nheads=cfg.nheads,
        enc_layers=cfg.enc_layers,
        dec_layers=cfg.dec_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout,
        num_queries=cfg.num_queries,
        feature_level=cfg.feature_level,
        aux_loss=cfg.aux_loss,
        focal=cfg.focal,
    )


def build_criterion(cfg: DETRConfig, num_classes: int) -> SetCriterion:
    weights = {
        "loss_ce": cfg.ce_loss_coef,
        "loss_bbox": cfg.bbox_loss_coef,
        "loss_giou": cfg.giou_loss_coef,
    }
    return SetCriterion(
        num_classes,
        build_matcher(cfg.matcher, **cfg.matcher_options),
        weights,
        eos_coef=cfg.eos_coef,
        loss_weighting=cfg.loss_weighting,
        focal=cfg.focal,
    )


def detr_inputs(batch) -> tuple:
    """What :class:`DETR` takes from a batch: the images and their padding mask."""
    return batch["images"], batch["pad_mask"]


def title(cfg: DETRConfig) -> str:
    weighting = "" if cfg.loss_weighting == "hard" else f", {cfg.loss_weighting} loss"
    return f"DETR-{cfg.matcher}{weighting}"


@command("python -m detectors.detr.train")
def main(argv=None) -> dict:
    cfg = parse_config(
        DETRConfig,
        argv,
        description=__doc__.split("\n\n")[0],
        prog="python -m detectors.detr.train",
    )
    device, distributed = setup(cfg)
    train_set, val_set = datasets(cfg)
    model = build(build_model, cfg, train_set.num_classes).to(device)
    criterion = build_criterion(cfg, train_set.num_classes).to(device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in trainable if not n.startswith("backbone.")]},
        {"params": [p for n, p in trainable if n.startswith("backbone.")], "lr": cfg.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    drop_epoch = cfg.lr_drop if cfg.lr_drop is not None else max(1, round(cfg.epochs * 2 / 3))

    def lr_lambda(per_epoch: int, total: int):
        def f(it: int) -> float:
            warm = min(1.0, (it + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
            return warm * (0.1 if it >= drop_epoch * per_epoch else 1.0)

        return f

    return fit(
        cfg,
        model,
        lambda outputs, batch: criterion(outputs, detr_targets(batch)),
        optimizer,
        lr_lambda,
        train_set,
        val_set,
        device,
        distributed,
        title=title(cfg),
        inputs=detr_inputs,
    )


if __name__ == "__main__":
    main()
