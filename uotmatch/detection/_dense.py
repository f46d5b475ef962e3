"""The contract of the dense assigners (one row per anchor point), their inputs' validation,
the geometry they share, and the result they return."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from uotmatch.detection.boxes import box_area, points_to_ltrb

__all__ = [
    "INSIDE_MARGIN",
    "INSIDE_MARGIN_STRICT",
    "AssignResult",
    "DenseAssigner",
    "DenseInputs",
    "anchor_points",
    "feature_sizes",
]

#: A point is inside a box when its four distances to the sides all exceed this many pixels:
#: the rule of the official OTA and ATSS code. FCOS's and YOLOX's own code use strict positivity,
#: ``INSIDE_MARGIN_STRICT``; each assigner states which rule it reproduces.
INSIDE_MARGIN = 0.01
INSIDE_MARGIN_STRICT = 0.0
#: The FPN strides of FCOS, OTA and ATSS (P3-P7).
STRIDES = (8, 16, 32, 64, 128)


@dataclass
class AssignResult:
    """Per-anchor training targets of a batch, ``B`` images by ``A`` anchor points.

    Attributes:
        gt_index: ``[B, A]`` int64, the assigned ground truth (index into the padded ``G``), or
            -1 for background.
        labels: ``[B, A]`` int64 class of the assigned ground truth, -1 for background.
        boxes: ``[B, A, 4]`` xyxy box of the assigned ground truth (0 for background).
        ious: ``[B, A]`` IoU between the anchor's predicted box and its assigned ground truth
            (the IoU branch's target; 0 for background).
        num_fg: ``[B]`` int64 foreground anchors per image.
        converged: ``[B]`` bool, the image's transport problem reached the solver's ``tol``
            (always True for the rule-based assigners, which solve none); training logs count
            the images where it did not.
    """

    gt_index: Tensor
    labels: Tensor
    boxes: Tensor
    ious: Tensor
    num_fg: Tensor
    converged: Tensor

    @property
    def fg_mask(self) -> Tensor:
        """``[B, A]`` bool, True on foreground anchors."""
        return self.gt_index >= 0


def feature_sizes(
    height: int, width: int, strides: Sequence[int] = STRIDES
) -> list[tuple[int, int]]:
    """The feature-map sizes ``(ceil(height / s), ceil(width / s))`` a ResNet + FPN gives an
    input of ``height x width`` pixels at each stride (stride-2 convolutions with padding)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def anchor_points(
    sizes: Sequence[tuple[int, int]] | tuple[int, int],
    strides: Sequence[int] = STRIDES,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """FCOS-style anchor points: the centre ``k * s + s // 2`` of each feature-map cell, level
    after level, rows before columns.

    Args:
        sizes: the feature-map sizes ``[(h, w), ...]``, one per stride, or an input image's
            ``(height, width)`` (then :func:`feature_sizes`).
        strides: one per level.

    Returns:
        ``points [A, 2]`` (x, y) and ``strides [A]``, float32.

    Example:
        >>> points, strides = anchor_points((64, 96), strides=(32, 64))  # 2 x 3 and 1 x 2
        >>> points[:3].tolist(), points[-2:].tolist()
        ([[16.0, 16.0], [48.0, 16.0], [80.0, 16.0]], [[32.0, 32.0], [96.0, 32.0]])
        >>> strides.tolist()
        [32.0, 32.0, 32.0, 32.0, 32.0, 32.0, 64.0, 64.0]
    """
    if len(sizes) == 2 and all(isinstance(x, int) for x in sizes):
        sizes = feature_sizes(sizes[0], sizes[1], strides)
    if len(sizes) != len(strides):
        raise ValueError(f"sizes must give one (h, w) per stride ({len(strides)}), got {sizes}")
    pts, strd = [], []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device) * s + s // 2,
            torch.arange(w, device=device) * s + s // 2,
            indexing="ij",
        )
        pts.append(torch.stack([xs.flatten(), ys.flatten()], -1).float())
        strd.append(torch.full((h * w,), float(s), device=device))
    return torch.cat(pts), torch.cat(strd)


# -- the inputs and their validation --------------------------------------------------------------


@dataclass
class DenseInputs:
    """The validated inputs of a dense assigner: points and boxes in float32 (logits keep their
    dtype), labels int64, the mask bool, all on one device."""

    points: Tensor  # [A, 2]
    strides: Tensor  # [A]
    cls_logits: Tensor  # [B, A, K]
    pred_boxes: Tensor  # [B, A, 4] xyxy
    gt_boxes: Tensor  # [B, G, 4] xyxy
    gt_labels: Tensor  # [B, G] int64
    gt_mask: Tensor  # [B, G] bool

    @property
    def empty(self) -> bool:
        """No real ground truth anywhere in the batch."""
        return self.gt_boxes.shape[1] == 0 or not bool(self.gt_mask.any())

    @classmethod
    def check(cls, points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask):
        """Shapes, dtypes and devices, then the values in one pass (one host sync): finite
        logits, points, strides and boxes, positive strides, real ground-truth boxes with
        ``x2 >= x1`` and ``y2 >= y1``, labels in ``[0, K)``. Each failure is a ``ValueError``
        naming the input (and, for ground truths, the image and index)."""
        names = ("points", "strides", "cls_logits", "pred_boxes", "gt_boxes", "gt_labels")
        values = (points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels)
        for name, x in zip(names, values, strict=True):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if points.dim() != 2 or points.shape[1] != 2:
            raise ValueError(f"points must be [A, 2] (x, y), got shape {tuple(points.shape)}")
        A = points.shape[0]
        if tuple(strides.shape) != (A,):
            raise ValueError(f"strides must be [A] = [{A}], got shape {tuple(strides.shape)}")
        if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
            raise ValueError(
                f"gt_boxes must be [B, G, 4] (xyxy), got shape {tuple(gt_boxes.shape)}"
            )
        B, G = gt_boxes.shape[:2]
        if tuple(gt_labels.shape) != (B, G):
            raise ValueError(
                f"gt_labels must be [B, G] = [{B}, {G}], got shape {tuple(gt_labels.shape)}"
            )
        if cls_logits.dim() != 3 or tuple(cls_logits.shape[:2]) != (B, A):
            raise ValueError(
                f"cls_logits must be [B, A, K] = [{B}, {A}, K], got {tuple(cls_logits.shape)}"
            )
        if tuple(pred_boxes.shape) != (B, A, 4):
            raise ValueError(
                f"pred_boxes must be [B, A, 4] = [{B}, {A}, 4] (xyxy), got "
                f"{tuple(pred_boxes.shape)}"
            )
        if gt_mask is None:
            # Padding by zeros without a mask would make class-0 ground truths at the origin.
            zero = (gt_boxes == 0).all(-1) if gt_boxes.dim() == 3 else None
            if zero is not None and bool(zero.any()):
                b, g = (int(i) for i in torch.nonzero(zero)[0])
                raise ValueError(
                    f"gt_boxes: image {b}, ground truth {g} is all zeros (padding?) and no "
                    "gt_mask was given: pass gt_mask [B, G] (True on the real ground truths), "
                    "or drop the zero boxes"
                )
            gt_mask = torch.ones(B, G, dtype=torch.bool, device=gt_boxes.device)
        elif not isinstance(gt_mask, Tensor):
            raise ValueError(f"gt_mask must be a torch tensor, got {type(gt_mask).__name__}")
        elif tuple(gt_mask.shape) != (B, G) or gt_mask.dtype != torch.bool:
            raise ValueError(
                f"gt_mask must be bool [B, G] = [{B}, {G}], got {gt_mask.dtype} "
                f"{tuple(gt_mask.shape)}"
            )
        for name, x in zip(names[:5], values[:5], strict=True):
            if not x.is_floating_point():
                raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
        if gt_labels.is_floating_point() or gt_labels.is_complex() or gt_labels.dtype == torch.bool:
            raise ValueError(f"gt_labels must be an integer tensor, got {gt_labels.dtype}")
        device = gt_boxes.device
        for name, x in zip(names, values, strict=True):
            if x.device != device:
                raise ValueError(f"{name} is on {x.device}, gt_boxes on {device}: use one device")
        if gt_mask.device != device:
            raise ValueError(f"gt_mask is on {gt_mask.device}, gt_boxes on {device}")
        x = cls(
            points.float(),
            strides.float(),
            cls_logits,
            pred_boxes.float(),
            gt_boxes.float(),
            gt_labels.long(),
            gt_mask,
        )
        x._check_values()
        return x

    def _check_values(self) -> None:
        K = self.cls_logits.shape[-1]
        real = self.gt_mask
        box = self.gt_boxes
        flags = {}

        def finite(name: str, t: Tensor) -> Tensor:
            if t.numel() == 0:
                return torch.ones((), dtype=torch.bool, device=t.device)
            lo, hi = torch.aminmax(t)  # NaN propagates; one reduction for both bounds
            return (lo > -math.inf) & (hi < math.inf)

        flags["cls_logits"] = finite("cls_logits", self.cls_logits)
        flags["pred_boxes"] = finite("pred_boxes", self.pred_boxes)
        flags["points"] = finite("points", self.points)
        flags["strides"] = (self.strides > 0).all() & finite("strides", self.strides)
        good_box = torch.isfinite(box).all(-1) & (box[..., 2] >= box[..., 0])
        good_box &= box[..., 3] >= box[..., 1]
        flags["gt_boxes"] = (good_box | ~real).all()
        flags["gt_labels"] = (((self.gt_labels >= 0) & (self.gt_labels < K)) | ~real).all()
        ok = torch.stack(list(flags.values())).tolist()
        if all(ok):
            return
        name = list(flags)[ok.index(False)]
        if name == "gt_boxes":
            b, g = (int(i) for i in torch.nonzero(~good_box & real)[0])
            raise ValueError(
                f"gt_boxes: image {b}, ground truth {g} is {box[b, g].tolist()}: expected a "
                "finite xyxy box with x2 >= x1 and y2 >= y1"
            )
        if name == "gt_labels":
            bad = ~((self.gt_labels >= 0) & (self.gt_labels < K)) & real
            b, g = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"gt_labels: image {b}, ground truth {g} has label {int(self.gt_labels[b, g])}: "
                f"expected a class in [0, {K}) (K = cls_logits.shape[-1])"
            )
        if name == "strides":
            raise ValueError("strides must be finite and > 0")
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")


class DenseAssigner:
    """The contract every dense assigner keeps (the one a head calls, whatever the assigner).

    Call it with keyword arguments::

        result = assigner(
            points=points,          # [A, 2] anchor points (x, y), the same for every image
            strides=strides,        # [A] stride of each point's feature level
            cls_logits=cls_logits,  # [B, A, K] classification logits (any float dtype)
            pred_boxes=pred_boxes,  # [B, A, 4] predicted boxes, xyxy
            gt_boxes=gt_boxes,      # [B, G, 4] ground truths, xyxy, padded to G
            gt_labels=gt_labels,    # [B, G] int64 classes in [0, K)
            gt_mask=gt_mask,        # [B, G] bool, True on real ground truths (default: all;
                                    # an all-zero box without gt_mask is refused as padding)
        )                           # -> AssignResult

    Each assigner reads what it needs (:attr:`uses` lists it) and validates everything it is
    given (``ValueError`` naming the input). Assignment runs without gradients.
    """

    #: The inputs this assigner's assignment depends on (the others are validated only).
    uses: ClassVar[tuple[str, ...]] = ()

    @torch.no_grad()
    def __call__(
        self,
        *,
        points: Tensor,
        strides: Tensor,
        cls_logits: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor | None = None,
    ) -> AssignResult:
        x = DenseInputs.check(points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask)
        if x.empty:
            return background_result(x)
        return self._assign(x)

    def _assign(self, x: DenseInputs) -> AssignResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


# -- geometry -------------------------------------------------------------------------------------


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
    """``[B, A, G]`` Euclidean distances from the points to the box centres, from exact
    differences (``torch.cdist``'s matrix-product mode rounds float32 distances together)."""
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


# -- results --------------------------------------------------------------------------------------


def scatter_rows(sub: Tensor, idx: Tensor, A: int, fill) -> Tensor:
    """``[B, L]`` values at ``idx`` into a ``[B, A]`` tensor filled with ``fill`` elsewhere."""
    out = torch.full((sub.shape[0], A), fill, dtype=sub.dtype, device=sub.device)
    return out.scatter_(1, idx, sub)


def background_result(x: DenseInputs) -> AssignResult:
    """Every anchor of every image to background."""
    B, A = x.cls_logits.shape[:2]
    empty = torch.full((B, A), -1, dtype=torch.long, device=x.gt_boxes.device)
    return result_from_index(empty, x.gt_labels, x.gt_boxes)


def result_from_index(
    gt_index: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    ious: Tensor | None = None,
    anchor_ious: Tensor | None = None,
    converged: Tensor | None = None,
) -> AssignResult:
    """Gather the per-anchor targets of ``gt_index [B, A]`` (-1 = background); the IoU target
    from pairwise ``ious [B, A, G]``, or given per anchor as ``anchor_ious [B, A]``;
    ``converged [B]`` (default: all True)."""
    fg = gt_index >= 0
    if converged is None:
        converged = torch.ones(gt_index.shape[0], dtype=torch.bool, device=gt_index.device)
    if gt_boxes.shape[1] == 0:  # no ground truth in the whole batch: all background
        B, A = gt_index.shape
        zeros = torch.zeros(B, A, dtype=gt_boxes.dtype, device=gt_boxes.device)
        return AssignResult(
            gt_index,
            gt_index.clone(),
            zeros[..., None].expand(B, A, 4).clone(),
            zeros,
            fg.sum(1),
            converged,
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
    return AssignResult(gt_index, labels, boxes, iou, fg.sum(1), converged)
