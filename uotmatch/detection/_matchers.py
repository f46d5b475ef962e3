"""DETR-style set matchers: Hungarian (exact one-to-one) and UOT (any regime, soft plan).

They keep one contract (:class:`~uotmatch.detection.SetMatcher`): ``matcher(outputs,
targets) -> [(pred_idx, gt_idx), ...]`` as DETR's, and ``matcher.solve(outputs, targets) ->
Matching`` with the plan (Hungarian's is 0/1); :class:`GroupedMatcher` for group DETR."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

import uotmatch
from uotmatch import _checks
from uotmatch._exact import linear_sum_assignment_or_raise
from uotmatch._options import SolverOptions, regime
from uotmatch._result import Matching
from uotmatch.detection._contracts import Pairs, SetMatcher, SetTargets, logits_key
from uotmatch.detection.costs import DETR_FOCAL_EPS

__all__ = ["MATCHER_TOL", "GroupedMatcher", "HungarianMatcher", "UOTMatcher"]

#: :class:`UOTMatcher`'s default solver tolerance: the loosest at which its default decoding
#: (``"hungarian"``) pairs every query as the same cost solved in float64 to 1e-10 does, on the
#: captured DETR corpus and on batches of 100 and 300 queries at random initialisation, with
#: near-identical queries, and with queries near their targets (``benchmarks/bench_corpus.py``;
#: 1e-2 changes pairs). A plan-weighted loss reads the plan to within this relative marginal
#: error.
MATCHER_TOL = 1e-3
#: :class:`UOTMatcher`'s solver options: ``match``'s budget at :data:`MATCHER_TOL`, by scaling
#: sweeps (``method="sweeps"``): a DETR matching is well conditioned (unit masses, a background
#: that takes the rest), and its sweeps cost less than Newton's steps at every batch size
#: (``benchmarks/README.md``); Newton steps still finish any item the sweeps converge slowly.
DEFAULT_SOLVER = SolverOptions(tol=MATCHER_TOL, method="sweeps")


def _solve_sets(C: Tensor, mask: Tensor, eps, tau1, tau2, background_cost, solver):
    """:func:`match` on a set-matching cost ``[B, Q, G]``.

    With a background column and a hard target marginal, an image with more targets than queries
    gets a background *row* of mass ``G_i - Q`` (cost 0 to every target): it takes the targets no
    query can, which DETR's Hungarian matching leaves unmatched; the plan returned is the
    queries' rows only."""
    B, Q, G = C.shape
    kw = dict(gt_mask=mask, solver=solver)
    if background_cost is None:
        return uotmatch.match(C, eps, tau1, tau2, **kw)
    # Targets are counted only where the padded width G allows an image more than Q of them.
    if not (math.isinf(tau2) and B and G > Q and int((counts := mask.sum(1)).max()) > Q):
        return uotmatch.match(C, eps, tau1, tau2, background_cost=background_cost, **kw)
    extra = (counts - Q).clamp_min(0).to(C.dtype)  # [B]
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
        """The 0/1 plan ``[B, Q, G + 1]``.

        Per image, scipy's assignment on the real targets (``uotmatch._exact``'s, which names an
        infeasible image)."""
        C, targets = self.cost(outputs, targets)
        B, Q, G = C.shape
        hard = np.zeros((B, Q, G + 1), dtype=np.float32)
        hard[:, :, G] = 1.0
        for i, (r, c) in enumerate(_assignments(C, targets.gt_mask)):
            hard[i, r, c] = 1.0
            hard[i, r, G] = 0.0
        plan = torch.from_numpy(hard).to(C.device)
        ones = torch.ones(B, dtype=torch.bool, device=C.device)

        def potentials() -> tuple[Tensor, Tensor]:  # the exact duals, computed when asked for
            m = _solve_sets(C, targets.gt_mask, 0.0, math.inf, math.inf, 0.0, SolverOptions())
            return m.f, m.g

        return Matching(
            plan=plan,
            converged=ones,
            error=C.new_zeros(B),
            iterations=torch.zeros(B, dtype=torch.long, device=C.device),
            status=["converged"] * B,
            has_background=True,
            potentials=potentials,
            gt_mask=targets.gt_mask,
        )

    def forward(self, outputs, targets) -> Pairs:
        """DETR's pairs, straight from the assignment (:meth:`solve`'s plan decodes to them)."""
        C, targets = self.cost(outputs, targets)
        return [
            (torch.from_numpy(r), torch.from_numpy(c)) for r, c in _assignments(C, targets.gt_mask)
        ]


def _assignments(C: Tensor, gt_mask: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, scipy's one-to-one assignment on its real targets.

    ``(queries, targets)`` as int64 arrays, sorted by query (``uotmatch._exact``'s assignment,
    which names an infeasible image)."""
    costs, mask = C.cpu().numpy(), gt_mask.cpu().numpy()
    out = []
    for i in range(len(costs)):
        cols = np.flatnonzero(mask[i])
        r, c = linear_sum_assignment_or_raise(costs[i][:, cols], item=i)
        out.append((r.astype(np.int64), cols[c].astype(np.int64)))
    return out


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
        max_iter, tol: solver budget (``max_iter`` as :func:`uotmatch.match`'s; ``tol``
            :data:`MATCHER_TOL`, where the pairs settle: about 3 sweeps fewer than
            ``match``'s 1e-5 on a batch of 100 queries).
        solver: the same as one :class:`uotmatch.SolverOptions` (refused together with
            ``max_iter`` or ``tol``); the matcher's is ``.solver``. The default runs scaling
            sweeps (``method="sweeps"``), the faster at the default eps on normalised costs
            and with finite taus; with eps far below 0.05, or ``normalize_cost=False``,
            ``solver=SolverOptions(tol=MATCHER_TOL)`` (Newton's stages) is up to 1.5x faster
            (``benchmarks/README.md``).
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
        max_iter: int | None = None,
        tol: float | None = None,
        solver: SolverOptions | None = None,
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
        self.eps, self.tau1, self.tau2 = regime(eps, tau1, tau2)
        self.background_cost = _checks.real("background_cost", background_cost, allow_none=True)
        self.normalize_cost = _checks.boolean("normalize_cost", normalize_cost)
        self.solver = SolverOptions.resolve(solver, DEFAULT_SOLVER, max_iter=max_iter, tol=tol)

    @property
    def max_iter(self) -> int:
        """The solver's iteration budget (``solver.max_iter``)."""
        return self.solver.max_iter

    @property
    def tol(self) -> float:
        """The solver's tolerance (``solver.tol``)."""
        return self.solver.tol

    @torch.no_grad()
    def solve(self, outputs, targets) -> Matching:
        """The batched matching: plan ``[B, Q, G(+1)]`` with ``G = max`` targets per image."""
        C, targets = self.cost(outputs, targets)
        return self.solve_cost(C, targets.gt_mask)

    @torch.no_grad()
    def solve_cost(self, C: Tensor, gt_mask: Tensor) -> Matching:
        """:meth:`solve` from the cost ``[B, Q, G]`` (:meth:`cost`'s) and its ``gt_mask [B, G]``.

        E.g. the same cost solved in float64 (``C.double()``), as a reference."""
        if self.normalize_cost and C.numel():
            scale = C.masked_fill(~gt_mask[:, None, :], 0).abs().amax((1, 2), keepdim=True)
            C = C / scale.clamp_min(torch.finfo(C.dtype).tiny)
        return _solve_sets(
            C, gt_mask, self.eps, self.tau1, self.tau2, self.background_cost, self.solver
        )


class GroupedMatcher(nn.Module):
    """A set matcher for *group DETR* training (LW-DETR, RF-DETR).

    There ``group_detr`` groups of queries are each matched one-to-one to every target:
    ``GroupedMatcher(matcher)(outputs,
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
        """The outputs ``[B * g, Q / g, ...]`` and targets of the group problems.

        Each image's targets are repeated ``g`` times."""
        group_detr = _checks.integer("group_detr", group_detr, low=1)
        key = logits_key(outputs)
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
            t.gt_mask.repeat_interleave(group_detr, 0),
        )
        return grouped, repeated

    @torch.no_grad()
    def solve(self, outputs, targets, group_detr: int = 1) -> Matching:
        return self.matcher.solve(*self.split(outputs, targets, group_detr))

    def forward(self, outputs, targets, group_detr: int = 1) -> Pairs:
        return self.pairs(self.solve(outputs, targets, group_detr), group_detr)

    def pairs(self, m: Matching, group_detr: int) -> Pairs:
        """Per image, the pairs of its groups' items of ``m`` (:meth:`solve`'s).

        They are concatenated in group order, each group's query indices offset by its start."""
        pairs = cast(Pairs, m.pairs(self.matcher.decode))  # torch in: tensors
        q = cast(Tensor, m.plan).shape[1]
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
