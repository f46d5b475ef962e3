"""Rule-based dense assigners: SimOTA (YOLOX), FCOS centre sampling, ATSS. Batched over images."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uotmatch import _checks
from uotmatch._rows import candidate_rows, gather_rows
from uotmatch.detection._contracts import (
    AssignResult,
    DenseAssigner,
    DenseInputs,
    result_from_index,
    result_from_rows,
)
from uotmatch.detection._geometry import (
    INSIDE_MARGIN,
    INSIDE_MARGIN_STRICT,
    centre_distances,
    inside_boxes,
    inside_centre,
    smallest_area,
)
from uotmatch.detection.boxes import box_iou, points_to_ltrb
from uotmatch.detection.costs import bce_terms, iou_cost

__all__ = ["ATSSAssigner", "FCOSAssigner", "SIMOTA_GEOMETRIES", "SimOTAAssigner"]

#: SimOTA's candidate geometry, by the YOLOX release it reproduces, as ``(centre radius in
#: strides, whether the box counts too, penalty outside the geometry)``. ``"yolox-0.3"`` is
#: YOLOX 0.3.0 and mmdetection: candidates inside some box or its centre square of radius 2.5,
#: penalty 1e5 unless inside both. ``"yolox-2023"`` is YOLOX's code since its 2023 geometry
#: constraint: the centre square of radius 1.5 alone, penalty 1e6 outside it.
SIMOTA_GEOMETRIES = {
    "yolox-0.3": (2.5, True, 1e5),
    "yolox-2023": (1.5, False, 1e6),
}
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


class SimOTAAssigner(DenseAssigner):
    """YOLOX's SimOTA (Ge et al., 2021).

    OTA's costs, dynamic k, and a top-k shortcut for the transport problem.

    Candidates follow ``geometry`` (:data:`SIMOTA_GEOMETRIES`); the cost of a pair is
    ``cls_weight * BCE(scores, one-hot class) + iou_weight * -log IoU`` plus the geometry's
    penalty outside it. Each ground truth takes its ``k`` cheapest candidates, ``k = max(1,
    floor(sum of its top candidate_topk IoUs))``; an anchor taken twice keeps the ground truth
    of lowest cost. The BCE is torch's (each log clamped at -100), as YOLOX computes it.

    Uses ``points``, ``strides``, ``cls_logits``, ``pred_boxes`` and the ground truths; called
    with ``obj_logits [B, A, 1]`` too, it scores with ``sqrt(sigmoid(cls) * sigmoid(obj))`` as
    YOLOX, otherwise with the class probabilities alone.

    Args:
        geometry: ``"yolox-0.3"`` (default; YOLOX 0.3.0 and mmdetection, on which every anchor
            agrees with YOLOX 0.3.0) or ``"yolox-2023"`` (YOLOX's current code).
        radius: the centre square's half-side in strides; None: the geometry's (2.5 / 1.5).
        candidate_topk: top IoUs summed for the dynamic k (YOLOX: 10).
        cls_weight, iou_weight: cost weights (YOLOX: 1 and 3).
    """

    uses = (
        "points",
        "strides",
        "cls_logits",
        "pred_boxes",
        "gt_boxes",
        "gt_labels",
        "gt_mask",
        "obj_logits",
    )

    def __init__(
        self,
        *,
        geometry: str = "yolox-0.3",
        radius: float | None = None,
        candidate_topk: int = 10,
        cls_weight: float = 1.0,
        iou_weight: float = 3.0,
    ):
        self.geometry = _checks.choice("geometry", geometry, tuple(SIMOTA_GEOMETRIES))
        default_radius, self._in_box, self._penalty = SIMOTA_GEOMETRIES[geometry]
        radius = default_radius if radius is None else radius
        self.radius = _checks.real("radius", radius, low=0.0, low_open=True)
        self.candidate_topk = _checks.integer("candidate_topk", candidate_topk, low=1)
        self.cls_weight = _checks.real("cls_weight", cls_weight, low=0.0)
        self.iou_weight = _checks.real("iou_weight", iou_weight, low=0.0)

    def _assign(self, x: DenseInputs) -> AssignResult:
        B, A = x.cls_logits.shape[:2]
        G = x.gt_boxes.shape[1]
        real_gt = x.gt_mask[:, None]
        in_ctr = inside_centre(x.points, x.strides, x.gt_boxes, self.radius, clip=False) & real_gt
        if self._in_box:  # YOLOX 0.3.0: inside some box or some centre square
            in_box = inside_boxes(x.points, x.gt_boxes, INSIDE_MARGIN_STRICT) & real_gt
            considered, geometry = in_box | in_ctr, in_box & in_ctr
        else:  # YOLOX since 2023: the centre square alone
            considered = geometry = in_ctr
        # As YOLOX, only anchors that some ground truth considers enter: gather them.
        idx, real = candidate_rows(considered.any(-1))  # [B, L]
        geometry = gather_rows(geometry, idx)
        prob = gather_rows(x.cls_logits, idx).float().sigmoid()
        if x.obj_logits is not None:
            prob = (prob * gather_rows(x.obj_logits, idx).float().sigmoid()).sqrt()
        cls, _ = bce_terms(prob, x.gt_labels)
        ious = box_iou(gather_rows(x.pred_boxes, idx), x.gt_boxes) * real[..., None]
        cost = self.cls_weight * cls + self.iou_weight * iou_cost(ious)
        cost = cost + self._penalty * ~geometry
        cost = cost.masked_fill(~real[..., None] | ~real_gt, math.inf)  # [B, L, G]

        L = cost.shape[1]
        k = ious.topk(min(self.candidate_topk, L), dim=1).values.sum(1).floor()
        k = torch.where(x.gt_mask, k.clamp_min(1).long(), 0)  # [B, G]
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
        return result_from_rows(sub_index, idx, A, ious, x.gt_labels, x.gt_boxes)


class FCOSAssigner(DenseAssigner):
    """FCOS (Tian et al., 2019) with centre sampling.

    A point is positive for a ground truth when it lies inside the box (strictly, as FCOS's
    code) and, with centre sampling, within ``radius * stride`` of its centre (that square
    clipped to the box), and its largest regression distance falls in its level's size range.
    A point positive for several boxes takes the one of smallest area.

    Uses ``points``, ``strides`` and the ground truths (``pred_boxes`` only for the IoU
    target; ``cls_logits`` not at all).

    Args:
        radius: centre-sampling radius in strides (1.5), or None for the whole box.
        size_ranges: ``(low, high)`` of the max regression distance per level, in the order of
            increasing stride (FCOS's for strides 8-128 by default).
    """

    uses = ("points", "strides", "gt_boxes", "gt_mask")

    def __init__(
        self,
        *,
        radius: float | None = 1.5,
        size_ranges: tuple[tuple[float, float], ...] = FCOS_SIZE_RANGES,
    ):
        self.radius = _checks.real("radius", radius, low=0.0, low_open=True, allow_none=True)
        ranges = tuple(tuple(r) for r in size_ranges)
        if not ranges or any(len(r) != 2 or not (0 <= float(r[0]) < float(r[1])) for r in ranges):
            raise ValueError(
                f"size_ranges must be (low, high) pairs with 0 <= low < high, got {size_ranges}"
            )
        self.size_ranges = ranges

    def _assign(self, x: DenseInputs) -> AssignResult:
        A = x.points.shape[0]
        levels = _levels(x.strides)
        if len(levels) > len(self.size_ranges):
            raise ValueError(
                f"{len(levels)} feature levels (strides {[s for *_, s in levels]}) but only "
                f"{len(self.size_ranges)} size_ranges"
            )
        low = torch.empty(A, device=x.points.device)
        high = torch.empty(A, device=x.points.device)
        for (start, end, _), (lo, hi) in zip(levels, self.size_ranges, strict=False):
            low[start:end], high[start:end] = lo, hi
        ltrb = points_to_ltrb(x.points, x.gt_boxes)  # [B, A, G, 4]
        positive = ltrb.amin(-1) > INSIDE_MARGIN_STRICT
        if self.radius is not None:
            positive &= inside_centre(x.points, x.strides, x.gt_boxes, self.radius, clip=True)
        reach = ltrb.amax(-1)
        positive &= (reach >= low[None, :, None]) & (reach <= high[None, :, None])
        positive &= x.gt_mask[:, None]
        gt_index = smallest_area(positive, x.gt_boxes)
        ious = box_iou(x.pred_boxes, x.gt_boxes)
        return result_from_index(gt_index, x.gt_labels, x.gt_boxes, ious)


class ATSSAssigner(DenseAssigner):
    """ATSS (Zhang et al., CVPR 2020): adaptive training sample selection.

    Per ground truth, the ``topk`` points per level closest to its centre (exact float
    distances, as the official code) are candidates; their anchors (squares of side
    ``anchor_scale * stride``) with IoU at least mean + std (over the candidates) and centre
    inside the box (``INSIDE_MARGIN``) are positive; a point positive for several boxes takes
    the one of highest IoU.

    Uses ``points``, ``strides`` and the ground truths (``pred_boxes`` only for the IoU
    target; ``cls_logits`` not at all).

    Args:
        topk: candidates per level (9).
        anchor_scale: anchor side in strides (8).
    """

    uses = ("points", "strides", "gt_boxes", "gt_mask")

    def __init__(self, *, topk: int = 9, anchor_scale: float = 8.0):
        self.topk = _checks.integer("topk", topk, low=1)
        self.anchor_scale = _checks.real("anchor_scale", anchor_scale, low=0.0, low_open=True)

    def _assign(self, x: DenseInputs) -> AssignResult:
        B, G = x.gt_boxes.shape[:2]
        A = x.points.shape[0]
        half = (self.anchor_scale * x.strides / 2)[:, None]
        anchors = torch.cat([x.points - half, x.points + half], -1)  # [A, 4]
        ious = box_iou(anchors[None].expand(B, -1, -1), x.gt_boxes)  # [B, A, G]
        dist = centre_distances(x.points, x.gt_boxes)  # [B, A, G]
        candidate = torch.zeros(B, A, G, dtype=torch.bool, device=x.points.device)
        for start, end, _ in _levels(x.strides):
            k = min(self.topk, end - start)
            near = dist[:, start:end].topk(k, dim=1, largest=False).indices + start  # [B, k, G]
            candidate.scatter_(1, near, True)
        n = candidate.sum(1).clamp_min(1)  # [B, G]
        cand_iou = ious * candidate
        mean = cand_iou.sum(1) / n
        var = ((ious - mean[:, None]) ** 2 * candidate).sum(1) / (n - 1).clamp_min(1)
        threshold = mean + var.sqrt()  # [B, G]
        positive = candidate & (ious >= threshold[:, None])
        positive &= inside_boxes(x.points, x.gt_boxes, INSIDE_MARGIN)
        positive &= x.gt_mask[:, None]
        best = torch.where(positive, ious, -1.0).argmax(-1)
        gt_index = torch.where(positive.any(-1), best, -1)
        return result_from_index(
            gt_index, x.gt_labels, x.gt_boxes, box_iou(x.pred_boxes, x.gt_boxes)
        )
