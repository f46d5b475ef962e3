"""FCOS losses on targets from any :mod:`uotmatch.detection` dense assigner."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from detectors.common.dist import global_count
from uotmatch.detection import DenseAssigner, aligned_iou

__all__ = ["LOSS_WEIGHTS", "FCOSLoss"]

#: The OTA code's weights: focal classification 1, GIoU box 2, IoU-branch BCE 0.5.
LOSS_WEIGHTS = {"loss_cls": 1.0, "loss_box": 2.0, "loss_iou": 0.5}


class FCOSLoss:
    """Sigmoid focal classification over all anchors, GIoU box loss and IoU-branch BCE over the
    foreground, each divided by the (all-reduced) foreground count, combined by
    ``weight_dict`` (DETR's structure; default :data:`LOSS_WEIGHTS`).

    ``assigner`` is any :class:`~uotmatch.detection.DenseAssigner`, called with the model's
    detached predictions (the assignment is a fixed target).
    """

    def __init__(
        self,
        assigner: DenseAssigner,
        *,
        weight_dict: Mapping[str, float] = LOSS_WEIGHTS,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        unknown = sorted(set(weight_dict) - set(LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"weight_dict keys must be among {sorted(LOSS_WEIGHTS)}: {unknown}")
        self.assigner, self.weight_dict = assigner, {**LOSS_WEIGHTS, **weight_dict}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def __call__(self, outputs: dict[str, Tensor], batch) -> dict[str, Tensor]:
        result = self.assigner(
            points=outputs["points"],
            strides=outputs["strides"],
            cls_logits=outputs["cls_logits"].detach(),
            pred_boxes=outputs["boxes"].detach(),
            gt_boxes=batch["gt_boxes"],
            gt_labels=batch["gt_labels"],
            gt_mask=batch["gt_mask"],
        )
        fg = result.fg_mask  # [B, A]
        n = global_count(result.num_fg.sum())
        logits = outputs["cls_logits"].float()
        target = torch.zeros_like(logits)
        target[fg, result.labels[fg]] = 1.0
        losses = {
            "loss_cls": sigmoid_focal_loss(
                logits, target, self.focal_alpha, self.focal_gamma, reduction="sum"
            )
            / n
        }
        pred = outputs["boxes"][fg].float()
        gt = result.boxes[fg]
        losses["loss_box"] = generalized_box_iou_loss(pred, gt, reduction="sum") / n
        iou_target = aligned_iou(pred.detach(), gt)
        iou_logits = outputs["iou_logits"][fg].float()
        losses["loss_iou"] = (
            F.binary_cross_entropy_with_logits(iou_logits, iou_target, reduction="sum") / n
        )
        losses["loss"] = sum(self.weight_dict[k] * v for k, v in losses.items())
        # Logged per epoch (summed): images whose transport problem did not reach tol.
        losses["unconverged"] = (~result.converged).sum()
        losses["num_fg"] = result.num_fg.sum()
        return losses
