"""The matching costs of the assigners and matchers, written once.

The bundled detectors' losses reuse the same terms.

Every classification term comes as a pair ``(pair, background)``: ``pair [B, A, G]`` is the loss
of each prediction against each ground truth's one-hot class (summed over the classes), and
``background [B, A]`` its loss against the all-zero target ("no object"). The one-hot sum is the
background sum with the target class's term swapped for its positive loss
(:func:`one_hot_terms`), so ``[B, A, G, K]`` is never built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from uotmatch.detection.boxes import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = [
    "DETR_FOCAL_EPS",
    "set_matching_cost",
    "IOU_LOG_EPS",
    "IOU_LOG_FLOOR",
    "bce_terms",
    "detr_box_costs",
    "detr_class_cost",
    "focal_elementwise",
    "focal_terms",
    "iou_cost",
    "one_hot_terms",
]

#: YOLOX's regression cost is ``-log(IoU + IOU_LOG_EPS)``.
IOU_LOG_EPS = 1e-8
#: The official OTA code's is ``-log(max(IoU, IOU_LOG_FLOOR))`` (float32's eps).
IOU_LOG_FLOOR = float(torch.finfo(torch.float32).eps)


def _wide(x: Tensor, *others: Tensor) -> Tensor:
    """``x`` in float32 or wider: half precision computed in float32, float64 kept.

    With ``others``, in the dtype that all of them promote to (at least float32)."""
    dtype = x.dtype
    for o in others:
        dtype = torch.promote_types(dtype, o.dtype)
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        dtype = torch.float32
    return x.to(dtype)


def one_hot_terms(pos: Tensor, neg: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class losses against target 1 and 0, summed against one-hot targets.

    ``pos`` and ``neg`` are ``[B, A, K]``; the result is ``(pair [B, A, G], background [B, A])``
    for ``labels [B, G]``."""
    background = neg.sum(-1)  # [B, A]
    index = labels[:, None, :].expand(-1, pos.shape[1], -1)  # [B, A, G]
    return background[..., None] + (pos - neg).gather(2, index), background


def focal_elementwise(logits: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Sigmoid focal loss (Lin et al., 2017) of each logit against target 1 and target 0.

    ``(pos, neg)`` of ``logits``' shape, in float32 or wider. ``-log p = softplus(-x)`` and
    ``-log(1 - p) = softplus(x)``: exact for saturated logits."""
    x = _wide(logits)
    p = x.sigmoid()
    pos = alpha * (1 - p).pow(gamma) * F.softplus(-x)  # FL(x, 1)
    neg = (1 - alpha) * p.pow(gamma) * F.softplus(x)  # FL(x, 0)
    return pos, neg


def focal_terms(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Sigmoid focal loss summed over classes.

    ``(pair [B, A, G], background [B, A])``, the OTA classification cost (``logits [B, A, K]``,
    ``labels [B, G]``)."""
    return one_hot_terms(*focal_elementwise(logits, alpha, gamma), labels)


def bce_terms(prob: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Binary cross-entropy of probabilities ``[B, A, K]`` summed over classes.

    ``(pair [B, A, G], background [B, A])``, the SimOTA classification cost. torch's
    ``binary_cross_entropy`` (each log clamped at -100), as YOLOX computes it."""
    p = _wide(prob)
    pos = F.binary_cross_entropy(p, torch.ones_like(p), reduction="none")
    neg = F.binary_cross_entropy(p, torch.zeros_like(p), reduction="none")
    return one_hot_terms(pos, neg, labels)


def iou_cost(ious: Tensor, *, floor: bool = False) -> Tensor:
    """The regression cost ``-log IoU``.

    As YOLOX's SimOTA, ``-log(IoU + IOU_LOG_EPS)``; with ``floor``, as the official OTA code,
    ``-log(max(IoU, IOU_LOG_FLOOR))`` (the two differ on pairs that do not overlap: 18.4 against
    15.9)."""
    if floor:
        return -ious.clamp_min(IOU_LOG_FLOOR).log()
    return -(ious + IOU_LOG_EPS).log()


#: Deformable-DETR's (and Hugging Face's) focal matching cost adds this inside its logs.
DETR_FOCAL_EPS = 1e-8


def detr_class_cost(
    logits: Tensor,
    labels: Tensor,
    focal: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    focal_eps: float = DETR_FOCAL_EPS,
) -> Tensor:
    """DETR's classification cost ``[B, Q, G]`` of ``logits [B, Q, K(+1)]`` for ``labels [B, G]``.

    Softmax (``focal=False``, the no-object logit last): ``-p(target class)``, as DETR. Focal
    (``K`` sigmoid logits, as Deformable-DETR, DINO and RT-DETR): ``alpha (1 - p)^gamma (-log(p
    + e)) - (1 - alpha) p^gamma (-log(1 - p + e))`` of the target class, the focal loss's
    positive term less its negative one, with Deformable-DETR's and Hugging Face's ``e =
    focal_eps = 1e-8``: their matcher's cost stops changing past a logit of about 16.6, and so
    does this one, so a swapped matcher makes their pairs also at saturated logits. ``focal_eps
    = 0`` is the exact value (``-log p = softplus(-x)``), finite at any logit.
    """
    index = labels[:, None, :].expand(-1, logits.shape[1], -1)  # [B, Q, G]
    if focal and focal_eps == 0:
        pos, neg = focal_elementwise(logits, focal_alpha, focal_gamma)
        return (pos - neg).gather(2, index)
    if focal:
        p = _wide(logits).sigmoid()
        neg = (1 - focal_alpha) * p.pow(focal_gamma) * -(1 - p + focal_eps).log()
        pos = focal_alpha * (1 - p).pow(focal_gamma) * -(p + focal_eps).log()
        return (pos - neg).gather(2, index)
    return -_wide(logits).softmax(-1).gather(2, index)


def detr_box_costs(pred_boxes: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """DETR's box costs between predictions ``[B, Q, 4]`` and targets ``[B, G, 4]``.

    Both normalised cxcywh: the L1 distance and the GIoU (of the xyxy boxes), ``[B, Q, G]`` each,
    in the dtype both promote to (float32 at least: half precision is computed in float32)."""
    pb, tb = _wide(pred_boxes, boxes), _wide(boxes, pred_boxes)
    l1 = torch.cdist(pb, tb, p=1)
    return l1, generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb))


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
    focal_eps: float = DETR_FOCAL_EPS,
) -> Tensor:
    """DETR's matching cost, batched: ``[B, Q, G]``.

    ``cost_class * class cost`` (:func:`~uotmatch.detection.costs.detr_class_cost`: softmax
    ``-p(target class)``, or with ``focal`` Deformable-DETR's focal cost) ``+ cost_bbox *
    L1(cxcywh) + cost_giou * (-GIoU)``.

    Args:
        pred_logits: ``[B, Q, K]`` (``K`` includes no-object for softmax).
        pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
        labels: ``[B, G]`` int64.
        boxes: ``[B, G, 4]`` normalised cxcywh.
        cost_class: weight of the class cost.
        cost_bbox: weight of the L1 distance between the boxes.
        cost_giou: weight of ``-GIoU``.
        focal: the focal class cost (sigmoid logits, no no-object class) instead of softmax's.
        focal_alpha: the focal cost's alpha.
        focal_gamma: the focal cost's gamma.
        focal_eps: inside its logs (Deformable-DETR's 1e-8; 0 for the exact focal cost).
    """
    cls = detr_class_cost(pred_logits, labels, focal, focal_alpha, focal_gamma, focal_eps)
    l1, giou = detr_box_costs(pred_boxes, boxes)
    return cost_bbox * l1 + cost_class * cls - cost_giou * giou
