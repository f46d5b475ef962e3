"""uotmatch's assigners inside Ultralytics YOLO, and its set matchers inside RT-DETR.

YOLO: v8-style detection heads (:func:`trainer`); RT-DETR: :func:`rtdetr_trainer`.

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
from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.nn.modules.head import RTDETRDecoder
from ultralytics.nn.tasks import yaml_model_load
from ultralytics.utils.loss import v8DetectionLoss
from ultralytics.utils.torch_utils import unwrap_model

from uotmatch.detection import DenseAssigner, SetMatcher, SetTargets

__all__ = [
    "PROB_CLAMP",
    "RTDETRMatcher",
    "TaskAssigner",
    "grid_strides",
    "rtdetr_trainer",
    "trainer",
]

#: Probabilities are clamped to ``[PROB_CLAMP, 1 - PROB_CLAMP]`` before ``logit``.
PROB_CLAMP = 1e-7


def grid_strides(points: Tensor, strides: list[float] | None = None) -> Tensor:
    """``[A]`` the stride of each anchor point of Ultralytics' grid.

    The grid is ``(i + 0.5) * s`` per level, ``s`` a power of two: the stride is the largest power
    of two dividing ``2 x`` and ``2 y``."""
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
    """A drop-in for Ultralytics' ``TaskAlignedAssigner``.

    The same call and returns, the assignment made by ``assigner``.

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
        """Ultralytics' ``TaskAlignedAssigner`` call and outputs, from uotmatch's assignment."""
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


def _is_rtdetr(model) -> bool:
    """Whether an Ultralytics model has RT-DETR's decoder head."""
    layers = getattr(model, "model", None)
    return isinstance(layers, nn.Sequential) and isinstance(layers[-1], RTDETRDecoder)


def trainer(assigner: DenseAssigner) -> type[DetectionTrainer]:
    """A ``DetectionTrainer`` subclass whose model's loss assigns with ``assigner``.

    Pass it as ``YOLO("yolov8n.yaml").train(..., trainer=trainer(OTAAssigner()))``.

    The model stays Ultralytics' own ``DetectionModel``: the trainer sets its loss criterion
    (``v8DetectionLoss`` with :class:`TaskAssigner`), which Ultralytics strips from every
    checkpoint, so the weights load and predict in a plain Ultralytics install.
    """
    if not isinstance(assigner, DenseAssigner):
        raise ValueError(
            f"assigner must be a uotmatch.detection DenseAssigner, got {type(assigner).__name__}"
        )

    class UOTDetectionTrainer(DetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            model = super().get_model(cfg, weights, verbose)
            if _is_rtdetr(model):
                raise ValueError(
                    "trainer(assigner) is for YOLO detection models; RT-DETR matches queries "
                    "one-to-one: use rtdetr_trainer(matcher) with a uotmatch set matcher"
                )
            return model

        def set_model_attributes(self):
            super().set_model_attributes()
            model = unwrap_model(self.model)
            criterion = model.init_criterion()
            if type(criterion) is not v8DetectionLoss:
                raise ValueError(
                    f"trainer(assigner) supports v8-style detection losses, not "
                    f"{type(criterion).__name__} (end-to-end heads such as YOLOv10's match "
                    "one-to-one on their own)"
                )
            criterion.assigner = TaskAssigner(assigner, criterion.stride.tolist())
            model.criterion = criterion

    UOTDetectionTrainer.__qualname__ = f"UOTDetectionTrainer[{type(assigner).__name__}]"
    return UOTDetectionTrainer


class RTDETRMatcher(nn.Module):
    """A :class:`~uotmatch.detection.SetMatcher` called as Ultralytics' RT-DETR matcher.

    The call is its ``HungarianMatcher``'s: ``(pred_bboxes [b, nq, 4], pred_scores [b, nq, nc]
    logits, gt_bboxes [n, 4], gt_cls [n], gt_groups)`` (normalised cxcywh; the ground truths of all
    images concatenated, ``gt_groups`` of them per image) -> per image ``(query indices, indices
    into the concatenated ground truths)``.

    ``calls`` counts the matchings made and ``unconverged`` the images among them whose solve
    missed ``tol``.
    """

    def __init__(self, matcher: SetMatcher):
        super().__init__()
        if not isinstance(matcher, SetMatcher):
            raise ValueError(
                f"matcher must be a uotmatch.detection SetMatcher, got {type(matcher).__name__}"
            )
        self.matcher = matcher
        self.calls = self.unconverged = 0

    @torch.no_grad()
    def forward(self, pred_bboxes, pred_scores, gt_bboxes, gt_cls, gt_groups):
        """RT-DETR's ``HungarianMatcher`` call: indices into the concatenated targets."""
        self.calls += 1
        b, nq = pred_scores.shape[:2]
        sizes = [int(n) for n in gt_groups]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return [(empty, empty) for _ in range(b)]
        G, device = max(sizes), pred_scores.device
        labels = torch.zeros(b, G, dtype=torch.long, device=device)
        boxes = pred_bboxes.new_tensor([0.5, 0.5, 1.0, 1.0]).repeat(b, G, 1)
        mask = torch.zeros(b, G, dtype=torch.bool, device=device)
        for i, (cls, box) in enumerate(
            zip(gt_cls.split(sizes), gt_bboxes.split(sizes), strict=True)
        ):
            labels[i, : len(cls)], boxes[i, : len(cls)], mask[i, : len(cls)] = cls, box, True
        outputs = {"pred_logits": pred_scores.detach(), "pred_boxes": pred_bboxes.detach()}
        m = self.matcher.solve(outputs, SetTargets(labels, boxes.float(), mask))
        self.unconverged += int((~m.converged).sum())
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        return [(p, g + offsets[i]) for i, (p, g) in enumerate(m.pairs(self.matcher.decode))]


def rtdetr_trainer(matcher: SetMatcher) -> type[RTDETRTrainer]:
    """An ``RTDETRTrainer`` subclass whose loss matches with ``matcher``.

    Pass it as ``RTDETR("rtdetr-l.yaml").train(...,
    trainer=rtdetr_trainer(UOTMatcher(focal=True)))``.

    What changes: the matcher of Ultralytics' ``RTDETRDetectionLoss`` (its ``HungarianMatcher``
    with class / bbox / GIoU gains 2 / 5 / 2 and the focal class cost: ``HungarianMatcher(
    cost_class=2, cost_bbox=5, cost_giou=2, focal=True)`` reproduces it). What stays: the
    model, its varifocal and box losses (divided by the number of matched pairs, which the
    default ``decode="hungarian"`` keeps equal to the number of targets), the denoising
    queries, validation and checkpoints, which Ultralytics saves without the loss criterion:
    they load in a plain Ultralytics install.
    """
    if not isinstance(matcher, SetMatcher):
        raise ValueError(
            f"matcher must be a uotmatch.detection SetMatcher, got {type(matcher).__name__}"
        )

    class UOTRTDETRTrainer(RTDETRTrainer):
        def get_model(self, cfg=None, weights=None, verbose=True):
            yaml = yaml_model_load(cfg) if isinstance(cfg, str) else cfg
            head = yaml.get("head", []) if isinstance(yaml, dict) else []
            names = {str(part) for layer in head if isinstance(layer, list) for part in layer}
            if (head and "RTDETRDecoder" not in names) or (weights and not _is_rtdetr(weights)):
                raise ValueError(
                    "rtdetr_trainer(matcher) is for RT-DETR models; a YOLO model takes "
                    "trainer(assigner) with a uotmatch dense assigner"
                )
            return super().get_model(cfg, weights, verbose)

        def set_model_attributes(self):
            super().set_model_attributes()
            model = unwrap_model(self.model)
            criterion = model.init_criterion()
            criterion.matcher = RTDETRMatcher(matcher)
            model.criterion = criterion

    UOTRTDETRTrainer.__qualname__ = f"UOTRTDETRTrainer[{type(matcher).__name__}]"
    return UOTRTDETRTrainer
