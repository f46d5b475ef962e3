"""What the dense (one row per anchor point) assigners share: inputs, geometry, the result."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from uotmatch._rows import candidate_rows, gather_rows  # noqa: F401 (the assigners' imports)
from uotmatch.detection.boxes import box_area, points_to_ltrb

__all__ = ["AssignResult", "anchor_points"]

#: A point is inside a box when all four distances exceed this (as the official OTA/FCOS code).
INSIDE_MARGIN = 0.01


@dataclass
class AssignResult:
    """Per-anchor training targets of a batch, ``B`` images by ``A`` anchor points.

    Attributes:
        gt_index: ``[B, A]`` int64, the assigned ground truth (index into the padded ``G``), or
            -1 for background.
        labels: ``[B, A]`` int64 class of the assigned ground truth, -1 for background.
        boxes: ``[B, A, 4]`` xyxy box of the assigned ground truth (0 for background).
        ious: ``[B, A]`` IoU between the anchor's predicted box and its assigned ground truth
            (the IoU branch's target; 0 for background or when no predicted boxes were given).
        num_fg: ``[B]`` int64 foreground anchors per image.
    """

    gt_index: Tensor
    labels: Tensor
    boxes: Tensor
    ious: Tensor
    num_fg: Tensor

    @property
    def fg_mask(self) -> Tensor:
        """``[B, A]`` bool, True on foreground anchors."""
        return self.gt_index >= 0


def anchor_points(height: int, width: int, strides=(8, 16, 32, 64, 128), device=None):
    """FCOS-style anchor points: the cell centres of each feature level, level after level.

    Returns:
        ``points [A, 2]`` (x, y) and ``strides [A]`` (float), for an input of
        ``height x width`` pixels (``ceil(height / s) * ceil(width / s)`` points per level).
    """
    pts, strd = [], []
    for s in strides:
        ys, xs = torch.meshgrid(
            torch.arange(s / 2, height, s, device=device),
            torch.arange(s / 2, width, s, device=device),
            indexing="ij",
        )
        pts.append(torch.stack([xs.flatten(), ys.flatten()], -1))
        strd.append(torch.full((xs.numel(),), float(s), device=device))
    return torch.cat(pts), torch.cat(strd)


def background_result(B: int, A: int, gt_labels: Tensor, gt_boxes: Tensor) -> AssignResult:
    """Every anchor of every image to background."""
    empty = torch.full((B, A), -1, dtype=torch.long, device=gt_boxes.device)
    return result_from_index(empty, gt_labels, gt_boxes.float())


def check_inputs(points, strides, gt_boxes, gt_labels, gt_mask, cls_logits=None, pred_boxes=None):
    """Validate the common dense-assigner inputs; returns ``gt_mask`` (all True if None)."""
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be [A, 2] (x, y), got shape {tuple(points.shape)}")
    A = points.shape[0]
    if strides.shape != (A,):
        raise ValueError(f"strides must be [A] = [{A}], got shape {tuple(strides.shape)}")
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be [B, G, 4] (xyxy), got shape {tuple(gt_boxes.shape)}")
    B, G = gt_boxes.shape[:2]
    if tuple(gt_labels.shape) != (B, G):
        raise ValueError(f"gt_labels must be [B, G] = [{B}, {G}], got {tuple(gt_labels.shape)}")
    if gt_mask is None:
        gt_mask = torch.ones(B, G, dtype=torch.bool, device=gt_boxes.device)
    elif tuple(gt_mask.shape) != (B, G) or gt_mask.dtype != torch.bool:
        raise ValueError(
            f"gt_mask must be bool [B, G] = [{B}, {G}], got {gt_mask.dtype} {tuple(gt_mask.shape)}"
        )
    if cls_logits is not None and (cls_logits.dim() != 3 or cls_logits.shape[:2] != (B, A)):
        raise ValueError(
            f"cls_logits must be [B, A, K] = [{B}, {A}, K], got {tuple(cls_logits.shape)}"
        )
    if pred_boxes is not None and tuple(pred_boxes.shape) != (B, A, 4):
        raise ValueError(
            f"pred_boxes must be [B, A, 4] = [{B}, {A}, 4], got {tuple(pred_boxes.shape)}"
        )
    if cls_logits is not None:
        K = cls_logits.shape[-1]
        real = gt_labels[gt_mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= K):
            raise ValueError(f"gt_labels must be in [0, {K}) for the real ground truths")
    return gt_mask


def inside_boxes(points: Tensor, gt_boxes: Tensor, margin: float = INSIDE_MARGIN) -> Tensor:
    """``[B, A, G]``: the point is inside the box (by more than ``margin``)."""
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


def nearest_point(points: Tensor, gt_boxes: Tensor) -> Tensor:
    """``[B, G]`` index of the anchor point closest to each box centre."""
    ctr = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    return torch.cdist(ctr, points[None].expand(ctr.shape[0], -1, -1)).argmin(-1)


def ensure_candidate(
    candidate: Tensor, points: Tensor, gt_boxes: Tensor, gt_mask: Tensor
) -> Tensor:
    """A real ground truth with no candidate (too small to hold a point) gets its nearest point."""
    lonely = gt_mask & ~candidate.any(1)  # [B, G]
    if bool(lonely.any()):
        near = nearest_point(points, gt_boxes)  # [B, G]
        b, g = torch.nonzero(lonely, as_tuple=True)
        candidate = candidate.clone()
        candidate[b, near[b, g], g] = True
    return candidate


def focal_costs(
    logits: Tensor, labels: Tensor, alpha: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """Sigmoid focal loss of each anchor's logits against each ground truth's one-hot class,
    summed over classes, without materialising ``[B, A, G, K]``.

    Returns ``([B, A, G], [B, A])``: per pair, and against the all-zero (background) target. The
    one-hot sum is the background sum with the target class's term swapped for its positive loss.
    """
    x = logits.float()
    p = x.sigmoid()
    neg = (1 - alpha) * p.pow(gamma) * F.softplus(x)  # FL(x, 0)
    pos = alpha * (1 - p).pow(gamma) * F.softplus(-x)  # FL(x, 1)
    background = neg.sum(-1)  # [B, A]
    swap = (pos - neg).gather(2, labels[:, None, :].expand(-1, x.shape[1], -1))  # [B, A, G]
    return background[..., None] + swap, background


def bce_costs(prob: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Binary cross-entropy of probabilities against one-hot classes, summed: ``[B, A, G]``, and
    against the all-zero target ``[B, A]`` (the same swap trick as :func:`focal_costs`)."""
    p = prob.float().clamp(1e-7, 1 - 1e-7)
    neg, pos = -torch.log1p(-p), -p.log()
    background = neg.sum(-1)
    swap = (pos - neg).gather(2, labels[:, None, :].expand(-1, p.shape[1], -1))
    return background[..., None] + swap, background


def scatter_rows(sub: Tensor, idx: Tensor, A: int, fill) -> Tensor:
    """``[B, L]`` values at ``idx`` into a ``[B, A]`` tensor filled with ``fill`` elsewhere."""
    out = torch.full((sub.shape[0], A), fill, dtype=sub.dtype, device=sub.device)
    return out.scatter_(1, idx, sub)


def result_from_index(
    gt_index: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    ious: Tensor | None = None,
    anchor_ious: Tensor | None = None,
) -> AssignResult:
    """Gather the per-anchor targets of ``gt_index [B, A]`` (-1 = background); the IoU target
    from pairwise ``ious [B, A, G]``, or given per anchor as ``anchor_ious [B, A]``."""
    fg = gt_index >= 0
    if gt_boxes.shape[1] == 0:  # no ground truth in the whole batch: all background
        B, A = gt_index.shape
        zeros = torch.zeros(B, A, dtype=gt_boxes.dtype, device=gt_boxes.device)
        return AssignResult(
            gt_index, gt_index.clone(), zeros[..., None].expand(B, A, 4).clone(), zeros, fg.sum(1)
        )
    idx = gt_index.clamp_min(0)
    labels = torch.where(fg, gt_labels.gather(1, idx), -1)
    boxes = gt_boxes.gather(1, idx[..., None].expand(-1, -1, 4)) * fg[..., None]
    if anchor_ious is not None:
        iou = anchor_ious * fg
    elif ious is None or ious.shape[-1] == 0:
        iou = torch.zeros(gt_index.shape, dtype=gt_boxes.dtype, device=gt_boxes.device)
    else:
        iou = ious.gather(2, idx[..., None]).squeeze(-1) * fg
    return AssignResult(gt_index, labels, boxes, iou, fg.sum(1))


def smallest_area(candidate: Tensor, gt_boxes: Tensor) -> Tensor:
    """``[B, A]``: among each anchor's candidate boxes, the one of smallest area (-1 if none)."""
    area = box_area(gt_boxes)[:, None, :].expand_as(candidate)  # [B, A, G]
    area = torch.where(candidate, area, torch.inf)
    best = area.argmin(-1) if area.shape[-1] else area.new_zeros(area.shape[:2], dtype=torch.long)
    return torch.where(candidate.any(-1), best, -1)
