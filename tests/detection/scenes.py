"""Synthetic detection scenes for the assigner tests: anchor points over FPN levels, boxes,
and predictions that are plausible (near the ground truths) or not."""

from __future__ import annotations

import torch

from uotmatch.detection import anchor_points
from uotmatch.detection.boxes import ltrb_to_boxes

__all__ = ["KEYS", "anchor_points", "as_inputs", "scene"]


def scene(
    seed: int,
    B: int = 2,
    height: int = 128,
    width: int = 160,
    G: int = 4,
    K: int = 5,
    strides=(8, 16, 32),
    min_size: float = 12.0,
    max_size: float = 80.0,
):
    """A random batch: points, strides, logits ``[B, A, K]``, predicted boxes ``[B, A, 4]``,
    padded ground truths (image i has ``G - i`` of them) with their mask."""
    g = torch.Generator().manual_seed(seed)
    points, strd = anchor_points((height, width), strides)
    A = len(points)
    size = torch.rand(B, G, 2, generator=g) * (max_size - min_size) + min_size
    ctr = torch.rand(B, G, 2, generator=g) * torch.tensor([width, height])
    gt_boxes = torch.cat([ctr - size / 2, ctr + size / 2], -1).clamp_min(0)
    gt_boxes[..., 2] = gt_boxes[..., 2].clamp_max(width)
    gt_boxes[..., 3] = gt_boxes[..., 3].clamp_max(height)
    gt_labels = torch.randint(K, (B, G), generator=g)
    gt_mask = torch.arange(G)[None] < (G - torch.arange(B))[:, None]
    ltrb = torch.rand(B, A, 4, generator=g) * 3 * strd[None, :, None] + 1
    pred_boxes = ltrb_to_boxes(points[None], ltrb)
    logits = torch.randn(B, A, K, generator=g) * 2 - 2
    return points, strd, logits, pred_boxes, gt_boxes, gt_labels, gt_mask


#: The dense assigners' keyword arguments, in the order ``scene`` returns them.
KEYS = ("points", "strides", "cls_logits", "pred_boxes", "gt_boxes", "gt_labels", "gt_mask")


def as_inputs(*values) -> dict:
    """``scene``'s tuple (or its leading part) as the assigners' keyword arguments."""
    return dict(zip(KEYS, values, strict=False))
