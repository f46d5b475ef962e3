"""DETR's set criterion, with hard (matched pairs) or plan-weighted (UOT paper) losses.

Losses come from ``loss_map`` and are combined with ``weight_dict`` (DETR's structure):
``loss_ce`` (cross-entropy with the no-object class weighted ``eos_coef``, or sigmoid focal),
``loss_bbox`` (L1 of normalised cxcywh) and ``loss_giou`` (1 - GIoU), each box term divided by
``num_boxes`` (all-reduced over ranks, at least 1); ``cardinality_error`` is logged. With
auxiliary decoding losses every decoder layer is matched and scored (keys suffixed ``_i``).

``loss_weighting="plan"`` is the UOT paper's loss ``N_p * sum_ij P_ij L(y_hat_i, y_j)``: with our
unit prediction masses the plan's rows already sum to 1 (``N_p`` times the paper's ``1/N_p``),
so every pair's loss is weighted by its plan entry and a prediction's background share takes
the classification term alone (no-object). When the plan is a 0/1 matching this is exactly the
hard loss (tested).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from uotmatch.detection import (
    HungarianMatcher,
    UOTMatcher,
    aligned_giou,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    pad_targets,
)

__all__ = ["LOSS_WEIGHTINGS", "SetCriterion", "detr_targets", "plan_from_pairs"]

LOSS_WEIGHTINGS = ("hard", "plan")
#: Focal loss parameters (Deformable DETR's).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def detr_targets(batch: Mapping) -> list[dict[str, Tensor]]:
    """DETR targets from a collated batch: per image ``labels [n]`` and ``boxes [n, 4]``,
    cxcywh normalised by the image's unpadded size."""
    out = []
    for boxes, labels, mask, (h, w) in zip(
        batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"], batch["image_sizes"], strict=True
    ):
        scale = torch.stack([w, h, w, h]).to(boxes.dtype)
        out.append({"labels": labels[mask], "boxes": box_xyxy_to_cxcywh(boxes[mask]) / scale})
    return out


def plan_from_pairs(pairs: Sequence[tuple[Tensor, Tensor]], B: int, Q: int, G: int) -> Tensor:
    """A 0/1 plan ``[B, Q, G]`` from DETR-style ``(pred_idx, gt_idx)`` pairs."""
    plan = torch.zeros(B, Q, G)
    for b, (i, j) in enumerate(pairs):
        plan[b, i, j] = 1.0
    return plan


def _num_boxes(targets, device) -> Tensor:
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp_min(1.0)


def _focal_terms(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Sigmoid focal loss summed over classes, ``[B, Q]`` against the all-zero target and
    ``[B, Q, G]`` against each target's one-hot class."""
    p = logits.sigmoid()
    neg = (1 - FOCAL_ALPHA) * p**FOCAL_GAMMA * F.softplus(logits)  # -log(1 - p) = softplus(x)
    pos = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * F.softplus(-logits)  # -log p
    background = neg.sum(-1)  # [B, Q]
    index = labels.unsqueeze(1).expand(-1, logits.shape[1], -1)  # [B, Q, G]
    return background, background.unsqueeze(-1) + (pos - neg).gather(2, index)


class SetCriterion(nn.Module):
    """DETR's loss over a matcher's matching.

    Args:
        num_classes: K (the no-object class is K for softmax models).
        matcher: a :class:`~uotmatch.detection.HungarianMatcher` or
            :class:`~uotmatch.detection.UOTMatcher`; with ``loss_weighting="plan"`` a UOT matcher
            gives its soft plan, a Hungarian one its 0/1 matching.
        weight_dict: ``loss name -> weight`` for the final layer's terms (``loss_ce``,
            ``loss_bbox``, ``loss_giou``); auxiliary layers get the same weights.
        eos_coef: weight of the no-object class in the cross-entropy.
        losses: names in ``loss_map`` to compute.
        loss_weighting: ``"hard"`` or ``"plan"``.
        focal: sigmoid focal classification (the model has K logits, no no-object).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | UOTMatcher,
        weight_dict: Mapping[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "boxes", "cardinality"),
        loss_weighting: str = "hard",
        focal: bool = False,
    ):
        super().__init__()
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}"
            )
        self.loss_map = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
        }
        unknown = sorted(set(losses) - set(self.loss_map))
        if unknown:
            raise ValueError(f"losses must be among {sorted(self.loss_map)}, got {unknown}")
        unknown = sorted(set(weight_dict) - {"loss_ce", "loss_bbox", "loss_giou"})
        if unknown:
            raise ValueError(f"weight_dict keys must be loss_ce, loss_bbox, loss_giou: {unknown}")
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, dict(weight_dict)
        self.eos_coef, self.losses = eos_coef, tuple(losses)
        self.loss_weighting, self.focal = loss_weighting, focal
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # -- matching ------------------------------------------------------------------------------

    @torch.no_grad()
    def match(self, outputs: Mapping, targets) -> tuple[Tensor, Tensor] | list:
        """Hard: the matcher's pairs. Plan: ``(plan [B, Q, G], background share [B, Q])``."""
        if self.loss_weighting == "hard":
            return self.matcher(outputs, targets)
        B, Q = outputs["pred_logits"].shape[:2]
        G = max((len(t["labels"]) for t in targets), default=0)
        device = outputs["pred_logits"].device
        if isinstance(self.matcher, UOTMatcher):
            m = self.matcher.solve(outputs, targets)
            plan = m.plan.float()
            if m.has_background:
                return plan[..., :G], plan[..., G]
            return plan, (1 - plan.sum(-1)).clamp_min(0)
        plan = plan_from_pairs(self.matcher(outputs, targets), B, Q, G).to(device)
        return plan, 1 - plan.sum(-1)

    # -- losses (hard: matched pairs; plan: every pair weighted by the plan) ----------------------

    def loss_labels(self, outputs, targets, matching, num_boxes) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()  # [B, Q, K(+1)]
        B, Q = logits.shape[:2]
        labels, _, _ = pad_targets(targets, device=logits.device)  # [B, G]
        if self.loss_weighting == "plan":
            plan, background = matching
            if self.focal:
                bg, pair = _focal_terms(logits, labels)
                total = (plan * pair).sum() + (background * bg).sum()
                return {"loss_ce": total / num_boxes}
            logp = logits.log_softmax(-1)
            index = labels.unsqueeze(1).expand(-1, Q, -1)
            ce_pair = -logp.gather(2, index)  # [B, Q, G], class weight 1
            ce_bg = -logp[..., -1]  # [B, Q], weight eos_coef
            num = (plan * ce_pair).sum() + self.eos_coef * (background * ce_bg).sum()
            den = plan.sum() + self.eos_coef * background.sum()
            return {"loss_ce": num / den.clamp_min(torch.finfo(den.dtype).tiny)}
        b, q, g = _flat_pairs(matching, logits.device)
        classes = torch.full((B, Q), self.num_classes, dtype=torch.long, device=logits.device)
        classes[b, q] = labels[b, g]
        if self.focal:
            onehot = F.one_hot(classes, self.num_classes + 1)[..., :-1].to(logits.dtype)
            loss = sigmoid_focal_loss(logits, onehot, FOCAL_ALPHA, FOCAL_GAMMA, reduction="sum")
            return {"loss_ce": loss / num_boxes}
        loss = F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight)
        out = {"loss_ce": loss}
        if len(b):
            acc = (logits[b, q].argmax(-1) == labels[b, g]).float().mean()
            out["class_error"] = (100 * (1 - acc)).detach()
        return out

    def loss_boxes(self, outputs, targets, matching, num_boxes) -> dict[str, Tensor]:
        pred = outputs["pred_boxes"].float()  # [B, Q, 4]
        _, tboxes, _ = pad_targets(targets, device=pred.device)  # [B, G, 4]
        if self.loss_weighting == "plan":
            plan, _ = matching
            l1 = torch.cdist(pred, tboxes, p=1)  # [B, Q, G]
            giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tboxes))
            return {
                "loss_bbox": (plan * l1).sum() / num_boxes,
                "loss_giou": (plan * (1 - giou)).sum() / num_boxes,
            }
        b, q, g = _flat_pairs(matching, pred.device)
        src, tgt = pred[b, q], tboxes[b, g]
        giou = aligned_giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return {
            "loss_bbox": F.l1_loss(src, tgt, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, matching, num_boxes) -> dict[str, Tensor]:
        """Mean absolute error between the number of predicted objects and of targets (logged,
        no gradient)."""
        logits = outputs["pred_logits"]
        if self.focal:
            count = (logits.sigmoid().amax(-1) > 0.5).sum(1)
        else:
            count = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        n = torch.tensor([len(t["labels"]) for t in targets], device=logits.device)
        return {"cardinality_error": (count - n).abs().float().mean()}

    # -- the whole criterion ---------------------------------------------------------------------

    def forward(self, outputs: Mapping, targets) -> dict[str, Tensor]:
        """All loss terms, the weighted total under ``"loss"``."""
        num_boxes = _num_boxes(targets, outputs["pred_logits"].device)
        layers = [("", outputs)] + [
            (f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))
        ]
        losses: dict[str, Tensor] = {}
        for suffix, out in layers:
            matching = self.match(out, targets)
            for name in self.losses:
                if suffix and name == "cardinality":
                    continue
                for key, v in self.loss_map[name](out, targets, matching, num_boxes).items():
                    if suffix and key == "class_error":
                        continue
                    losses[key + suffix] = v
        weights = {key + suffix: w for key, w in self.weight_dict.items() for suffix, _ in layers}
        losses["loss"] = sum(weights[key] * v for key, v in losses.items() if key in weights)
        return losses


def _flat_pairs(pairs, device) -> tuple[Tensor, Tensor, Tensor]:
    """``(batch, query, target)`` index vectors of all matched pairs."""
    b = torch.cat([torch.full_like(i, k) for k, (i, _) in enumerate(pairs)]).to(device)
    q = torch.cat([i for i, _ in pairs]).to(device)
    g = torch.cat([j for _, j in pairs]).to(device)
    return b, q, g
