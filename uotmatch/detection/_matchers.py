"""DETR-style set matchers: Hungarian (exact one-to-one) and UOT (any regime, soft plan), with
one contract: ``matcher(outputs, targets) -> [(pred_idx, gt_idx), ...]`` as DETR's, and
``matcher.solve(outputs, targets) -> Matching`` with the plan (Hungarian's is 0/1)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

import uotmatch
from uotmatch import _checks
from uotmatch._decode import DECODINGS
from uotmatch._exact import linear_sum_assignment_or_raise
from uotmatch._match import MAX_ITER, TOL
from uotmatch._result import Matching
from uotmatch.detection.costs import DETR_FOCAL_EPS, detr_box_costs, detr_class_cost

__all__ = [
    "GroupedMatcher",
    "HungarianMatcher",
    "SetMatcher",
    "SetTargets",
    "UOTMatcher",
    "set_matching_cost",
]

Pairs = list[tuple[Tensor, Tensor]]
#: The padding box of :class:`SetTargets` (a valid normalised cxcywh box; never matched).
PAD_BOX = (0.5, 0.5, 1.0, 1.0)
#: The targets' class key: DETR's, then Hugging Face transformers'.
_LABEL_KEYS = ("labels", "class_labels")
#: The outputs' logits key: DETR's, then Hugging Face transformers'.
_LOGIT_KEYS = ("pred_logits", "logits")


@dataclass
class SetTargets:
    """DETR targets padded once per batch: ``labels [B, G]`` int64, ``boxes [B, G, 4]``
    (normalised cxcywh, as DETR), ``mask [B, G]`` bool (True on real targets, anywhere).

    The matchers and the bundled criterion take these directly; a DETR list of dicts is
    converted with :meth:`from_list` (what the matchers do when given one).
    """

    labels: Tensor
    boxes: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def from_list(
        cls, targets: Sequence[Mapping[str, Tensor]], device: torch.device | str | None = None
    ) -> SetTargets:
        """DETR's ``[{"labels": [n_i], "boxes": [n_i, 4]}, ...]`` padded to ``G = max n_i``
        (Hugging Face's ``"class_labels"`` is read as ``"labels"``)."""
        if not isinstance(targets, Sequence) or isinstance(targets, str | bytes):
            raise ValueError(f"targets must be a list of dicts, got {type(targets).__name__}")
        sizes, labels_of = [], []
        for i, t in enumerate(targets):
            key = _LABEL_KEYS[0] if isinstance(t, Mapping) and _LABEL_KEYS[0] in t else None
            key = key or next((k for k in _LABEL_KEYS if isinstance(t, Mapping) and k in t), None)
            if key is None or "boxes" not in t:
                raise ValueError(
                    f"targets[{i}] must be a dict with 'labels' (or Hugging Face's "
                    "'class_labels') and 'boxes'"
                )
            labels, boxes = t[key], t["boxes"]
            if not isinstance(labels, Tensor) or not isinstance(boxes, Tensor):
                raise ValueError(f"targets[{i}]['{key}'] and ['boxes'] must be torch tensors")
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(
                    f"targets[{i}]['{key}'] must hold integer class indices, got {labels.dtype}"
                )
            n = len(labels)
            if tuple(boxes.shape) != (n, 4):
                raise ValueError(
                    f"targets[{i}]['boxes'] must be [{n}, 4] to match its {n} labels, "
                    f"got {tuple(boxes.shape)}"
                )
            sizes.append(n)
            labels_of.append(labels)
        B, G = len(targets), max(sizes, default=0)
        labels = torch.zeros(B, G, dtype=torch.long, device=device)
        boxes = torch.tensor(PAD_BOX, device=device).repeat(B, G, 1)
        mask = torch.zeros(B, G, dtype=torch.bool, device=device)
        for i, (t, n) in enumerate(zip(targets, sizes, strict=True)):
            labels[i, :n] = labels_of[i].to(device=device, dtype=torch.long)
            boxes[i, :n] = t["boxes"].to(device=device, dtype=boxes.dtype)
            mask[i, :n] = True
        return cls(labels, boxes, mask)

    @classmethod
    def coerce(cls, targets, device) -> SetTargets:
        """``targets`` as :class:`SetTargets` on ``device`` (a list of dicts is padded)."""
        if isinstance(targets, SetTargets):
            return targets
        return cls.from_list(targets, device)


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
        labels: ``[B, G]`` int64; boxes: ``[B, G, 4]`` normalised cxcywh.
    """
    cls = detr_class_cost(pred_logits, labels, focal, focal_alpha, focal_gamma, focal_eps)
    l1, giou = detr_box_costs(pred_boxes, boxes)
    return cost_bbox * l1 + cost_class * cls - cost_giou * giou


def _check_outputs(outputs: Mapping[str, Tensor], targets: SetTargets, focal: bool):
    key = next((k for k in _LOGIT_KEYS if isinstance(outputs, Mapping) and k in outputs), None)
    if key is None or "pred_boxes" not in outputs:
        raise ValueError(
            "outputs must be a dict with 'pred_logits' (or Hugging Face's 'logits') and "
            "'pred_boxes'"
        )
    logits, boxes = outputs[key], outputs["pred_boxes"]
    if not isinstance(logits, Tensor) or not isinstance(boxes, Tensor):
        raise ValueError(f"outputs['{key}'] and outputs['pred_boxes'] must be tensors")
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            f"outputs['{key}'] must be [B, Q, K] and outputs['pred_boxes'] [B, Q, 4], got "
            f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    if logits.shape[:2] != boxes.shape[:2] or logits.shape[0] != len(targets):
        raise ValueError(
            f"batch and query sizes must agree: {key} {tuple(logits.shape[:2])}, "
            f"pred_boxes {tuple(boxes.shape[:2])}, {len(targets)} targets"
        )
    # Labels index the class logits: [0, K) with focal, [0, K - 1) with softmax (no-object last).
    K = logits.shape[-1] - (0 if focal else 1)
    real = targets.mask
    bad_label = ((targets.labels < 0) | (targets.labels >= K)) & real
    wh = targets.boxes[..., 2:]
    bad_box = ~(torch.isfinite(targets.boxes).all(-1) & (wh >= 0).all(-1)) & real
    ok = torch.stack(
        [
            torch.isfinite(logits).all(),
            torch.isfinite(boxes).all(),
            ~bad_box.any(),
            ~bad_label.any(),
        ]
    ).tolist()
    if not ok[0]:
        raise ValueError(f"outputs['{key}'] must be finite (it holds NaN or inf)")
    if not ok[1]:
        raise ValueError("outputs['pred_boxes'] must be finite (it holds NaN or inf)")
    if not ok[2]:
        b, g = (int(i) for i in torch.nonzero(bad_box)[0])
        raise ValueError(
            f"targets[{b}]['boxes'][{g}] = {targets.boxes[b, g].tolist()}: expected a finite "
            "normalised (cx, cy, w, h) box with w >= 0 and h >= 0"
        )
    if not ok[3]:
        b, g = (int(i) for i in torch.nonzero(bad_label)[0])
        what = "focal: K sigmoid logits" if focal else "softmax: K + 1 logits, no-object last"
        raise ValueError(
            f"targets[{b}]['labels'][{g}] = {int(targets.labels[b, g])} is not a class of "
            f"{key} ([0, {K}) for {what})"
        )
    return logits, boxes


class SetMatcher(nn.Module):
    """The contract of the set matchers (DETR's): ``matcher(outputs, targets)`` returns per
    image a pair ``(pred_idx, gt_idx)`` of int64 CPU tensors sorted by prediction, and
    ``matcher.solve(outputs, targets)`` the :class:`~uotmatch.Matching` they come from (its
    plan ``[B, Q, G (+1)]``; the last column, when there is one, is the background). The pairs
    are the plan decoded by ``decode`` (:meth:`uotmatch.Matching.pairs`).

    ``outputs``: ``{"pred_logits": [B, Q, K(+1)], "pred_boxes": [B, Q, 4]}`` (normalised
    cxcywh; Hugging Face's ``"logits"`` is read as ``"pred_logits"``); ``targets``: DETR's list
    of dicts (``"labels"`` or Hugging Face's ``"class_labels"``, and ``"boxes"``), or
    :class:`SetTargets`.
    """

    def __init__(
        self,
        *,
        cost_class: float,
        cost_bbox: float,
        cost_giou: float,
        focal: bool,
        focal_alpha: float,
        focal_gamma: float,
        focal_eps: float,
        decode: str,
    ):
        super().__init__()
        self.cost_class = _checks.real("cost_class", cost_class, low=0.0)
        self.cost_bbox = _checks.real("cost_bbox", cost_bbox, low=0.0)
        self.cost_giou = _checks.real("cost_giou", cost_giou, low=0.0)
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou cannot all be 0")
        self.focal = _checks.boolean("focal", focal)
        self.focal_alpha = _checks.real("focal_alpha", focal_alpha, low=0.0, high=1.0)
        self.focal_gamma = _checks.real("focal_gamma", focal_gamma, low=0.0)
        self.focal_eps = _checks.real("focal_eps", focal_eps, low=0.0)
        self.decode = _checks.choice("decode", decode, DECODINGS)

    def cost(self, outputs, targets) -> tuple[Tensor, SetTargets]:
        """The batched matching cost ``[B, Q, G]`` and the padded targets."""
        key = next((k for k in _LOGIT_KEYS if isinstance(outputs, Mapping) and k in outputs), None)
        logits = outputs[key] if key else None
        device = logits.device if isinstance(logits, Tensor) else None
        targets = SetTargets.coerce(targets, device)
        logits, boxes = _check_outputs(outputs, targets, self.focal)
        C = set_matching_cost(
            logits,
            boxes,
            targets.labels,
            targets.boxes,
            self.cost_class,
            self.cost_bbox,
            self.cost_giou,
            self.focal,
            self.focal_alpha,
            self.focal_gamma,
            self.focal_eps,
        )
        return C, targets

    @torch.no_grad()
    def solve(self, outputs, targets) -> Matching:
        raise NotImplementedError

    def forward(self, outputs, targets) -> Pairs:
        return self.solve(outputs, targets).pairs(self.decode)


def _solve_sets(C: Tensor, mask: Tensor, eps, tau1, tau2, background_cost, max_iter, tol):
    """:func:`match` on a set-matching cost ``[B, Q, G]``. With a background column and a hard
    target marginal, an image with more targets than queries gets a background *row* of mass
    ``G_i - Q`` (cost 0 to every target): it takes the targets no query can, which DETR's
    Hungarian matching leaves unmatched; the plan returned is the queries' rows only."""
    B, Q, G = C.shape
    kw = dict(gt_mask=mask, max_iter=max_iter, tol=tol)
    if background_cost is None:
        return uotmatch.match(C, eps, tau1, tau2, **kw)
    extra = (mask.sum(1) - Q).clamp_min(0).to(C.dtype)  # [B]
    if not (math.isinf(tau2) and bool(extra.any())):
        return uotmatch.match(C, eps, tau1, tau2, background_cost=background_cost, **kw)
    C = torch.cat([C, C.new_zeros(B, 1, G)], dim=1)  # [B, Q + 1, G]
    a = torch.cat([C.new_ones(B, Q), extra[:, None]], dim=1)
    bg = torch.cat([C.new_full((B, Q), float(background_cost)), C.new_zeros(B, 1)], dim=1)
    m = uotmatch.match(C, eps, tau1, tau2, a=a, background_cost=bg, **kw)
    return m.first_rows(Q)


class HungarianMatcher(SetMatcher):
    """DETR's one-to-one matcher: per image, ``scipy.optimize.linear_sum_assignment``.

    Same constructor keywords and call as DETR's ``HungarianMatcher``; the cost is built for the
    whole batch at once (padded), the assignment per image (scipy has no batched solver). An
    image with more targets than queries leaves the extra targets unmatched, as DETR's.
    :meth:`solve` gives the 0/1 plan ``[B, Q, G + 1]`` (last column: unmatched queries), the
    same as ``UOTMatcher(eps=0)`` gives.

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
        *,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_eps: float = DETR_FOCAL_EPS,
    ):
        super().__init__(
            cost_class=cost_class,
            cost_bbox=cost_bbox,
            cost_giou=cost_giou,
            focal=focal,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            focal_eps=focal_eps,
            decode="argmax",  # the plan is 0/1: every decoding gives its pairs
        )

    @torch.no_grad()
    def solve(self, outputs, targets) -> Matching:
        """The 0/1 plan ``[B, Q, G + 1]``: per image, scipy's assignment on the real targets
        (``uotmatch._exact``'s, which names an infeasible image)."""
        C, targets = self.cost(outputs, targets)
        B, Q, G = C.shape
        plan = np.zeros((B, Q, G + 1), dtype=np.float32)
        plan[:, :, G] = 1.0
        costs, mask = C.cpu().numpy(), targets.mask.cpu().numpy()
        for i in range(B):
            cols = np.flatnonzero(mask[i])
            if cols.size:
                r, c = linear_sum_assignment_or_raise(costs[i][:, cols], item=i)
                plan[i, r, cols[c]] = 1.0
                plan[i, r, G] = 0.0
        plan = torch.from_numpy(plan).to(C.device)
        ones = torch.ones(B, dtype=torch.bool, device=C.device)

        def potentials() -> tuple[Tensor, Tensor]:  # the exact duals, computed when asked for
            m = _solve_sets(C, targets.mask, 0.0, math.inf, math.inf, 0.0, MAX_ITER, TOL)
            return m.f, m.g

        return Matching(
            plan=plan,
            converged=ones,
            error=C.new_zeros(B),
            iterations=torch.zeros(B, dtype=torch.long, device=C.device),
            status=["converged"] * B,
            has_background=True,
            potentials=potentials,
            real=targets.mask,
        )


class UOTMatcher(SetMatcher):
    """Set matching by entropic unbalanced OT, the whole batch in one :func:`uotmatch.match` call.

    ``forward(outputs, targets)`` returns DETR-style pairs, the plan decoded by ``decode``;
    :meth:`solve` returns the full :class:`~uotmatch.Matching`, whose ``plan [B, Q, G + 1]``
    (last column: background, padded columns exactly 0) feeds the UOT paper's plan-weighted
    loss.

    The default decoding, ``"hungarian"``, is the one-to-one matching that carries the most plan
    mass: every target gets a query whenever there are at least as many queries. The raw
    ``"argmax"`` (each query to the target holding the largest share of its row) leaves most
    targets without a query at the start of training, when the queries are near-identical and
    every row's largest share is the background's: a hard loss on its pairs then trains no box
    at all.

    With ``eps=0, tau1=tau2=inf`` it is exactly Hungarian matching (any constant background cost
    leaves the optimum unchanged). An image with more targets than queries leaves the extra
    targets unmatched, as Hungarian matching does (a background row takes them; see
    :func:`_solve_sets`); without a background column that needs a finite ``tau2``.

    Args:
        eps, tau1, tau2: the regime (see :func:`uotmatch.match`).
        background_cost: cost of leaving a prediction unmatched (a float), or ``None`` for no
            background column (then ``tau1 = tau2 = inf`` needs as many predictions as targets).
        normalize_cost: divide each image's cost by its largest absolute value (the UOT paper's
            DETR setting) before solving.
        decode: how the plan becomes pairs (:meth:`uotmatch.Matching.pairs`): ``"hungarian"``
            (default), ``"argmax"``, ``"official"`` or ``"per_target"``.
        cost_class, cost_bbox, cost_giou, focal, focal_alpha, focal_gamma: as DETR
            (``focal``: Deformable-DETR's focal class cost on sigmoid logits, with their
            ``focal_eps = 1e-8`` inside the logs; 0 for the exact form).
        max_iter, tol: solver budget (:func:`uotmatch.match`'s defaults).
    """

    def __init__(
        self,
        *,
        eps: float = 0.05,
        tau1: float = math.inf,
        tau2: float = math.inf,
        background_cost: float | None = 0.0,
        normalize_cost: bool = True,
        decode: str = "hungarian",
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal: bool = False,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        focal_eps: float = DETR_FOCAL_EPS,
        max_iter: int = MAX_ITER,
        tol: float = TOL,
    ):
        super().__init__(
            cost_class=cost_class,
            cost_bbox=cost_bbox,
            cost_giou=cost_giou,
            focal=focal,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            focal_eps=focal_eps,
            decode=decode,
        )
        self.eps = _checks.real("eps", eps, low=0.0)
        self.tau1 = _checks.real("tau1", tau1, low=0.0, allow_inf=True)
        self.tau2 = _checks.real("tau2", tau2, low=0.0, allow_inf=True)
        self.background_cost = _checks.real("background_cost", background_cost, allow_none=True)
        self.normalize_cost = _checks.boolean("normalize_cost", normalize_cost)
        self.max_iter = _checks.integer("max_iter", max_iter, low=1)
        self.tol = _checks.real("tol", tol, low=0.0, low_open=True)
        if self.eps == 0 and (self.tau1, self.tau2) not in [
            (math.inf, 0.0),
            (0.0, math.inf),
            (math.inf, math.inf),
        ]:
            raise ValueError(
                "eps = 0 is defined only for (tau1, tau2) = (inf, 0), (0, inf) or (inf, inf); "
                f"got ({self.tau1:g}, {self.tau2:g}): use eps > 0"
            )

    @torch.no_grad()
    def solve(self, outputs, targets) -> Matching:
        """The batched matching: plan ``[B, Q, G(+1)]`` with ``G = max`` targets per image."""
        C, targets = self.cost(outputs, targets)
        if self.normalize_cost and C.numel():
            scale = C.masked_fill(~targets.mask[:, None, :], 0).abs().amax((1, 2), keepdim=True)
            C = C / scale.clamp_min(torch.finfo(C.dtype).tiny)
        return _solve_sets(
            C,
            targets.mask,
            self.eps,
            self.tau1,
            self.tau2,
            self.background_cost,
            self.max_iter,
            self.tol,
        )


class GroupedMatcher(nn.Module):
    """A set matcher for *group DETR* training (LW-DETR, RF-DETR: ``group_detr`` groups of
    queries, each matched one-to-one to every target): ``GroupedMatcher(matcher)(outputs,
    targets, group_detr)`` splits the ``Q`` queries into ``group_detr`` contiguous groups of
    ``Q / group_detr`` and solves all images' groups as one batch of ``B * group_detr`` items
    with ``matcher``. Per image, the groups' pairs are concatenated in group order, each group's
    query indices offset by its start (as the group-DETR codebases' Hungarian matchers return
    them).

    ``solve(outputs, targets, group_detr)`` gives the :class:`~uotmatch.Matching` of the
    ``B * group_detr`` items (item ``b * group_detr + k``: image ``b``, group ``k``).
    """

    def __init__(self, matcher: SetMatcher):
        super().__init__()
        if not isinstance(matcher, SetMatcher):
            raise ValueError(
                f"matcher must be a uotmatch.detection SetMatcher, got {type(matcher).__name__}"
            )
        self.matcher = matcher

    @staticmethod
    def split(outputs, targets, group_detr: int) -> tuple[dict[str, Tensor], SetTargets]:
        """The outputs ``[B * g, Q / g, ...]`` and targets (each image's repeated ``g`` times)
        of the group problems."""
        group_detr = _checks.integer("group_detr", group_detr, low=1)
        key = next((k for k in _LOGIT_KEYS if isinstance(outputs, Mapping) and k in outputs), None)
        if key is None or "pred_boxes" not in outputs:
            raise ValueError(
                "outputs must be a dict with 'pred_logits' (or Hugging Face's 'logits') and "
                "'pred_boxes'"
            )
        logits, boxes = outputs[key], outputs["pred_boxes"]
        B, Q = logits.shape[:2]
        if Q % group_detr:
            raise ValueError(
                f"group_detr must divide the number of queries: {Q} queries, group_detr = "
                f"{group_detr}"
            )
        q = Q // group_detr
        grouped = {
            "pred_logits": logits.reshape(B * group_detr, q, *logits.shape[2:]),
            "pred_boxes": boxes.reshape(B * group_detr, q, *boxes.shape[2:]),
        }
        t = SetTargets.coerce(targets, logits.device)
        if len(t) != B:
            raise ValueError(f"batch sizes must agree: {B} images of outputs, {len(t)} targets")
        repeated = SetTargets(
            t.labels.repeat_interleave(group_detr, 0),
            t.boxes.repeat_interleave(group_detr, 0),
            t.mask.repeat_interleave(group_detr, 0),
        )
        return grouped, repeated

    @torch.no_grad()
    def solve(self, outputs, targets, group_detr: int = 1) -> Matching:
        return self.matcher.solve(*self.split(outputs, targets, group_detr))

    def forward(self, outputs, targets, group_detr: int = 1) -> Pairs:
        return self.pairs(self.solve(outputs, targets, group_detr), group_detr)

    def pairs(self, m: Matching, group_detr: int) -> Pairs:
        """Per image, the pairs of its groups' items of ``m`` (:meth:`solve`'s), concatenated
        in group order with each group's query indices offset by its start."""
        pairs = m.pairs(self.matcher.decode)
        q = m.plan.shape[1]
        out = []
        for b in range(len(pairs) // group_detr):
            parts = pairs[b * group_detr : (b + 1) * group_detr]
            out.append(
                (
                    torch.cat([pred + k * q for k, (pred, _) in enumerate(parts)]),
                    torch.cat([gt for _, gt in parts]),
                )
            )
        return out
