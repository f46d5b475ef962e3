"""Box operations in plain torch: the core library needs only torch, not torchvision.

Boxes are ``xyxy`` (x1, y1, x2, y2) unless a name says ``cxcywh``; pairwise functions broadcast
over leading batch dimensions: ``[..., M, 4]`` x ``[..., N, 4]`` -> ``[..., M, N]``. Degenerate
boxes (zero width or height) are valid input: IoU with them is 0, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "aligned_giou",
    "aligned_iou",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "ltrb_to_boxes",
    "points_to_ltrb",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    center, half = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat([center - half, center + half], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """``[..., 4]`` -> ``[...]``; boxes with x2 < x1 or y2 < y1 count as empty (area 0)."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0)
    return wh[..., 0] * wh[..., 1]


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den`` is 0 (degenerate boxes)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def _pairwise_inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = a.unsqueeze(-2), b.unsqueeze(-3)  # [..., M, 1, 4], [..., 1, N, 4]
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU, ``[..., M, 4]`` x ``[..., N, 4]`` -> ``[..., M, N]``.

    Example:
        >>> box_iou(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2]]))
        tensor([[0.1429, 1.0000]])
    """
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    return _safe_div(inter, union)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU (Rezatofighi et al., 2019) in ``[-1, 1]``, ``[..., M, N]``."""
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    a, b = boxes1.unsqueeze(-2), boxes2.unsqueeze(-3)
    hull_wh = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    hull = hull_wh.clamp_min(0).prod(-1)
    return _safe_div(inter, union) - _safe_div(hull - union, hull)


def aligned_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Element-wise IoU of aligned boxes, ``[..., 4]`` x ``[..., 4]`` -> ``[...]``."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    return _safe_div(inter, box_area(boxes1) + box_area(boxes2) - inter)


def aligned_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Element-wise GIoU of aligned boxes, ``[...]``."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp_min(0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    hull_wh = torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(
        boxes1[..., :2], boxes2[..., :2]
    )
    hull = hull_wh.clamp_min(0).prod(-1)
    return _safe_div(inter, union) - _safe_div(hull - union, hull)


def points_to_ltrb(points: Tensor, boxes: Tensor) -> Tensor:
    """Distances from points to box sides (FCOS targets).

    Args:
        points: ``[A, 2]`` or ``[..., A, 2]`` (x, y).
        boxes: ``[..., G, 4]`` xyxy.

    Returns:
        ``[..., A, G, 4]`` (left, top, right, bottom); all positive iff the point is inside.
    """
    p = points.unsqueeze(-2)  # [..., A, 1, 2]
    b = boxes.unsqueeze(-3)  # [..., 1, G, 4]
    return torch.cat([p - b[..., :2], b[..., 2:] - p], dim=-1)


def ltrb_to_boxes(points: Tensor, ltrb: Tensor) -> Tensor:
    """Boxes from points and distances: ``[..., A, 2]`` and ``[..., A, 4]`` -> ``[..., A, 4]``."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)
