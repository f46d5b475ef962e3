"""uotmatch's assigners inside Ultralytics YOLO (v8-style detection heads).

    from ultralytics import YOLO
    from uotmatch.detection import OTAAssigner
    from uotmatch.integrations.ultralytics import trainer

    YOLO("yolov8n.yaml").train(data="data.yaml", trainer=trainer(OTAAssigner()), epochs=100)

What changes: the loss's ``TaskAlignedAssigner`` becomes :class:`TaskAssigner`, which calls any
:class:`~uotmatch.detection.DenseAssigner` and answers with TAL's five tensors. What stays: the
model, the data pipeline, the losses (BCE classification, CIoU + DFL box losses), validation,
checkpoints and every other training setting. Ultralytics is AGPL-3.0: it is imported here only,
when this module is, and none of its code is copied.

Ultralytics passes class *probabilities*; the assigners take logits, so ``logit(p)`` with ``p``
clamped to ``[PROB_CLAMP, 1 - PROB_CLAMP]`` (``+-16.1``, where a sigmoid saturates in float32).
It does not pass strides: each anchor point sits at ``(i + 0.5) * s`` of its level's grid, so its
stride is the largest power of two dividing ``2 x`` (and ``2 y``), checked against the model's
strides when known. Soft ``target_scores`` are the IoU of each assigned (prediction, ground
truth) pair on the assigned class, 0 elsewhere: the quality TAL's normalised alignment metric
also ends in (TAL scales it to the ground truth's best IoU), without TAL's alpha / beta metric.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils.loss import v8DetectionLoss

from uotmatch.detection import DenseAssigner

__all__ = ["PROB_CLAMP", "TaskAssigner", "UOTDetectionModel", "grid_strides", "trainer"]

#: Probabilities are clamped to ``[PROB_CLAMP, 1 - PROB_CLAMP]`` before ``logit``.
PROB_CLAMP = 1e-7


def grid_strides(points: Tensor, strides: list[float] | None = None) -> Tensor:
    """``[A]`` the stride of each anchor point of Ultralytics' grid (``(i + 0.5) * s`` per
    level, ``s`` a power of two): the largest power of two dividing ``2 x`` and ``2 y``."""
    twice = (2 * points).round().long()  # exact: the points are half-integers times s
    lowest = twice & -twice  # the lowest set bit
    s = torch.minimum(lowest[:, 0], lowest[:, 1]).to(points.dtype)
    if strides is not None:
        known = torch.tensor(strides, dtype=points.dtype, device=points.device)
        if not bool((s[:, None] == known).any(1).all()):
            raise ValueError(
                f"anchor points: cannot recover the strides {list(strides)} from their grid "
                "(points at (i + 0.5) * stride expected)"
            )
    return s


class TaskAssigner(nn.Module):
    """A drop-in for Ultralytics' ``TaskAlignedAssigner``: the same call and returns, the
    assignment made by ``assigner``.

    ``forward(pd_scores [b, A, nc] probabilities, pd_bboxes [b, A, 4] xyxy pixels, anc_points
    [A, 2] pixels, gt_labels [b, n, 1], gt_bboxes [b, n, 4], mask_gt [b, n, 1])`` returns
    ``(target_labels [b, A], target_bboxes [b, A, 4], target_scores [b, A, nc], fg_mask [b, A],
    target_gt_idx [b, A])``, with TAL's conventions: background anchors have ``fg_mask``
    False, ``target_gt_idx`` 0 and zero scores.

    Args:
        assigner: any :class:`~uotmatch.detection.DenseAssigner`.
        strides: the model's strides, to check the ones recovered from the grid (optional).
    """

    def __init__(self, assigner: DenseAssigner, strides: list[float] | None = None):
        super().__init__()
        if not isinstance(assigner, DenseAssigner):
            raise ValueError(
                "assigner must be a uotmatch.detection DenseAssigner, got "
                f"{type(assigner).__name__}"
            )
        self.assigner, self.strides = assigner, strides
        self.last_result = None

    @torch.no_grad()
    def forward(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra):
        if extra:
            raise ValueError(f"TaskAssigner takes no extra inputs, got {sorted(extra)}")
        b, A, nc = pd_scores.shape
        if gt_bboxes.shape[1] == 0:  # as TaskAlignedAssigner
            return (
                torch.full_like(pd_scores[..., 0], nc),
                torch.zeros_like(pd_bboxes),
                torch.zeros_like(pd_scores),
                torch.zeros_like(pd_scores[..., 0], dtype=torch.bool),
                torch.zeros_like(pd_scores[..., 0]),
            )
        labels = gt_labels.reshape(b, -1).long()
        logits = torch.logit(pd_scores.float().clamp(PROB_CLAMP, 1 - PROB_CLAMP))
        result = self.assigner(
            points=anc_points.float(),
            strides=grid_strides(anc_points.float(), self.strides),
            cls_logits=logits,
            pred_boxes=pd_bboxes.float(),
            gt_boxes=gt_bboxes.float(),
            gt_labels=labels,
            gt_mask=mask_gt.reshape(b, -1).bool(),
        )
        self.last_result = result
        fg_mask = result.fg_mask
        target_gt_idx = result.gt_index.clamp_min(0)  # TAL: 0 on background
        target_labels = labels.gather(1, target_gt_idx)
        target_bboxes = gt_bboxes.gather(1, target_gt_idx[..., None].expand(-1, -1, 4))
        quality = (result.ious * fg_mask).to(pd_scores.dtype)
        target_scores = torch.zeros_like(pd_scores)
        target_scores.scatter_(2, target_labels[..., None], quality[..., None])
        return target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx


class UOTDetectionModel(DetectionModel):
    """Ultralytics' ``DetectionModel`` whose loss assigns with ``uotmatch_assigner`` (set by
    :func:`trainer`); everything else is the stock model (a module-level class, so that the
    checkpoints Ultralytics pickles load again)."""

    uotmatch_assigner: DenseAssigner | None = None

    def init_criterion(self):
        criterion = super().init_criterion()
        if type(criterion) is not v8DetectionLoss:
            name = type(criterion).__name__
            raise ValueError(
                f"trainer(assigner) supports v8-style detection losses, not {name} "
                "(end-to-end heads such as YOLOv10's match one-to-one on their own)"
            )
        criterion.assigner = TaskAssigner(self.uotmatch_assigner, criterion.stride.tolist())
        return criterion


def trainer(assigner: DenseAssigner) -> type[DetectionTrainer]:
    """A ``DetectionTrainer`` subclass whose model assigns with ``assigner``: pass it as
    ``YOLO("yolov8n.yaml").train(..., trainer=trainer(OTAAssigner()))``."""
    if not isinstance(assigner, DenseAssigner):
        raise ValueError(
            f"assigner must be a uotmatch.detection DenseAssigner, got {type(assigner).__name__}"
        )

    class UOTDetectionTrainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            model = super().get_model(cfg, weights, verbose)
            model.__class__ = UOTDetectionModel
            model.uotmatch_assigner = assigner
            return model

    UOTDetectionTrainer.__qualname__ = f"UOTDetectionTrainer[{type(assigner).__name__}]"
    return UOTDetectionTrainer
