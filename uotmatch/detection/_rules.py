"""Rule-based dense assigners: SimOTA (YOLOX), FCOS centre sampling, ATSS. Batched over images."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uotmatch.detection._dense import (
    AssignResult,
    background_result,
    bce_costs,
    candidate_rows,
    check_inputs,
    gather_rows,
    inside_boxes,
    inside_centre,
    result_from_index,
    scatter_rows,
    smallest_area,
)
from uotmatch.detection.boxes import box_iou, points_to_ltrb

__all__ = ["ATSSAssigner", "FCOSAssigner", "SimOTAAssigner"]

#: SimOTA's cost for a pair outside "in the box and in the centre square" (YOLOX's 1e5).
SIMOTA_GEOMETRY_PENALTY = 1e5
#: FCOS's default object sizes of interest per level (max regression distance), strides 8-128.
FCOS_SIZE_RANGES = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf))


def _levels(strides: Tensor) -> list[tuple[int, int, float]]:
    """Consecutive runs of equal stride: ``(start, end, stride)`` per level, in order."""
    s = strides.tolist()
    out, start = [], 0
    for i in range(1, len(s) + 1):
        if i == len(s) or s[i] != s[start]:
            out.append((start, i, s[start]))
            start = i
    return out


class SimOTAAssigner:
    """YOLOX's SimOTA (Ge et al., 2021): OTA's costs, dynamic k, and a top-k shortcut for the
    transport problem.

    Candidates are anchors inside some ground-truth box or within ``radius * stride`` of its
    centre; the cost of a pair is ``BCE(scores, one-hot class) + reg_weight * -log IoU``, plus
    ``SIMOTA_GEOMETRY_PENALTY`` unless the anchor is both inside that box and its centre square.
    Each ground truth takes its ``k`` cheapest candidates, ``k = max(1, floor(sum of its top-q
    IoUs))``; an anchor taken twice keeps the ground truth of lowest cost.

    Call with ``obj_logits [B, A, 1]`` to score with ``sqrt(sigmoid(cls) * sigmoid(obj))`` as
    YOLOX; otherwise the class probabilities alone.
    """

    def __init__(self, radius: float = 2.5, q: int = 10, reg_weight: float = 3.0):
        if radius <= 0 or q < 1:
            raise ValueError(f"radius must be > 0 and q >= 1, got radius={radius}, q={q}")
        self.radius, self.q, self.reg_weight = radius, q, reg_weight

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        strides: Tensor,
        cls_logits: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor | None = None,
        obj_logits: Tensor | None = None,
    ) -> AssignResult:
        gt_mask = check_inputs(
            points, strides, gt_boxes, gt_labels, gt_mask, cls_logits, pred_boxes
        )
        B, A = cls_logits.shape[:2]
        G = gt_boxes.shape[1]
        gt_boxes = gt_boxes.float()
        if G == 0 or not bool(gt_mask.any()):
            return background_result(B, A, gt_labels, gt_boxes)
        points, strides = points.float(), strides.float()
        in_box = inside_boxes(points, gt_boxes, margin=0.0) & gt_mask[:, None]
        in_ctr = inside_centre(points, strides, gt_boxes, self.radius, clip=False)
        in_ctr &= gt_mask[:, None]
        # As YOLOX, only anchors inside some box or centre square are considered: gather them.
        idx, real = candidate_rows((in_box | in_ctr).any(-1))  # [B, L]
        in_box, in_ctr = gather_rows(in_box, idx), gather_rows(in_ctr, idx)
        prob = gather_rows(cls_logits, idx).float().sigmoid()
        if obj_logits is not None:
            prob = (prob * gather_rows(obj_logits, idx).float().sigmoid()).sqrt()
        cls, _ = bce_costs(prob, gt_labels)
        ious = box_iou(gather_rows(pred_boxes, idx).float(), gt_boxes) * real[..., None]
        cost = cls - self.reg_weight * (ious + 1e-8).log()
        cost = cost + SIMOTA_GEOMETRY_PENALTY * ~(in_box & in_ctr)
        cost = cost.masked_fill(~real[..., None] | ~gt_mask[:, None], math.inf)  # [B, L, G]

        L = cost.shape[1]
        k = ious.topk(min(self.q, L), dim=1).values.sum(1).floor().clamp_min(1).long()  # [B, G]
        k = torch.where(gt_mask, k, 0)
        kmax = max(int(k.max()), 1)
        cheapest = cost.topk(min(kmax, L), dim=1, largest=False)  # over anchors, [B, kmax, G]
        rank = torch.arange(cheapest.indices.shape[1], device=cost.device)[None, :, None]
        take = (rank < k[:, None]) & torch.isfinite(cheapest.values)
        chosen = torch.zeros(B, L, G, dtype=torch.bool, device=cost.device)
        chosen.scatter_(1, cheapest.indices, take)
        # Anchors taken by several ground truths keep the cheapest one (of all ground truths).
        multi = chosen.sum(-1) > 1
        sub_index = torch.where(multi, cost.argmin(-1), chosen.float().argmax(-1))
        sub_index = torch.where(chosen.any(-1), sub_index, -1)  # [B, L]
        sub_iou = ious.gather(2, sub_index.clamp_min(0)[..., None]).squeeze(-1) * (sub_index >= 0)
        return result_from_index(
            scatter_rows(sub_index, idx, A, -1),
            gt_labels,
            gt_boxes,
            anchor_ious=scatter_rows(sub_iou, idx, A, 0.0),
        )


class FCOSAssigner:
    """FCOS (Tian et al., 2019) with centre sampling.

    A point is positive for a ground truth when it lies inside the box and, with centre sampling,
    within ``radius * stride`` of its centre (that square clipped to the box), and its largest
    regression distance falls in its level's size range. A point positive for several boxes takes
    the one of smallest area.

    Args:
        radius: centre-sampling radius in strides (None: the whole box).
        size_ranges: ``(low, high)`` of the max regression distance per level, in the order of
            increasing stride (FCOS's for strides 8-128 by default).
    """

    def __init__(
        self,
        radius: float | None = 1.5,
        size_ranges: tuple[tuple[float, float], ...] = FCOS_SIZE_RANGES,
    ):
        if radius is not None and radius <= 0:
            raise ValueError(f"radius must be > 0 or None, got {radius}")
        self.radius, self.size_ranges = radius, tuple(size_ranges)

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        strides: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor | None = None,
        pred_boxes: Tensor | None = None,
    ) -> AssignResult:
        gt_mask = check_inputs(points, strides, gt_boxes, gt_labels, gt_mask, None, pred_boxes)
        B, G = gt_boxes.shape[:2]
        A = points.shape[0]
        gt_boxes, points, strides = gt_boxes.float(), points.float(), strides.float()
        levels = _levels(strides)
        if len(levels) > len(self.size_ranges):
            raise ValueError(
                f"{len(levels)} feature levels (strides {[s for *_, s in levels]}) but only "
                f"{len(self.size_ranges)} size_ranges"
            )
        low = torch.empty(A, device=points.device)
        high = torch.empty(A, device=points.device)
        for (start, end, _), (lo, hi) in zip(levels, self.size_ranges, strict=False):
            low[start:end], high[start:end] = lo, hi
        ltrb = points_to_ltrb(points, gt_boxes)  # [B, A, G, 4]
        positive = ltrb.amin(-1) > 0
        if self.radius is not None:
            positive &= inside_centre(points, strides, gt_boxes, self.radius, clip=True)
        reach = ltrb.amax(-1)
        positive &= (reach >= low[None, :, None]) & (reach <= high[None, :, None])
        positive &= gt_mask[:, None]
        gt_index = smallest_area(positive, gt_boxes)
        ious = None if pred_boxes is None else box_iou(pred_boxes.float(), gt_boxes)
        return result_from_index(gt_index, gt_labels, gt_boxes, ious)


class ATSSAssigner:
    """ATSS (Zhang et al., CVPR 2020): adaptive training sample selection.

    Per ground truth, the ``topk`` points per level closest to its centre are candidates; their
    anchors (squares of side ``anchor_scale * stride``) with IoU at least mean + std (over the
    candidates) and centre inside the box are positive; a point positive for several boxes takes
    the one of highest IoU.
    """

    def __init__(self, topk: int = 9, anchor_scale: float = 8.0):
        if topk < 1 or anchor_scale <= 0:
            raise ValueError(f"topk must be >= 1 and anchor_scale > 0, got {topk}, {anchor_scale}")
        self.topk, self.anchor_scale = topk, anchor_scale

    @torch.no_grad()
    def __call__(
        self,
        points: Tensor,
        strides: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor | None = None,
        pred_boxes: Tensor | None = None,
    ) -> AssignResult:
        gt_mask = check_inputs(points, strides, gt_boxes, gt_labels, gt_mask, None, pred_boxes)
        B, G = gt_boxes.shape[:2]
        A = points.shape[0]
        gt_boxes, points, strides = gt_boxes.float(), points.float(), strides.float()
        if G == 0:
            return background_result(B, A, gt_labels, gt_boxes)
        half = (self.anchor_scale * strides / 2)[:, None]
        anchors = torch.cat([points - half, points + half], -1)  # [A, 4]
        ious = box_iou(anchors[None].expand(B, -1, -1), gt_boxes)  # [B, A, G]
        ctr = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        dist = torch.cdist(points[None].expand(B, -1, -1), ctr)  # [B, A, G]
        candidate = torch.zeros(B, A, G, dtype=torch.bool, device=points.device)
        for start, end, _ in _levels(strides):
            k = min(self.topk, end - start)
            near = dist[:, start:end].topk(k, dim=1, largest=False).indices + start  # [B, k, G]
            candidate.scatter_(1, near, True)
        n = candidate.sum(1).clamp_min(1)  # [B, G]
        cand_iou = ious * candidate
        mean = cand_iou.sum(1) / n
        var = ((ious - mean[:, None]) ** 2 * candidate).sum(1) / (n - 1).clamp_min(1)
        threshold = mean + var.sqrt()  # [B, G]
        positive = candidate & (ious >= threshold[:, None])
        positive &= points_to_ltrb(points, gt_boxes).amin(-1) > 0.01
        positive &= gt_mask[:, None]
        best = torch.where(positive, ious, -1.0).argmax(-1)
        gt_index = torch.where(positive.any(-1), best, -1)
        pious = None if pred_boxes is None else box_iou(pred_boxes.float(), gt_boxes)
        return result_from_index(gt_index, gt_labels, gt_boxes, pious)
