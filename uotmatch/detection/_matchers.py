"""DETR-style set matchers: Hungarian (exact one-to-one) and UOT (any regime, soft plan)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from uotmatch._match import match
from uotmatch._result import Matching
from uotmatch.detection.boxes import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "UOTMatcher", "pad_targets", "set_matching_cost"]

Pairs = list[tuple[Tensor, Tensor]]
#: Added inside the focal classification cost's logs (as Deformable DETR).
FOCAL_LOG_EPS = 1e-8


def pad_targets(
    targets: Sequence[Mapping[str, Tensor]], device=None
) -> tuple[Tensor, Tensor, Tensor]:
    """DETR targets (a list of ``{"labels": [n_i], "boxes": [n_i, 4]}``) as padded tensors.

    Returns:
        labels ``[B, G]`` int64 (0 in padding), boxes ``[B, G, 4]`` (padding: a unit box), mask
        ``[B, G]`` bool (True on real targets), with ``G = max n_i``.
    """
    if not isinstance(targets, Sequence) or isinstance(targets, (str, bytes)):
        raise ValueError(f"targets must be a list of dicts, got {type(targets).__name__}")
    B = len(targets)
    sizes = []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{i}] must be a dict with 'labels' and 'boxes'")
        n = len(t["labels"])
        if tuple(t["boxes"].shape) != (n, 4):
            raise ValueError(
                f"targets[{i}]['boxes'] must be [{n}, 4] to match its {n} labels, "
                f"got {tuple(t['boxes'].shape)}"
            )
        sizes.append(n)
    G = max(sizes, default=0)
    labels = torch.zeros(B, G, dtype=torch.long, device=device)
    boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(B, G, 1)
    mask = torch.zeros(B, G, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, sizes, strict=True)):
        labels[i, :n] = t["labels"].to(device=device, dtype=torch.long)
        boxes[i, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
        mask[i, :n] = True
    return labels, boxes, mask


def set_matching_cost(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    labels: Tensor,
    boxes: Tensor,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    focal: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> Tensor:
    """DETR's matching cost, batched: ``[B, Q, G]``.

    ``cost_class * (-p(target class))`` (softmax, the no-object logit last; with ``focal``,
    Deformable DETR's sigmoid focal cost) ``+ cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)``.

    Args:
        pred_logits: ``[B, Q, K]`` (``K`` includes no-object for softmax).
        pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
        labels: ``[B, G]`` int64; boxes: ``[B, G, 4]`` normalised cxcywh.
    """
    logits = pred_logits.float()
    index = labels.unsqueeze(1).expand(-1, logits.shape[1], -1)  # [B, Q, G]
    if focal:
        prob = logits.sigmoid().gather(2, index)
        neg = (1 - focal_alpha) * prob**focal_gamma * -(1 - prob + FOCAL_LOG_EPS).log()
        pos = focal_alpha * (1 - prob) ** focal_gamma * -(prob + FOCAL_LOG_EPS).log()
        cls = pos - neg
    else:
        cls = -logits.softmax(-1).gather(2, index)
    pb, tb = pred_boxes.float(), boxes.float()
    l1 = torch.cdist(pb, tb, p=1)  # [B, Q, G]
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb))
    return cost_bbox * l1 + cost_class * cls - cost_giou * giou


def _check_outputs(outputs: Mapping[str, Tensor], n_targets: int) -> tuple[Tensor, Tensor]:
    if not isinstance(outputs, Mapping) or not {"pred_logits", "pred_boxes"} <= set(outputs):
        raise ValueError("outputs must be a dict with 'pred_logits' and 'pred_boxes'")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            "outputs['pred_logits'] must be [B, Q, K] and outputs['pred_boxes'] [B, Q, 4], got "
            f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    if logits.shape[:2] != boxes.shape[:2] or logits.shape[0] != n_targets:
        raise ValueError(
            f"batch and query sizes must agree: pred_logits {tuple(logits.shape[:2])}, "
            f"pred_boxes {tuple(boxes.shape[:2])}, {n_targets} targets"
        )
    return logits, boxes


class _SetMatcher(nn.Module):
    def __init__(self, cost_class, cost_bbox, cost_giou, focal, focal_alpha, focal_gamma):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal, self.focal_alpha, self.focal_gamma = focal, focal_alpha, focal_gamma

    def cost(self, outputs, targets) -> tuple[Tensor, Tensor]:
        """The batched matching cost ``[B, Q, G]`` and the target mask ``[B, G]``."""
        logits, boxes = _check_outputs(outputs, len(targets))
        labels, tboxes, mask = pad_targets(targets, device=logits.device)
        C = set_matching_cost(
            logits,
            boxes,
            labels,
            tboxes,
            self.cost_class,
            self.cost_bbox,
            self.cost_giou,
            self.focal,
            self.focal_alpha,
            self.focal_gamma,
        )
        return C, mask


class HungarianMatcher(_SetMatcher):
    """DETR's one-to-one matcher: per image, ``scipy.optimize.linear_sum_assignment``.

    Same constructor keywords and call as DETR's ``HungarianMatcher``; the cost is built for the
    whole batch at once (padded), the assignment per image (scipy has no batched solver).

    Returns from ``forward(outputs, targets)`` a list of ``(pred_idx, gt_idx)`` int64 CPU tensor
    pairs, one per image, sorted by prediction.

    Example:
        >>> import torch
        >>> from uotmatch.detection import HungarianMatcher, UOTMatcher
        >>> outputs = {
        ...     "pred_logits": torch.eye(3)[None] * 2,  # [B, Q, K + 1]
        ...     "pred_boxes": torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2],
        ...                                  [0.5, 0.5, 0.9, 0.9]]]),  # [B, Q, 4] cxcywh
        ... }
        >>> targets = [{"labels": torch.tensor([1, 0]),
        ...             "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])}]
        >>> HungarianMatcher()(outputs, targets)
        [(tensor([0, 1]), tensor([1, 0]))]
        >>> UOTMatcher(eps=0.0)(outputs, targets)  # the Hungarian limit
        [(tensor([0, 1]), tensor([1, 0]))]
        >>> UOTMatcher(eps=0.05).solve(outputs, targets).plan.shape  # [B, Q, G + 1]: soft plan
        torch.Size([1, 3, 3])
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__(cost_class, cost_bbox, cost_giou, focal, focal_alpha, focal_gamma)

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> Pairs:
        C, mask = self.cost(outputs, targets)
        C, sizes = C.cpu().numpy(), mask.sum(1).tolist()
        pairs = []
        for c, n in zip(C, sizes, strict=True):
            i, j = linear_sum_assignment(c[:, :n]) if n else (np.zeros(0), np.zeros(0))
            pairs.append(
                (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            )
        return pairs


class UOTMatcher(_SetMatcher):
    """Set matching by entropic unbalanced OT, the whole batch in one :func:`uotmatch.match` call.

    ``forward(outputs, targets)`` returns DETR-style pairs (each prediction to the ground truth
    with the largest share of its row, background excluded); :meth:`solve` returns the full
    :class:`~uotmatch.Matching`, whose ``plan [B, Q, G + 1]`` (last column: background, padded
    columns exactly 0) feeds the UOT paper's plan-weighted loss.

    With ``eps=0, tau1=tau2=inf`` it is exactly Hungarian matching (any constant background cost
    leaves the optimum unchanged).

    Args:
        eps, tau1, tau2: the regime (see :func:`uotmatch.match`).
        background_cost: cost of leaving a prediction unmatched (a float), or ``None`` for no
            background column (then ``tau1 = tau2 = inf`` needs as many predictions as targets).
        normalize: divide each image's cost by its largest absolute value (the UOT paper's
            DETR setting) before solving.
        cost_class, cost_bbox, cost_giou, focal, focal_alpha, focal_gamma: as DETR.
        max_iter, tol: solver budget.
    """

    def __init__(
        self,
        eps: float = 0.05,
        tau1: float = math.inf,
        tau2: float = math.inf,
        background_cost: float | None = 0.0,
        normalize: bool = False,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        max_iter: int = 1000,
        tol: float = 1e-5,
    ):
        super().__init__(cost_class, cost_bbox, cost_giou, focal, focal_alpha, focal_gamma)
        self.eps, self.tau1, self.tau2 = eps, tau1, tau2
        self.background_cost, self.normalize = background_cost, normalize
        self.max_iter, self.tol = max_iter, tol

    @torch.no_grad()
    def solve(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> Matching:
        """The batched matching: plan ``[B, Q, G(+1)]`` with ``G = max`` targets per image."""
        C, mask = self.cost(outputs, targets)
        if self.normalize:
            scale = C.masked_fill(~mask[:, None, :], 0).abs().amax((1, 2), keepdim=True)
            C = C / scale.clamp_min(torch.finfo(C.dtype).tiny)
        return match(
            C,
            self.eps,
            self.tau1,
            self.tau2,
            mask=mask,
            background_cost=self.background_cost,
            max_iter=self.max_iter,
            tol=self.tol,
        )

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> Pairs:
        return self.solve(outputs, targets).pairs()
