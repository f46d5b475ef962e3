"""uotmatch's matchers inside Roboflow's RF-DETR (``rfdetr``), group-DETR aware.

    from rfdetr.models.lwdetr import build_criterion_from_config
    from uotmatch.integrations.rfdetr import use_matcher

    criterion, postprocess = build_criterion_from_config(model_config, train_config)
    use_matcher(criterion, "uot")              # or any uotmatch SetMatcher
    losses = criterion(model(images), targets)  # RF-DETR's losses, our matching

RF-DETR trains with *group DETR*: its ``group_detr`` (13) groups of queries are each matched
one-to-one to every target. The matcher set here solves all images' groups of a decoder layer in
one batched call (:class:`~uotmatch.detection.GroupedMatcher`) and returns RF-DETR's indices
(per image, the groups' pairs concatenated, query indices offset by their group).

What changes: ``criterion.matcher``. What stays: the model, every loss term of RF-DETR's
``SetCriterion`` (its IoU-aware classification loss, L1 and GIoU, auxiliary and encoder
layers, the box normalisation), inference and checkpoints (the matcher holds no weights). Its
``HungarianMatcher`` costs are read from the criterion: ``matcher_from_criterion(criterion,
"hungarian")`` reproduces RF-DETR's matching (its focal class cost is the exact
``logsigmoid`` form: ``focal_eps=0``). The segmentation and keypoint variants match on mask and
keypoint costs as well, which these matchers do not compute: they are refused.

RF-DETR's own ``RFDETR*.train()`` runs a Lightning module (the ``rfdetr[train]`` extra) that
builds its criterion as ``module.criterion``; :func:`use_matcher` takes that module too. The
tests here run the criterion and a training loop with the core package only (the training
extra is not installed in CI).
"""

from __future__ import annotations

from typing import cast

import torch
from rfdetr.models.criterion import SetCriterion
from torch import nn

from uotmatch.detection import GroupedMatcher, SetMatcher, build_matcher
from uotmatch.detection._registry import matcher_or_build

__all__ = ["RFDETRMatcher", "matcher_from_criterion", "use_matcher"]


def _criterion(target) -> SetCriterion:
    criterion = target if isinstance(target, SetCriterion) else getattr(target, "criterion", None)
    if not isinstance(criterion, SetCriterion):
        raise ValueError(
            "target must be an rfdetr SetCriterion (rfdetr.models.criterion) or an object whose "
            f"criterion is one (RF-DETR's training module), got {type(target).__name__}"
        )
    return criterion


def matcher_from_criterion(target, name: str = "uot", **options) -> SetMatcher:
    """The matcher ``name`` (``"uot"`` or ``"hungarian"``) with RF-DETR's matching costs.

    Those of its criterion (``cost_class``, ``cost_bbox``, ``cost_giou``, ``focal_alpha``; gamma 2,
    exact focal form); ``options`` are the matcher's other keywords and may override them."""
    stock = _criterion(target).matcher
    stock = getattr(stock, "stock", stock)  # under ours: the one it replaced
    costs = dict(
        cost_class=float(stock.cost_class),
        cost_bbox=float(stock.cost_bbox),
        cost_giou=float(stock.cost_giou),
        focal=True,
        focal_alpha=float(stock.focal_alpha),
        focal_gamma=2.0,
        focal_eps=0.0,
    )
    return build_matcher(name, **{**costs, **options})


class RFDETRMatcher(nn.Module):
    """A :class:`~uotmatch.detection.SetMatcher` called as RF-DETR's.

    ``(outputs, targets, group_detr=1)``, all groups in one batched solve. ``calls`` counts the
    matchings (one per layer and step) and ``unconverged`` the (image, group) items whose solve
    missed ``tol``; ``stock`` is the matcher it replaced."""

    def __init__(self, matcher: SetMatcher, stock: nn.Module | None = None):
        super().__init__()
        self.grouped = GroupedMatcher(matcher)
        self.stock = stock
        self.calls = self.unconverged = 0

    @property
    def matcher(self) -> SetMatcher:
        """The uotmatch matcher inside."""
        return self.grouped.matcher

    @torch.no_grad()
    def forward(self, outputs, targets, group_detr: int = 1, **extra):
        """RF-DETR's matcher call: per image, ``(query indices, target indices)``."""
        if extra:
            raise ValueError(f"RFDETRMatcher takes no further inputs, got {sorted(extra)}")
        if "pred_masks" in outputs or "pred_keypoints" in outputs:
            raise ValueError(
                "RF-DETR's segmentation and keypoint variants match on mask and keypoint costs, "
                "which uotmatch's set matchers do not compute"
            )
        self.calls += 1
        m = self.grouped.solve(outputs, targets, group_detr)
        self.unconverged += int((~cast(torch.Tensor, m.converged)).sum())
        return self.grouped.pairs(m, group_detr)


def use_matcher(target, matcher: SetMatcher | str = "uot", **options):
    """Set ``matcher`` as the matcher of RF-DETR's criterion; returns ``target``.

    Args:
        target: RF-DETR's ``SetCriterion``, or its training module (with ``.criterion``).
        matcher: a :class:`~uotmatch.detection.SetMatcher`, or a name (``"uot"``,
            ``"hungarian"``) built by :func:`matcher_from_criterion` with ``options``.
        **options: the named matcher's options (refused with a matcher instance).

    ``criterion.matcher`` is then an :class:`RFDETRMatcher`; calling this again replaces it.
    """
    criterion = _criterion(target)
    matcher = matcher_or_build(
        matcher, options, lambda name, **o: matcher_from_criterion(criterion, name, **o)
    )
    stock = criterion.matcher
    # rfdetr annotates the attribute with its HungarianMatcher; ours takes the same call.
    ours = RFDETRMatcher(matcher, stock=getattr(stock, "stock", stock))
    criterion.matcher = ours  # type: ignore[assignment]
    return target
