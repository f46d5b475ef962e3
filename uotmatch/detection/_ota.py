"""OTA (Ge et al., CVPR 2021) and its unbalanced generalisation, batched on :func:`match`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uotmatch._match import match
from uotmatch.detection._dense import (
    AssignResult,
    background_result,
    candidate_rows,
    check_inputs,
    ensure_candidate,
    focal_costs,
    gather_rows,
    inside_boxes,
    inside_centre,
    result_from_index,
    scatter_rows,
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
        max_iter, tol: solver budget. The official OTA code runs 50 iterations, whatever
            happens; we stop at ``tol`` or ``max_iter`` (default 100). Some scenes have no
            feasible plan among the candidates (e.g. two tiny objects whose only candidate is
            the same anchor); there the solver cannot converge, and the budget bounds the cost
            while the argmax decoding of the partial plan still assigns every anchor.
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
        max_iter: int = 100,
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

    def candidates(self, points, strides, gt_boxes, gt_mask) -> Tensor:
        """``[B, A, G]`` bool centre prior: inside the box and within ``radius * stride`` of its
        centre (a real ground truth holding no point keeps its nearest one)."""
        candidate = inside_boxes(points, gt_boxes) & inside_centre(
            points, strides, gt_boxes, self.radius, clip=True
        )
        return ensure_candidate(candidate & gt_mask[:, None], points, gt_boxes, gt_mask)

    def pair_costs(self, cls_logits, pred_boxes, gt_boxes, gt_labels, candidate):
        """For anchors ``[B, R, ...]``: ``cost [B, R, G]``, ``background [B, R]``, ``ious``."""
        cls, background = focal_costs(cls_logits, gt_labels, self.focal_alpha, self.focal_gamma)
        ious = box_iou(pred_boxes.float(), gt_boxes.float())  # [B, R, G]
        cost = self.cls_weight * cls - self.reg_weight * (ious + IOU_LOG_EPS).log()
        cost = cost + CENTER_PRIOR_PENALTY * ~candidate
        return cost, self.cls_weight * background, ious

    def costs(self, points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask):
        """The dense problem over all anchors: ``cost [B, A, G]``, ``background [B, A]``,
        ``ious [B, A, G]`` and the centre prior ``candidate [B, A, G]``."""
        candidate = self.candidates(points.float(), strides.float(), gt_boxes.float(), gt_mask)
        cost, background, ious = self.pair_costs(
            cls_logits, pred_boxes, gt_boxes.float(), gt_labels, candidate
        )
        return cost, background, ious, candidate

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
            return background_result(B, A, gt_labels, gt_boxes)
        gt_boxes = gt_boxes.float()
        if not self.compact:
            cost, background, ious, candidate = self.costs(
                points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask
            )
            k = self.supplies(ious, candidate, gt_mask)
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
            return result_from_index(m.assignment(), gt_labels, gt_boxes, ious)
        return self._assign_compact(
            points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask
        )

    def _assign_compact(
        self, points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask
    ) -> AssignResult:
        """Balanced OT over the candidate anchors only; the rest take background. Costs are
        computed for the candidates alone (a few percent of the anchors)."""
        candidate = self.candidates(points.float(), strides.float(), gt_boxes, gt_mask)
        B, A, G = candidate.shape
        idx, real = candidate_rows(candidate.any(-1))  # [B, L]

        def rows_of(x: Tensor) -> Tensor:  # [B, A, D] -> [B, L, D]
            return gather_rows(x, idx)

        sub_candidate = rows_of(candidate) & real[..., None]
        cost, background, ious = self.pair_costs(
            rows_of(cls_logits), rows_of(pred_boxes), gt_boxes, gt_labels, sub_candidate
        )
        k = self.supplies(ious, sub_candidate, gt_mask)
        m = match(
            cost,
            self.eps,
            self.tau1,
            self.tau2,
            a=real.float(),
            b=k,
            mask=gt_mask,
            background_cost=background,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        sub_index = torch.where(real, m.assignment(), -1)  # [B, L]
        sub_iou = ious.gather(2, sub_index.clamp_min(0)[..., None]).squeeze(-1) * (sub_index >= 0)
        return result_from_index(
            scatter_rows(sub_index, idx, A, -1),
            gt_labels,
            gt_boxes,
            anchor_ious=scatter_rows(sub_iou, idx, A, 0.0),
        )


class OTAAssigner(UOTAssigner):
    """OTA: balanced optimal transport assignment (Ge et al., CVPR 2021, Algorithm 1).

    :class:`UOTAssigner` with ``tau1 = tau2 = inf``: every anchor receives exactly one unit
    (positive from a ground truth, or negative from background), every ground truth supplies its
    dynamic ``k``. Defaults as the paper: eps 0.1, centre-prior radius 2.5, q 20, cost weight
    ``alpha = 1.5`` on the IoU cost. Only candidate anchors enter the solve.

    Example:
        >>> import torch
        >>> from uotmatch.detection import OTAAssigner, anchor_points
        >>> points, strides = anchor_points(64, 64)  # [85, 2], [85]
        >>> cls_logits = torch.full((1, 85, 3), -4.6)  # [B, A, K]
        >>> pred_boxes = torch.cat([points - 16, points + 16], 1)[None]  # [B, A, 4]
        >>> gt_boxes, gt_labels = torch.tensor([[[8.0, 8.0, 40.0, 40.0]]]), torch.tensor([[2]])
        >>> result = OTAAssigner()(points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels)
        >>> result.num_fg, result.labels[result.fg_mask]
        (tensor([5]), tensor([2, 2, 2, 2, 2]))
    """

    def __init__(self, eps: float = 0.1, **kwargs):
        for name in ("tau1", "tau2"):
            if name in kwargs:
                raise ValueError(
                    f"OTAAssigner is balanced ({name} = inf); use UOTAssigner for {name}"
                )
        super().__init__(eps, math.inf, math.inf, **kwargs)
