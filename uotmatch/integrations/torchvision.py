"""uotmatch's assigners inside torchvision's detection models.

    from torchvision.models.detection import fcos_resnet50_fpn
    from uotmatch.detection import OTAAssigner
    from uotmatch.integrations.torchvision import use_assigner

    fcos = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)  # no download
    model = use_assigner(fcos, OTAAssigner())
    losses = model(images, targets)  # training mode: torchvision's own losses, OTA's matching

What changes: only the matching step of ``compute_loss`` (torchvision's ``FCOS`` builds
``matched_idxs`` from centre sampling, scale ranges and the smallest-area rule; ``RetinaNet``
from IoU thresholds). The assigner gets the anchors' centres as points, their feature levels'
strides, the detached logits and decoded boxes, and the padded targets; its ``gt_index`` becomes
``matched_idxs``. What stays: the model, its head, its losses (focal, GIoU and centerness for
FCOS; focal and box regression for RetinaNet), inference and its post-processing. One
adjustment for FCOS: an assigner may give a tiny box its nearest point even when that point lies
outside the box (OTA does), and FCOS's centerness target would then take the square root of a
negative ratio; the head's box coder clamps the regression targets at 0 for the centerness, so
such a point gets centerness 0 instead of NaN (points inside their box are unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection._utils import BoxLinearCoder

from uotmatch.detection import AssignResult, DenseAssigner, pad_targets

__all__ = ["use_assigner"]


def use_assigner(model: FCOS | RetinaNet, assigner: DenseAssigner) -> FCOS | RetinaNet:
    """Make ``model``'s training loss use ``assigner``'s matching; returns ``model``.

    Args:
        model: a ``torchvision.models.detection.FCOS`` or ``RetinaNet`` (one point or several
            anchors per feature-map location; each anchor is a row of the assignment).
        assigner: any :class:`~uotmatch.detection.DenseAssigner` (``OTAAssigner``,
            ``UOTAssigner``, ``SimOTAAssigner``, ``ATSSAssigner``, ``FCOSAssigner``).

    After a training step, ``model.uotmatch_result`` holds the last
    :class:`~uotmatch.detection.AssignResult` (per-anchor targets, ``num_fg``). Calling it again
    replaces the assigner.
    """
    if not isinstance(assigner, DenseAssigner):
        raise ValueError(
            f"assigner must be a uotmatch.detection DenseAssigner, got {type(assigner).__name__}"
        )
    if isinstance(model, FCOS):
        model.__class__ = _AssignedFCOS
        coder = model.head.box_coder
        if not isinstance(coder, _NonNegativeTargets):
            model.head.box_coder = _NonNegativeTargets(coder.normalize_by_size)
    elif isinstance(model, RetinaNet):
        model.__class__ = _AssignedRetinaNet
    else:
        raise ValueError(
            "model must be a torchvision.models.detection FCOS or RetinaNet, got "
            f"{type(model).__name__}"
        )
    model.uotmatch_assigner = assigner
    model.uotmatch_result = None
    return model


class _NonNegativeTargets(BoxLinearCoder):
    """FCOS's box coder whose encoded regression targets are at least 0.

    They are used for the centerness target only: a point outside its box gets centerness 0 rather
    than the square root of a negative number."""

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return super().encode(reference_boxes, proposals).clamp_min(0)


def _assign(model, targets, cls_logits: Tensor, pred_boxes: Tensor, anchors, strides):
    """The assigner's ``gt_index`` per image (torchvision's ``matched_idxs``)."""
    anchors0 = anchors[0]
    points = (anchors0[:, :2] + anchors0[:, 2:]) / 2
    gt_boxes, gt_labels, gt_mask = pad_targets(targets, anchors0.device)
    result: AssignResult = model.uotmatch_assigner(
        points=points,
        strides=strides,
        cls_logits=cls_logits.detach(),
        pred_boxes=pred_boxes.detach().float(),
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_mask=gt_mask,
    )
    model.uotmatch_result = result
    return list(result.gt_index.unbind(0))


def _level_strides(anchors0: Tensor, num_anchors_per_level: Sequence[int]) -> Tensor:
    """``[A]`` the stride of each anchor's level.

    The spacing of its level's anchor centres (a level of one location takes twice the previous
    level's)."""
    strides, start, previous = [], 0, None
    centres = (anchors0[:, :2] + anchors0[:, 2:]) / 2
    for n in num_anchors_per_level:
        level = centres[start : start + n]
        spacing = None
        for axis in (0, 1):
            values = level[:, axis].unique()
            if len(values) > 1:
                step = float((values[1:] - values[:-1]).min())
                spacing = step if spacing is None else min(spacing, step)
        if spacing is None:
            spacing = 2 * previous if previous is not None else 1.0
        strides.append(torch.full((n,), spacing, device=anchors0.device))
        previous, start = spacing, start + n
    return torch.cat(strides)


class _AssignedFCOS(FCOS):
    """torchvision's ``FCOS`` whose ``compute_loss`` matches with ``uotmatch_assigner``.

    A module-level class: the model deep-copies, averages and pickles as any torchvision model."""

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        return _fcos_compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level)


class _AssignedRetinaNet(RetinaNet):
    """torchvision's ``RetinaNet`` whose ``compute_loss`` matches with ``uotmatch_assigner``."""

    def compute_loss(self, targets, head_outputs, anchors):
        return _retinanet_compute_loss(self, targets, head_outputs, anchors)


def _fcos_compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
    """torchvision's ``FCOS.compute_loss`` with the assigner's matching."""
    strides = _level_strides(anchors[0], num_anchors_per_level)
    pred_boxes = self.head.box_coder.decode(head_outputs["bbox_regression"], torch.stack(anchors))
    matched_idxs = _assign(self, targets, head_outputs["cls_logits"], pred_boxes, anchors, strides)
    return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)


def _retinanet_compute_loss(self, targets, head_outputs, anchors):
    """torchvision's ``RetinaNet.compute_loss`` with the assigner's matching.

    Its anchors come level after level, ``A`` per location; the levels are told apart by the
    anchor sizes of ``model.anchor_generator`` (every anchor of level ``l`` has an area of one of
    its sizes squared)."""
    anchors0 = anchors[0]
    side = ((anchors0[:, 2] - anchors0[:, 0]) * (anchors0[:, 3] - anchors0[:, 1])).sqrt()
    sizes = [
        (level, float(s)) for level, group in enumerate(self.anchor_generator.sizes) for s in group
    ]
    log_sizes = torch.tensor([s for _, s in sizes], dtype=side.dtype, device=side.device).log()
    nearest = (side.clamp_min(1e-6).log()[:, None] - log_sizes).abs().argmin(1)  # rounded anchors
    level = torch.tensor([lv for lv, _ in sizes], device=side.device)[nearest]
    counts = torch.bincount(level, minlength=len(self.anchor_generator.sizes)).tolist()
    if not bool((level[1:] >= level[:-1]).all()):
        raise ValueError(
            "use_assigner: RetinaNet's anchors are not level after level as "
            "model.anchor_generator.sizes says (two levels share an anchor size?)"
        )
    strides = _level_strides(anchors0, counts)
    pred_boxes = torch.stack(
        [
            self.box_coder.decode_single(regression, a)
            for regression, a in zip(head_outputs["bbox_regression"], anchors, strict=True)
        ]
    )
    matched_idxs = _assign(self, targets, head_outputs["cls_logits"], pred_boxes, anchors, strides)
    return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)
