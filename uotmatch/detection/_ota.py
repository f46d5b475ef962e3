"""OTA (Ge et al., CVPR 2021) and its unbalanced generalisation, batched on :func:`match`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uotmatch._match import match
from uotmatch.detection._dense import (
    AssignResult,
    check_inputs,
    ensure_candidate,
    focal_costs,
    inside_boxes,
    inside_centre,
    result_from_index,
)
from uotmatch.detection.boxes import box_iou

__all__ = ["OTAAssigner", "UOTAssigner"]

#: Added to the cost of a pair outside the centre prior (the official OTA code's 1e6).
CENTER_PRIOR_PENALTY = 1e6
#: Inside ``-log(IoU + IOU_LOG_EPS)``, the regression cost.
IOU_LOG_EPS = 1e-8


class UOTAssigner:
    """Label assignment of dense detectors by entropic unbalanced OT, OTA's costs and supplies.

    Anchors are the rows (demand 1 each), ground truths the columns (supply ``k``), background
    the last column (supply ``max(A - sum k, 0)``, cost = focal loss against "no object"):

    * cost = ``cls_weight * focal(logits, one-hot gt class) + reg_weight * -log IoU(pred, gt)``
      ``+ CENTER_PRIOR_PENALTY`` unless the anchor is inside the box and within
      ``radius * stride`` of its centre (a ground truth too small to hold any anchor point keeps
      its nearest one);
    * supplies: fixed ``k``, or dynamic ``k = max(1, floor(sum of the top-q IoUs))`` over the
      candidates; if ``sum k`` exceeds the number of candidate anchors the ks are scaled down to
      it (so the problem stays feasible without penalty pairs);
    * each anchor goes to the argmax of its plan row (background included).

    With ``tau1 = tau2 = inf`` this is OTA (:class:`OTAAssigner`), and then only candidate
    anchors enter the solve (the others can only take background): same assignment as the dense
    problem, far fewer rows. Finite taus solve the dense problem (there the background column's
    KL term couples every anchor).

    Args:
        eps, tau1, tau2: the UOT regime (:func:`uotmatch.match`).
        radius: centre-prior radius in strides.
        q: top-q IoUs summed for the dynamic k.
        k: a fixed supply per ground truth instead of the dynamic one.
        cls_weight, reg_weight: cost weights (OTA's alpha is ``reg_weight``).
        focal_alpha, focal_gamma: of the focal classification cost.
        max_iter, tol: solver budget.
        compact: solve over the candidate anchors only (balanced case; same assignment).
    """

    def __init__(
        self,
        eps: float = 0.1,
        tau1: float = math.inf,
        tau2: float = math.inf,
        *,
        radius: float = 2.5,
        q: int = 20,
        k: float | None = None,
        cls_weight: float = 1.0,
        reg_weight: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        max_iter: int = 1000,
        tol: float = 1e-4,
        compact: bool = True,
    ):
        if radius <= 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        if q < 1:
            raise ValueError(f"q must be >= 1, got {q}")
        if k is not None and not k > 0:
            raise ValueError(f"k must be > 0 (or None for the dynamic k), got {k}")
        self.eps, self.tau1, self.tau2 = eps, tau1, tau2
        self.radius, self.q, self.k = radius, q, k
        self.cls_weight, self.reg_weight = cls_weight, reg_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.max_iter, self.tol = max_iter, tol
        self.compact = compact and math.isinf(tau1) and math.isinf(tau2)

    def costs(self, points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask):
        """``cost [B, A, G]``, ``background [B, A]``, ``ious [B, A, G]``, ``candidate`` bool
        ``[B, A, G]``: the pairwise costs, background cost, IoUs and centre prior."""
        candidate = inside_boxes(points, gt_boxes) & inside_centre(
            points, strides, gt_boxes, self.radius, clip=True
        )
        candidate = ensure_candidate(candidate & gt_mask[:, None], points, gt_boxes, gt_mask)
        cls, background = focal_costs(cls_logits, gt_labels, self.focal_alpha, self.focal_gamma)
        ious = box_iou(pred_boxes.float(), gt_boxes.float())  # [B, A, G]
        cost = self.cls_weight * cls - self.reg_weight * (ious + IOU_LOG_EPS).log()
        cost = cost + CENTER_PRIOR_PENALTY * ~candidate
        return cost, self.cls_weight * background, ious, candidate

    def supplies(self, ious: Tensor, candidate: Tensor, gt_mask: Tensor) -> Tensor:
        """``[B, G]`` positive labels each ground truth supplies (0 on padding)."""
        B, A, G = ious.shape
        if self.k is not None:
            k = torch.full((B, G), float(self.k), device=ious.device)
        else:
            q = min(self.q, A)
            top = (ious * candidate).topk(q, dim=1).values  # [B, q, G]
            k = top.sum(1).floor().clamp_min(1.0)
        k = torch.where(gt_mask, k, 0.0)
        capacity = candidate.any(-1).sum(1, keepdim=True).float()  # [B, 1] candidate anchors
        total = k.sum(1, keepdim=True)
        return torch.where(total > capacity, k * capacity / total.clamp_min(1.0), k)

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
    ) -> AssignResult:
        """Assign the anchors of a batch.

        Args:
            points: ``[A, 2]`` anchor point coordinates (x, y), the same for every image.
            strides: ``[A]`` stride of each point's feature level.
            cls_logits: ``[B, A, K]`` classification logits (any float dtype).
            pred_boxes: ``[B, A, 4]`` predicted boxes, xyxy.
            gt_boxes: ``[B, G, 4]`` xyxy, padded; gt_labels: ``[B, G]`` int64 in ``[0, K)``.
            gt_mask: ``[B, G]`` bool, True on real ground truths (default: all).
        """
        gt_mask = check_inputs(
            points, strides, gt_boxes, gt_labels, gt_mask, cls_logits, pred_boxes
        )
        B, A = cls_logits.shape[:2]
        if gt_boxes.shape[1] == 0 or not bool(gt_mask.any()):
            empty = torch.full((B, A), -1, dtype=torch.long, device=cls_logits.device)
            return result_from_index(empty, gt_labels, gt_boxes.float(), None)
        gt_boxes = gt_boxes.float()
        cost, background, ious, candidate = self.costs(
            points.float(), strides.float(), cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask
        )
        k = self.supplies(ious, candidate, gt_mask)
        if self.compact:
            gt_index = self._solve_compact(cost, background, candidate, k, gt_mask)
        else:
            m = match(
                cost,
                self.eps,
                self.tau1,
                self.tau2,
                b=k,
                mask=gt_mask,
                background_cost=background,
                max_iter=self.max_iter,
                tol=self.tol,
            )
            gt_index = m.assignment()
        return result_from_index(gt_index, gt_labels, gt_boxes, ious)

    def _solve_compact(self, cost, background, candidate, k, gt_mask) -> Tensor:
        """Balanced OT over the candidate anchors only; the rest take background."""
        B, A, G = cost.shape
        rows = candidate.any(-1)  # [B, A]
        n = rows.sum(1)  # [B]
        L = max(int(n.max()), 1)
        # Stable partition, candidates first: position of each anchor, then the inverse.
        first = rows.cumsum(1) - 1
        rest = n[:, None] + (~rows).cumsum(1) - 1
        position = torch.where(rows, first, rest)
        order = torch.empty_like(position).scatter_(
            1, position, torch.arange(A, device=cost.device).expand(B, A)
        )
        idx = order[:, :L]  # [B, L]
        a = (torch.arange(L, device=cost.device)[None] < n[:, None]).float()  # padding rows: mass 0
        sub_cost = cost.gather(1, idx[..., None].expand(-1, -1, G))
        m = match(
            sub_cost,
            self.eps,
            self.tau1,
            self.tau2,
            a=a,
            b=k,
            mask=gt_mask,
            background_cost=background.gather(1, idx),
            max_iter=self.max_iter,
            tol=self.tol,
        )
        gt_index = torch.full((B, A), -1, dtype=torch.long, device=cost.device)
        return gt_index.scatter_(1, idx, torch.where(a > 0, m.assignment(), -1))


class OTAAssigner(UOTAssigner):
    """OTA: balanced optimal transport assignment (Ge et al., CVPR 2021, Algorithm 1).

    :class:`UOTAssigner` with ``tau1 = tau2 = inf``: every anchor receives exactly one unit
    (positive from a ground truth, or negative from background), every ground truth supplies its
    dynamic ``k``. Defaults as the paper: eps 0.1, centre-prior radius 2.5, q 20, cost weight
    ``alpha = 1.5`` on the IoU cost. Only candidate anchors enter the solve.
    """

    def __init__(self, eps: float = 0.1, **kwargs):
        for name in ("tau1", "tau2"):
            if name in kwargs:
                raise ValueError(
                    f"OTAAssigner is balanced ({name} = inf); use UOTAssigner for {name}"
                )
        super().__init__(eps, math.inf, math.inf, **kwargs)
