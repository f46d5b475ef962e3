"""Set-prediction losses weighted by a plan: the UOT paper's loss, and DETR's at a 0/1 plan.

Every loss here is one sum over a plan ``P [B, Q, G]`` (queries by targets) and each query's
background share ``P_i∅`` ``[B, Q]``: ``sum_ij P_ij L(y_hat_i, y_j) + sum_i P_i∅
L_noobj(y_hat_i)``. With the matcher's plan it is the UOT paper's *plan-weighted* loss; with the
0/1 plan of matched pairs (:func:`loss_weights` with a ``decode``) it is DETR's (and Hugging
Face's, Deformable-DETR's) loss exactly. Padded targets (``mask`` False) carry no plan mass.

The bundled DETR criterion (``detectors.detr.criterion``) and the Hugging Face integration
(:mod:`uotmatch.integrations.transformers`) both compute their plan-weighted terms here.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from uotmatch._result import Matching
from uotmatch.detection.costs import detr_box_costs, focal_terms

__all__ = ["loss_weights", "plan_box_losses", "plan_cross_entropy", "plan_focal_loss"]


@torch.no_grad()
def loss_weights(m: Matching, num_targets: int, decode: str | None = None) -> tuple[Tensor, Tensor]:
    """The weights ``(plan [B, Q, G], background [B, Q])`` of a set matcher's matching.

    From its :class:`~uotmatch.Matching` (``G = num_targets``, the padded target count): the plan
    itself (``decode=None``) or the 0/1 plan of the pairs it decodes to (one of
    :data:`uotmatch.DECODINGS`). A query's background share is the plan's background column, or
    what its row leaves of its unit."""
    plan = cast(Tensor, m.plan).float()  # a set matcher's Matching holds tensors
    B, Q = plan.shape[:2]
    if decode is not None:
        hard = torch.zeros(B, Q, num_targets, device=plan.device)
        for b, (pred, gt) in enumerate(cast(list[tuple[Tensor, Tensor]], m.pairs(decode))):
            hard[b, pred.to(plan.device), gt.to(plan.device)] = 1.0
        return hard, (1 - hard.sum(-1)).clamp_min(0)
    if m.has_background:
        return plan[..., :num_targets], plan[..., num_targets]
    return plan, (1 - plan.sum(-1)).clamp_min(0)


def plan_cross_entropy(
    logits: Tensor, labels: Tensor, plan: Tensor, background: Tensor, eos_coef: float
) -> Tensor:
    """DETR's softmax cross-entropy, plan-weighted.

    ``logits [B, Q, K + 1]`` (the last class is no-object, weighted ``eos_coef``), ``labels [B,
    G]``. The weighted mean of ``torch.nn.functional.cross_entropy`` with DETR's class weights:
    at a 0/1 plan, DETR's ``loss_ce``."""
    logp = logits.float().log_softmax(-1)
    index = labels[:, None, :].expand(-1, logits.shape[1], -1)  # [B, Q, G]
    ce_pair = -logp.gather(2, index)
    ce_bg = -logp[..., -1]
    num = (plan * ce_pair).sum() + eos_coef * (background * ce_bg).sum()
    den = plan.sum() + eos_coef * background.sum()
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def plan_focal_loss(
    logits: Tensor,
    labels: Tensor,
    plan: Tensor,
    background: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """The sigmoid focal loss summed over classes and queries, plan-weighted.

    ``logits [B, Q, K]`` (no no-object logit), ``labels [B, G]``. Divide by the number of boxes
    for Deformable-DETR's ``loss_ce``."""
    pair, bg = focal_terms(logits, labels, alpha, gamma)
    return (plan * pair).sum() + (background * bg).sum()


def plan_box_losses(pred_boxes: Tensor, boxes: Tensor, plan: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_ij P_ij |b_i - b_j|_1, sum_ij P_ij (1 - GIoU_ij))``: the plan-weighted box losses.

    For normalised cxcywh ``pred_boxes [B, Q, 4]`` and ``boxes [B, G, 4]``; divide by the number of
    boxes for DETR's ``loss_bbox`` and ``loss_giou``."""
    l1, giou = detr_box_costs(pred_boxes, boxes)  # [B, Q, G]
    return (plan * l1).sum(), (plan * (1 - giou)).sum()
