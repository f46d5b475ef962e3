"""DETR's set criterion, with hard (matched pairs) or plan-weighted (UOT paper) losses.

Losses come from ``loss_map`` and are combined with ``weight_dict`` (DETR's structure):
``loss_ce`` (cross-entropy with the no-object class weighted ``eos_coef``, or sigmoid focal),
``loss_bbox`` (L1 of normalised cxcywh) and ``loss_giou`` (1 - GIoU), each box term divided by
``num_boxes`` (all-reduced over ranks, at least 1); ``cardinality_error`` and ``class_error``
are logged. With auxiliary decoding losses every decoder layer is matched and scored (keys
suffixed ``_i``).

Every loss is computed one way (:mod:`uotmatch.detection.losses`), weighted by a plan ``P [B, Q,
G]`` and each query's background share ``P_i∅``: ``sum_ij P_ij L(y_hat_i, y_j) + sum_i P_i∅
L_noobj(y_hat_i)``. With ``loss_weighting="plan"`` the plan is the matcher's (the UOT paper's loss
``N_p sum_ij P_ij L``: with our unit prediction masses the rows already sum to 1); with ``"hard"``
it is the 0/1 plan of the decoded pairs, and then this is exactly DETR's loss (tested against DETR's
own formulas). Targets stay padded (:class:`~uotmatch.detection.SetTargets`) from the batch to the
losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from detectors.common.dist import global_count
from uotmatch.detection import PAD_BOX, SetMatcher, SetTargets, box_xyxy_to_cxcywh
from uotmatch.detection.losses import (
    loss_weights,
    plan_box_losses,
    plan_cross_entropy,
    plan_focal_loss,
)

__all__ = ["LOSS_WEIGHTINGS", "SetCriterion", "detr_targets"]

LOSS_WEIGHTINGS = ("hard", "plan")
#: Focal loss parameters (Deformable DETR's).
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def _base_name(key: str) -> str:
    """``loss_ce_3`` -> ``loss_ce`` (DETR's auxiliary-layer keys)."""
    head, _, tail = key.rpartition("_")
    return head if tail.isdigit() else key


def detr_targets(batch: Mapping) -> SetTargets:
    """A collated batch's ground truths as DETR targets, padded: boxes cxcywh normalised by
    each image's unpadded size (``gt_boxes`` are xyxy pixels of it)."""
    h, w = batch["image_sizes"].unbind(-1)  # [B]
    scale = torch.stack([w, h, w, h], -1)[:, None, :].to(batch["gt_boxes"].dtype)  # [B, 1, 4]
    boxes = box_xyxy_to_cxcywh(batch["gt_boxes"]) / scale
    boxes = torch.where(batch["gt_mask"][..., None], boxes, boxes.new_tensor(PAD_BOX))
    return SetTargets(batch["gt_labels"], boxes, batch["gt_mask"])


class SetCriterion(nn.Module):
    """DETR's loss over a matcher's matching.

    Args:
        num_classes: K (the no-object class is K for softmax models).
        matcher: any :class:`~uotmatch.detection.SetMatcher` (Hungarian or UOT); its
            ``solve`` gives the plan.
        weight_dict: ``loss name -> weight`` for the final layer's terms (``loss_ce``,
            ``loss_bbox``, ``loss_giou``); auxiliary layers get the same weights.
        eos_coef: weight of the no-object class in the cross-entropy.
        losses: names in ``loss_map`` to compute.
        loss_weighting: ``"hard"`` (the decoded pairs) or ``"plan"`` (the matcher's plan).
        focal: sigmoid focal classification (the model has K logits, no no-object).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: SetMatcher,
        weight_dict: Mapping[str, float],
        *,
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
        if not isinstance(matcher, SetMatcher):
            raise ValueError(f"matcher must be a SetMatcher, got {type(matcher).__name__}")
        if matcher.focal != focal:
            raise ValueError(
                f"the matcher's focal ({matcher.focal}) and the criterion's ({focal}) must agree"
            )
        self.loss_map = {
            "labels": self.loss_labels,
            "boxes": self.loss_boxes,
            "cardinality": self.loss_cardinality,
        }
        unknown = sorted(set(losses) - set(self.loss_map))
        if unknown:
            raise ValueError(f"losses must be among {sorted(self.loss_map)}, got {unknown}")
        names = {"loss_ce", "loss_bbox", "loss_giou"}
        unknown = sorted(k for k in weight_dict if _base_name(k) not in names)
        if unknown:
            raise ValueError(
                "weight_dict keys must be loss_ce, loss_bbox, loss_giou (with DETR's auxiliary "
                f"suffixes _0, _1, ...): {unknown}"
            )
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, dict(weight_dict)
        self.eos_coef, self.losses = eos_coef, tuple(losses)
        self.loss_weighting, self.focal = loss_weighting, focal
        self.unconverged = 0

    # -- matching ------------------------------------------------------------------------------

    @torch.no_grad()
    def match(self, outputs: Mapping, targets: SetTargets) -> tuple[Tensor, Tensor]:
        """``(plan [B, Q, G], background share [B, Q])``: the matcher's plan, or (``"hard"``)
        the 0/1 plan of its pairs (the plan decoded by the matcher's ``decode``: by default the
        one-to-one matching of most plan mass, which gives every target a query)."""
        m = self.matcher.solve(outputs, targets)
        self.unconverged += int((~m.converged).sum())
        decode = self.matcher.decode if self.loss_weighting == "hard" else None
        plan, background = loss_weights(m, targets.labels.shape[1], decode)
        device = outputs["pred_logits"].device
        return plan.to(device), background.to(device)

    # -- losses: every pair weighted by the plan, a query's background share by itself ------------

    def loss_labels(self, outputs, targets, matching, num_boxes) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]  # [B, Q, K(+1)]
        plan, background = matching
        if self.focal:
            loss = plan_focal_loss(
                logits, targets.labels, plan, background, FOCAL_ALPHA, FOCAL_GAMMA
            )
            out = {"loss_ce": loss / num_boxes}
        else:
            out = {
                "loss_ce": plan_cross_entropy(
                    logits, targets.labels, plan, background, self.eos_coef
                )
            }
        matched = plan.sum() > 0
        if bool(matched):  # logged, as DETR's: the matched queries' top class is wrong
            predicted = logits.argmax(-1)  # [B, Q]
            correct = predicted[..., None] == targets.labels[:, None, :]  # [B, Q, G]
            acc = (plan * correct).sum() / plan.sum()
            out["class_error"] = (100 * (1 - acc)).detach()
        return out

    def loss_boxes(self, outputs, targets, matching, num_boxes) -> dict[str, Tensor]:
        l1, giou = plan_box_losses(outputs["pred_boxes"], targets.boxes, matching[0])
        return {"loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, matching, num_boxes) -> dict[str, Tensor]:
        """Mean absolute error between the number of predicted objects and of targets (logged,
        no gradient)."""
        logits = outputs["pred_logits"]
        if self.focal:
            count = (logits.sigmoid().amax(-1) > 0.5).sum(1)
        else:
            count = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        n = targets.gt_mask.sum(1)
        return {"cardinality_error": (count - n).abs().float().mean()}

    # -- the whole criterion ---------------------------------------------------------------------

    def forward(self, outputs: Mapping, targets) -> dict[str, Tensor]:
        """All loss terms, the weighted total under ``"loss"``. ``targets``: padded
        :class:`~uotmatch.detection.SetTargets` (padded once here when DETR's list of dicts)."""
        device = outputs["pred_logits"].device
        targets = SetTargets.coerce(targets, device)
        self.unconverged = 0  # matchings (an image at one decoder layer) that missed tol
        num_boxes = global_count(targets.gt_mask.sum())
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
        # The final layer's weights serve every decoder layer, unless weight_dict has its own
        # suffixed keys (as DETR's build() writes them).
        base = {k: w for k, w in self.weight_dict.items() if _base_name(k) == k}
        weights = {key + suffix: w for key, w in base.items() for suffix, _ in layers}
        weights.update(self.weight_dict)
        losses["loss"] = sum(weights[key] * v for key, v in losses.items() if key in weights)
        losses["unconverged"] = torch.tensor(float(self.unconverged))  # logged, summed per epoch
        return losses
