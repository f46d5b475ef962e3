"""FCOS losses on targets from any :mod:`uotmatch.detection` assigner."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from uotmatch.detection import (
    AssignResult,
    ATSSAssigner,
    FCOSAssigner,
    OTAAssigner,
    SimOTAAssigner,
    UOTAssigner,
    aligned_iou,
)

__all__ = ["ASSIGNERS", "FCOSLoss", "build_assigner"]

ASSIGNERS = ("fcos", "atss", "simota", "ota", "uot")


def build_assigner(
    name: str,
    *,
    eps: float = 0.1,
    tau1: float = math.inf,
    tau2: float = math.inf,
    radius: float | None = None,
    k: float | None = None,
    q: int | None = None,
):
    """The assigner named by ``--assigner``, with its options (None: the assigner's default)."""
    opts = {key: v for key, v in (("radius", radius), ("k", k), ("q", q)) if v is not None}
    if name == "fcos":
        return FCOSAssigner(**({"radius": radius} if radius is not None else {}))
    if name == "atss":
        return ATSSAssigner()
    if name == "simota":
        return SimOTAAssigner(**{key: v for key, v in opts.items() if key in ("radius", "q")})
    if name == "ota":
        return OTAAssigner(eps, **opts)
    if name == "uot":
        return UOTAssigner(eps, tau1, tau2, **opts)
    raise ValueError(f"--assigner must be one of {ASSIGNERS}, got {name!r}")


def assign(assigner, outputs: dict[str, Tensor], batch) -> AssignResult:
    """Call ``assigner`` with what it takes (predictions are detached: assignment is fixed)."""
    common = (outputs["points"], outputs["strides"])
    boxes = outputs["boxes"].detach()
    if isinstance(assigner, (FCOSAssigner, ATSSAssigner)):
        return assigner(
            *common, batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"], pred_boxes=boxes
        )
    return assigner(
        *common,
        outputs["cls_logits"].detach(),
        boxes,
        batch["gt_boxes"],
        batch["gt_labels"],
        batch["gt_mask"],
    )


def _num_foreground(result: AssignResult) -> Tensor:
    """Foreground anchors per rank, all-reduced and averaged, at least 1 (DETR's num_boxes)."""
    n = result.num_fg.sum().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp_min(1.0)


class FCOSLoss:
    """Focal classification (alpha 0.25, gamma 2) over all anchors, GIoU box loss x 2 and IoU
    branch BCE x 0.5 over the foreground, each divided by the (all-reduced) foreground count."""

    def __init__(
        self,
        assigner,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_weight: float = 2.0,
        iou_weight: float = 0.5,
    ):
        self.assigner = assigner
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.giou_weight, self.iou_weight = giou_weight, iou_weight

    def __call__(self, outputs: dict[str, Tensor], batch) -> dict[str, Tensor]:
        result = assign(self.assigner, outputs, batch)
        fg = result.fg_mask  # [B, A]
        n = _num_foreground(result)
        logits = outputs["cls_logits"].float()
        target = torch.zeros_like(logits)
        target[fg, result.labels[fg]] = 1.0
        loss_cls = (
            sigmoid_focal_loss(
                logits, target, self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            / n
        )
        pred = outputs["boxes"][fg].float()
        gt = result.boxes[fg]
        loss_box = self.giou_weight * generalized_box_iou_loss(pred, gt, reduction="sum") / n
        iou_target = aligned_iou(pred.detach(), gt)
        loss_iou = (
            self.iou_weight
            * F.binary_cross_entropy_with_logits(
                outputs["iou_logits"][fg].float(), iou_target, reduction="sum"
            )
            / n
        )
        return {
            "loss_cls": loss_cls,
            "loss_box": loss_box,
            "loss_iou": loss_iou,
            "loss": loss_cls + loss_box + loss_iou,
            "num_fg": result.num_fg.sum(),
        }
