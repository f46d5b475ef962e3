"""The geometry the dense assigners share.

Anchor points, the inside-box and centre-prior tests, distances to box centres."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from uotmatch.detection.boxes import box_area, points_to_ltrb

__all__ = [
    "INSIDE_MARGIN",
    "INSIDE_MARGIN_STRICT",
    "STRIDES",
    "anchor_points",
    "centre_distances",
    "ensure_candidate",
    "feature_sizes",
    "inside_boxes",
    "inside_centre",
    "smallest_area",
]

#: A point is inside a box when its four distances to the sides all exceed this many pixels:
#: the rule of the official OTA and ATSS code. FCOS's and YOLOX's own code use strict positivity,
#: ``INSIDE_MARGIN_STRICT``; each assigner states which rule it reproduces.
INSIDE_MARGIN = 0.01
INSIDE_MARGIN_STRICT = 0.0
#: The FPN strides of FCOS, OTA and ATSS (P3-P7).
STRIDES = (8, 16, 32, 64, 128)


def feature_sizes(
    height: int, width: int, strides: Sequence[int] = STRIDES
) -> list[tuple[int, int]]:
    """The feature-map sizes a ResNet + FPN gives a ``height x width`` input, per stride.

    ``(ceil(height / s), ceil(width / s))``: stride-2 convolutions with padding."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def anchor_points(
    sizes: Sequence[tuple[int, int]] | tuple[int, int],
    strides: Sequence[int] = STRIDES,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """FCOS-style anchor points: the centre ``k * s + s // 2`` of each feature-map cell.

    Level after level, rows before columns.

    Args:
        sizes: the feature-map sizes ``[(h, w), ...]``, one per stride, or an input image's
            ``(height, width)`` (then :func:`feature_sizes`).
        strides: one per level.
        device: where the tensors are made (default torch's).

    Returns:
        ``points [A, 2]`` (x, y) and ``strides [A]``, float32.

    Example:
        >>> points, strides = anchor_points((64, 96), strides=(32, 64))  # 2 x 3 and 1 x 2
        >>> points[:3].tolist(), points[-2:].tolist()
        ([[16.0, 16.0], [48.0, 16.0], [80.0, 16.0]], [[32.0, 32.0], [96.0, 32.0]])
        >>> strides.tolist()
        [32.0, 32.0, 32.0, 32.0, 32.0, 32.0, 64.0, 64.0]
    """
    if len(sizes) == 2 and isinstance(sizes[0], int) and isinstance(sizes[1], int):
        levels = feature_sizes(sizes[0], sizes[1], strides)
    else:
        levels = [(int(h), int(w)) for h, w in sizes]  # type: ignore[misc]
    if len(levels) != len(strides):
        raise ValueError(f"sizes must give one (h, w) per stride ({len(strides)}), got {sizes}")
    pts, strd = [], []
    for (h, w), s in zip(levels, strides, strict=True):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device) * s + s // 2,
            torch.arange(w, device=device) * s + s // 2,
            indexing="ij",
        )
        pts.append(torch.stack([xs.flatten(), ys.flatten()], -1).float())
        strd.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(pts), torch.cat(strd)


def inside_boxes(points: Tensor, gt_boxes: Tensor, margin: float = INSIDE_MARGIN) -> Tensor:
    """``[B, A, G]``: the point is inside the box by more than ``margin`` on every side."""
    return points_to_ltrb(points, gt_boxes).amin(-1) > margin


def inside_centre(
    points: Tensor, strides: Tensor, gt_boxes: Tensor, radius: float, clip: bool
) -> Tensor:
    """``[B, A, G]``: the point is within ``radius * stride`` of the box centre (per axis).

    ``clip`` intersects that square with the box (OTA, FCOS centre sampling); SimOTA does not.
    """
    ctr = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    r = (radius * strides)[None, :, None, None]  # [1, A, 1, 1]
    lo, hi = ctr[:, None] - r, ctr[:, None] + r  # [B, A, G, 2]
    if clip:
        lo = torch.maximum(lo, gt_boxes[:, None, :, :2])
        hi = torch.minimum(hi, gt_boxes[:, None, :, 2:])
    p = points[None, :, None, :]
    return torch.cat([p - lo, hi - p], -1).amin(-1) > 0


def centre_distances(points: Tensor, gt_boxes: Tensor) -> Tensor:
    """``[B, A, G]`` Euclidean distances from the points to the box centres.

    From exact differences (``torch.cdist``'s matrix-product mode rounds float32 distances
    together)."""
    ctr = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    return (points[None, :, None, :] - ctr[:, None]).pow(2).sum(-1).sqrt()


def ensure_candidate(
    candidate: Tensor, points: Tensor, gt_boxes: Tensor, gt_mask: Tensor
) -> Tensor:
    """A real ground truth with no candidate (too small to hold a point) gets its nearest point."""
    lonely = gt_mask & ~candidate.any(1)  # [B, G]
    if bool(lonely.any()):
        b, g = torch.nonzero(lonely, as_tuple=True)
        near = centre_distances(points, gt_boxes[b, g][None])[0].argmin(0)  # the lonely ones only
        candidate = candidate.clone()
        candidate[b, near, g] = True
    return candidate


def smallest_area(candidate: Tensor, gt_boxes: Tensor) -> Tensor:
    """``[B, A]``: among each anchor's candidate boxes, the one of smallest area (-1 if none)."""
    area = box_area(gt_boxes)[:, None, :].expand_as(candidate)  # [B, A, G]
    area = torch.where(candidate, area, torch.inf)
    best = area.argmin(-1) if area.shape[-1] else area.new_zeros(area.shape[:2], dtype=torch.long)
    return torch.where(candidate.any(-1), best, -1)
