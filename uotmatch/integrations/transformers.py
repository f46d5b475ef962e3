"""uotmatch's matchers inside Hugging Face ``transformers``' DETR-family losses.

    from transformers import DeformableDetrForObjectDetection
    from uotmatch.integrations.transformers import use_matcher

    model = DeformableDetrForObjectDetection(config)     # or .from_pretrained(...)
    use_matcher(model, "uot", loss="plan")               # the UOT paper's loss
    outputs = model(pixel_values=images, labels=labels)  # outputs.loss: HF's loss, our matching

Supported: ``DetrForObjectDetection``, ``DeformableDetrForObjectDetection``,
``ConditionalDetrForObjectDetection`` (and ``DabDetrForObjectDetection``, which shares its
loss), ``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``, ``DFineForObjectDetection``
and ``LwDetrForObjectDetection`` (group DETR: its ``group_detr`` query groups are matched in one
batched solve).

What changes: the matcher the model's loss builds (its ``HungarianMatcher`` with the config's
costs). What stays: the model, HF's loss code (every term, its weights, auxiliary and
denoising layers, the box normalisation), ``Trainer``, inference. The hook is the model's
``loss_function`` property: the model's stock loss function is re-bound with our matcher in
place of the one it names (a copy of the function with its own globals: no module of
``transformers`` is modified, other models of the same class keep the stock loss).

``loss="hard"`` trains on the pairs decoded from the plan (the matcher's ``decode``: by default
the one-to-one matching of most plan mass, which gives every target a query). ``loss="plan"``
weights every (query, target) loss by the plan and each query's no-object loss by its
background share (the UOT paper's loss; :mod:`uotmatch.detection.losses`): DETR, Deformable,
Conditional and DAB-DETR. RT-DETR, D-FINE and LW-DETR score classes with IoU-aware losses
(varifocal, their own) of matched pairs only; there ``loss="plan"`` is refused.

``from_pretrained`` builds a new model: call :func:`use_matcher` again after it (the hook is
not saved with the weights, and a saved model loads with the stock loss).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
import transformers
from torch import Tensor, nn
from transformers.loss import (
    loss_d_fine,
    loss_deformable_detr,
    loss_for_object_detection,
    loss_lw_detr,
    loss_rt_detr,
)

from uotmatch.detection import GroupedMatcher, SetMatcher, SetTargets, build_matcher
from uotmatch.detection._registry import matcher_or_build
from uotmatch.detection.losses import (
    loss_weights,
    plan_box_losses,
    plan_cross_entropy,
    plan_focal_loss,
)

__all__ = ["LOSSES", "matcher_from_config", "use_matcher"]

#: ``use_matcher``'s ``loss`` values.
LOSSES = ("hard", "plan")


@dataclass(frozen=True)
class _Family:
    """How one of HF's DETR-family loss functions builds its matcher."""

    name: str
    stock: Callable
    matcher: str  # the global the loss function calls to build its matcher (or its criterion)
    criterion: str | None  # the global criterion class, replaced by a plan-weighted subclass
    costs: Callable  # config -> the matcher's cost keywords
    grouped: bool = False
    builds_matcher_in_criterion: bool = False


def _detr_costs(c) -> dict:
    return dict(cost_class=c.class_cost, cost_bbox=c.bbox_cost, cost_giou=c.giou_cost)


def _focal_costs(c) -> dict:  # DeformableDetrHungarianMatcher, LwDetrHungarianMatcher
    return dict(_detr_costs(c), focal=True, focal_alpha=0.25, focal_gamma=2.0)


def _rt_detr_costs(c) -> dict:
    return dict(
        cost_class=c.matcher_class_cost,
        cost_bbox=c.matcher_bbox_cost,
        cost_giou=c.matcher_giou_cost,
        focal=bool(c.use_focal_loss),
        focal_alpha=c.matcher_alpha,
        focal_gamma=c.matcher_gamma,
    )


_FAMILIES = (
    _Family(
        "DETR",
        loss_for_object_detection.ForObjectDetectionLoss,
        "HungarianMatcher",
        "ImageLoss",
        _detr_costs,
    ),
    _Family(
        "Deformable / Conditional / DAB-DETR",
        loss_deformable_detr.DeformableDetrForObjectDetectionLoss,
        "DeformableDetrHungarianMatcher",
        "DeformableDetrImageLoss",
        _focal_costs,
    ),
    _Family(
        "RT-DETR (v1, v2)",
        loss_rt_detr.RTDetrForObjectDetectionLoss,
        "RTDetrLoss",
        None,
        _rt_detr_costs,
        builds_matcher_in_criterion=True,
    ),
    _Family(
        "D-FINE",
        loss_d_fine.DFineForObjectDetectionLoss,
        "DFineLoss",
        None,
        _rt_detr_costs,
        builds_matcher_in_criterion=True,
    ),
    _Family(
        "LW-DETR",
        loss_lw_detr.LwDetrForObjectDetectionLoss,
        "LwDetrHungarianMatcher",
        None,
        _focal_costs,
        grouped=True,
    ),
)


def _family(model: nn.Module) -> _Family:
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(
            f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
        )
    stock = _stock_loss(model)
    for family in _FAMILIES:
        if stock is family.stock:
            return family
    supported = ", ".join(f.name for f in _FAMILIES)
    raise ValueError(
        f"{type(model).__name__} (loss {getattr(stock, '__name__', stock)!r}) is not a "
        f"supported DETR-family detector; supported: {supported}"
    )


def _stock_loss(model: nn.Module) -> Callable:
    """The model's own loss function (under ours, when :func:`use_matcher` ran before)."""
    loss = cast(Callable, model.loss_function)
    return getattr(loss, "uotmatch_stock", loss)


def matcher_from_config(model_or_config, name: str = "uot", **options) -> SetMatcher:
    """The matcher ``name`` (``"uot"`` or ``"hungarian"``) with the model's matching costs.

    Built by :func:`~uotmatch.detection.build_matcher`; the costs are the weights of its config
    (``class_cost``/``bbox_cost``/``giou_cost``, RT-DETR's and D-FINE's ``matcher_*``) and its
    class cost (softmax for DETR; the focal cost with the family's alpha and gamma otherwise).
    ``options`` are the matcher's other keywords (``eps``, ``tau1``, ``tau2``, ``decode``, ...)
    and may override the costs. ``"hungarian"`` with no options reproduces HF's matcher."""
    if isinstance(model_or_config, transformers.PreTrainedModel):
        family, config = _family(model_or_config), model_or_config.config
    else:
        raise ValueError(
            "model_or_config must be a transformers PreTrainedModel (its config alone does not "
            f"say which loss it trains with), got {type(model_or_config).__name__}"
        )
    return build_matcher(name, **{**family.costs(config), **options})


def use_matcher(
    model: nn.Module, matcher: SetMatcher | str = "uot", *, loss: str = "hard", **options
):
    """Make ``model``'s loss use ``matcher``; returns ``model``.

    Args:
        model: a supported ``transformers`` DETR-family detector (module docstring).
        matcher: a :class:`~uotmatch.detection.SetMatcher`, or a name (``"uot"``,
            ``"hungarian"``) built by :func:`matcher_from_config` with the model's costs and
            ``options``.
        loss: ``"hard"`` (HF's loss on the decoded pairs) or ``"plan"`` (plan-weighted; DETR,
            Deformable, Conditional and DAB-DETR).
        **options: the named matcher's options (refused with a matcher instance).

    Calling it again replaces the matcher. ``model.loss_function.matcher`` is the adapter in
    use: ``.inner`` the matcher, ``.calls`` the matchings made (one per decoder layer and
    step), ``.unconverged`` the images among them whose solve missed ``tol``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    family = _family(model)
    matcher = matcher_or_build(
        matcher, options, lambda name, **o: matcher_from_config(model, name, **o)
    )
    if loss == "plan" and family.criterion is None:
        raise ValueError(
            f"loss='plan' is not supported for {family.name}: its classification loss "
            "(varifocal / IoU-aware) is defined on matched pairs only; use loss='hard'"
        )
    names = [family.matcher] + ([family.criterion] if loss == "plan" else [])
    absent = [name for name in names if name not in family.stock.__globals__]
    if absent:
        raise ValueError(
            f"this transformers ({transformers.__version__}) builds {family.name}'s loss "
            f"without {absent[0]!r}: the adapter hooks the names of transformers 5.25 "
            "(from a clone: pip install -e '.[transformers]')"
        )
    adapter = _HFMatcher(matcher, plan=loss == "plan", grouped=family.grouped)
    replace: dict[str, object] = {}
    if family.builds_matcher_in_criterion:
        replace[family.matcher] = _with_matcher(family.stock.__globals__[family.matcher], adapter)
    else:
        replace[family.matcher] = lambda *args, **kwargs: adapter
    if loss == "plan" and family.criterion is not None:  # None with "plan": refused above
        replace[family.criterion] = _plan_criterion(family.stock.__globals__[family.criterion])
    rebound = _rebind(family.stock, replace, adapter)
    model.loss_function = rebound  # type: ignore[assignment]
    return model


def _rebind(fn: Callable, replace: Mapping[str, object], adapter: _HFMatcher) -> Callable:
    """A copy of ``fn`` whose module globals named in ``replace`` are replaced (for it only)."""
    scope = dict(fn.__globals__)
    scope.update(replace)
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    setattr(new, "uotmatch_stock", fn)  # noqa: B010 (a new attribute of a function)
    setattr(new, "matcher", adapter)  # noqa: B010
    return new


def _with_matcher(criterion: type, adapter: _HFMatcher) -> type:
    """``criterion`` with ``adapter`` as its matcher.

    For RT-DETR's and D-FINE's, which build their matcher in ``__init__``."""

    class WithMatcher(criterion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.matcher = adapter

    WithMatcher.__name__ = WithMatcher.__qualname__ = criterion.__name__
    return WithMatcher


class _PlanPairs(list):
    """The decoded pairs (HF's indices, for the terms that read them) with the plan."""

    plan: Tensor
    background: Tensor
    targets: SetTargets


class _HFMatcher(nn.Module):
    """A :class:`~uotmatch.detection.SetMatcher` called as HF's matchers are.

    ``(outputs, targets)`` (LW-DETR: ``(outputs, targets, group_detr)``); returns HF's indices,
    with the plan when the loss is plan-weighted."""

    def __init__(self, matcher: SetMatcher, plan: bool, grouped: bool):
        super().__init__()
        self.inner, self.plan, self.grouped = matcher, plan, grouped
        self.calls = self.unconverged = 0

    @torch.no_grad()
    def forward(self, outputs, targets, group_detr: int = 1):
        self.calls += 1
        outputs = {"pred_logits": outputs["logits"], "pred_boxes": outputs["pred_boxes"]}
        device = outputs["pred_logits"].device
        padded = SetTargets.coerce(targets, device)
        if self.grouped:
            grouped = GroupedMatcher(self.inner)
            m = grouped.solve(outputs, padded, group_detr)
            self.unconverged += int((~cast(Tensor, m.converged)).sum())
            return grouped.pairs(m, group_detr)
        m = self.inner.solve(outputs, padded)
        self.unconverged += int((~cast(Tensor, m.converged)).sum())
        if not self.plan:
            return m.pairs(self.inner.decode)
        pairs = _PlanPairs(m.pairs(self.inner.decode))
        plan, background = loss_weights(m, padded.labels.shape[1])
        pairs.plan, pairs.background = plan.to(device), background.to(device)
        pairs.targets = padded
        return pairs


def _plan_criterion(criterion: type) -> type:
    """HF's ``ImageLoss`` / ``DeformableDetrImageLoss`` with plan-weighted terms.

    ``loss_labels`` and ``loss_boxes`` weighted by the plan: HF's own terms at a 0/1 plan."""

    class PlanWeighted(criterion):
        def loss_labels(self, outputs, targets, indices, num_boxes):
            t, plan, background = indices.targets, indices.plan, indices.background
            logits = outputs["logits"]
            if hasattr(self, "empty_weight"):  # DETR: softmax with no-object weighted eos_coef
                return {
                    "loss_ce": plan_cross_entropy(logits, t.labels, plan, background, self.eos_coef)
                }
            # Deformable-DETR: sigmoid focal (gamma 2), summed and divided by num_boxes
            loss = plan_focal_loss(logits, t.labels, plan, background, self.focal_alpha, 2.0)
            return {"loss_ce": loss / num_boxes}

        def loss_boxes(self, outputs, targets, indices, num_boxes):
            l1, giou = plan_box_losses(outputs["pred_boxes"], indices.targets.boxes, indices.plan)
            return {"loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}

    PlanWeighted.__name__ = PlanWeighted.__qualname__ = f"PlanWeighted{criterion.__name__}"
    return PlanWeighted
