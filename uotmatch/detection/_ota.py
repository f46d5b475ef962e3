"""OTA (Ge et al., CVPR 2021) and its unbalanced generalisation, batched on :func:`match`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

import uotmatch
from uotmatch import _checks
from uotmatch._decode import decode_rows
from uotmatch._options import SolverOptions
from uotmatch._rows import candidate_rows, gather_rows
from uotmatch.detection._contracts import (
    AssignResult,
    DenseAssigner,
    DenseInputs,
    result_from_index,
    result_from_rows,
)
from uotmatch.detection._geometry import (
    INSIDE_MARGIN,
    ensure_candidate,
    inside_boxes,
    inside_centre,
)
from uotmatch.detection.boxes import box_iou
from uotmatch.detection.costs import focal_terms, iou_cost

__all__ = [
    "ASSIGNER_TOL",
    "CENTER_PRIOR_PENALTY",
    "DECODINGS",
    "OTAAssigner",
    "UOTAssigner",
    "decode_plan",
]

#: Added to the cost of a pair outside the centre prior (the official OTA code's 1e6).
CENTER_PRIOR_PENALTY = 1e6
#: How a plan becomes one ground truth (or background) per anchor: see :func:`decode_plan`.
DECODINGS = ("official", "argmax")


def decode_plan(plan: Tensor, decode: str, background_scale: Tensor | None = None) -> Tensor:
    """Per anchor, the index of its ground truth (-1 for background), from a plan.

    ``plan [B, A, G + 1]`` has the background last: :func:`uotmatch._decode.decode_rows`.

    ``"argmax"``: the supplier sending the anchor the largest share (the paper's wording).
    ``"official"``: each supplier's plan column is first divided by its largest entry over the
    anchors, then the argmax, as the official OTA code (``pi / pi.max(dim=1)``): every ground
    truth's best anchor scores 1, so each ground truth keeps at least one positive unless
    another takes that same anchor, where the raw argmax can leave a ground truth whose unit is
    spread thin over many anchors with none. ``background_scale [B]`` overrides the background
    column's largest entry (anchors solved elsewhere).
    """
    real = torch.ones(plan.shape[0], plan.shape[-1] - 1, dtype=torch.bool, device=plan.device)
    return decode_rows(
        plan, real, True, _checks.choice("decode", decode, DECODINGS), background_scale
    )


#: The OT assigners' default solver tolerance: the loosest at which their decisions on the
#: corpus of real training problems (``benchmarks/bench_corpus.py``) are those of a float64
#: solve to 1e-10, as at 1e-5 (``uotmatch.match``'s default, which it saves two Newton steps of).
ASSIGNER_TOL = 1e-4
#: The OT assigners' solver options: ``match``'s budget at :data:`ASSIGNER_TOL`.
DEFAULT_SOLVER = SolverOptions(tol=ASSIGNER_TOL)
#: Flow units per unit of supply in :func:`feasible_supplies` (its integer max-flow's grain).
FLOW_GRAIN = 2**16


def feasible_supplies(k: Tensor, candidate: Tensor) -> Tensor:
    """The largest supplies ``k' <= k`` ``[B, G]`` that the candidate anchors can carry.

    ``candidate [B, A, G]``, each anchor taking one unit: a maximum flow from the ground truths
    through the candidate pairs (``scipy.sparse.csgraph.maximum_flow``, one graph for the
    batch, to ``1 / FLOW_GRAIN``), computed only for the images where some anchor is a
    candidate of several ground truths and the even split of the shared anchors does not serve
    every supply (elsewhere ``k`` is feasible as it is)."""
    # The images where some anchor is shared and the proportional split (each anchor's unit
    # divided evenly among its candidate ground truths, a feasible flow) does not serve every
    # supply: only those need the maximum flow.
    degree = candidate.sum(-1, keepdim=True)  # [B, A, 1]
    even = (candidate / degree.clamp_min(1)).sum(1)  # [B, G]
    shared = (degree.squeeze(-1) > 1).any(-1) & (even < k).any(-1)  # [B]
    if not bool(shared.any()):
        return k
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    images = torch.nonzero(shared).flatten()
    cand = candidate[images].cpu()  # [b, A, G]
    kk = k[images].double().cpu()  # [b, G]
    b, A, G = cand.shape
    n = 2 + b * G + b * A  # source, ground truths, anchors, sink
    gt = 1 + torch.arange(b * G).view(b, G)
    anchor = 1 + b * G + torch.arange(b * A).view(b, A)
    pair = torch.nonzero(cand)  # [E, 3]: image, anchor, gt
    grain = FLOW_GRAIN
    rows = torch.cat([torch.zeros(b * G, dtype=torch.long), gt[pair[:, 0], pair[:, 2]]])
    cols = torch.cat([gt.flatten(), anchor[pair[:, 0], pair[:, 1]]])
    caps = torch.cat([(kk.flatten() * grain).floor().long(), torch.full((len(pair),), grain)])
    used = torch.nonzero(cand.any(-1))  # anchors with a candidate pair
    rows = torch.cat([rows, anchor[used[:, 0], used[:, 1]]])
    cols = torch.cat([cols, torch.full((len(used),), n - 1)])
    caps = torch.cat([caps, torch.full((len(used),), grain)])
    graph = csr_matrix((caps.numpy().astype("int32"), (rows.numpy(), cols.numpy())), shape=(n, n))
    flow = maximum_flow(graph, 0, n - 1).flow  # csr, the flow on every edge
    served = torch.from_numpy(flow[0, 1 : 1 + b * G].toarray().ravel().astype("float64"))
    out = k.clone()
    out[images] = torch.minimum(kk, served.view(b, G) / grain).to(k.dtype).to(k.device)
    return out


class UOTAssigner(DenseAssigner):
    """Label assignment of dense detectors by entropic unbalanced OT, OTA's costs and supplies.

    Anchors are the rows (demand 1 each), ground truths the columns (supply ``k``), background
    the last column (supply ``max(A - sum k, 0)``, cost = focal loss against "no object"):

    * cost = ``cls_weight * focal(logits, one-hot gt class) + iou_weight * -log IoU(pred, gt)``
      (the official code's ``-log max(IoU, float32 eps)``) ``+ CENTER_PRIOR_PENALTY`` unless
      the anchor is inside the box (``INSIDE_MARGIN``) and within ``radius * stride`` of its
      centre (a ground truth too small to hold any anchor point keeps its nearest one);
    * supplies: fixed ``k``, or dynamic ``k = max(1, floor(sum of the top candidate_topk
      IoUs))`` over the candidates; if ``sum k`` exceeds the number of candidate anchors the
      ks are scaled down to it (so the problem stays feasible without penalty pairs);
    * each anchor goes to one supplier by ``decode`` (:func:`decode_plan`).

    Uses ``points``, ``strides``, ``cls_logits``, ``pred_boxes`` and the ground truths.

    Args:
        eps, tau1, tau2: the UOT regime (:func:`uotmatch.match`); OTA is ``tau1 = tau2 = inf``.
        radius: centre-prior radius, in strides (OTA: 2.5).
        candidate_topk: top IoUs summed for the dynamic k (OTA: 20).
        k: a fixed supply per ground truth instead of the dynamic one (None: dynamic).
        cls_weight, iou_weight: cost weights (OTA's alpha is ``iou_weight``, 1.5).
        focal_alpha, focal_gamma: of the focal classification cost (0.25, 2).
        decode: ``"official"`` (default: each ground truth keeps a positive, as the official
            OTA code) or ``"argmax"``; see :func:`decode_plan`.
        candidates_only: solve over the candidate anchors only (the others can only take
            background): None when that is exact (``tau1 = tau2 = inf``), True (refused for
            finite taus, where the background's KL term couples every anchor), or False.
        max_iter, tol: solver budget (``max_iter`` as :func:`uotmatch.match`'s; ``tol``
            :data:`ASSIGNER_TOL`, where the decisions settle; the official OTA code runs a fixed
            50 iterations).
        solver: the same as one :class:`uotmatch.SolverOptions` (refused together with
            ``max_iter`` or ``tol``); the assigner's is ``.solver``.
    """

    uses = ("points", "strides", "cls_logits", "pred_boxes", "gt_boxes", "gt_labels", "gt_mask")

    def __init__(
        self,
        *,
        eps: float = 0.1,
        tau1: float = math.inf,
        tau2: float = math.inf,
        radius: float = 2.5,
        candidate_topk: int = 20,
        k: float | None = None,
        cls_weight: float = 1.0,
        iou_weight: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        decode: str = "official",
        candidates_only: bool | None = None,
        max_iter: int | None = None,
        tol: float | None = None,
        solver: SolverOptions | None = None,
    ):
        self.eps = _checks.real("eps", eps, low=0.0, low_open=True)
        self.tau1 = _checks.real("tau1", tau1, low=0.0, allow_inf=True)
        self.tau2 = _checks.real("tau2", tau2, low=0.0, allow_inf=True)
        self.radius = _checks.real("radius", radius, low=0.0, low_open=True)
        self.candidate_topk = _checks.integer("candidate_topk", candidate_topk, low=1)
        self.k = _checks.real("k", k, low=0.0, low_open=True, allow_none=True)
        self.cls_weight = _checks.real("cls_weight", cls_weight, low=0.0)
        self.iou_weight = _checks.real("iou_weight", iou_weight, low=0.0)
        self.focal_alpha = _checks.real("focal_alpha", focal_alpha, low=0.0, high=1.0)
        self.focal_gamma = _checks.real("focal_gamma", focal_gamma, low=0.0)
        self.decode = _checks.choice("decode", decode, DECODINGS)
        balanced = math.isinf(self.tau1) and math.isinf(self.tau2)
        candidates_only = _checks.boolean("candidates_only", candidates_only, allow_none=True)
        if candidates_only and not balanced:
            raise ValueError(
                "candidates_only=True is exact only for tau1 = tau2 = inf (with a finite tau "
                "the background's KL term couples every anchor); got tau1 = "
                f"{self.tau1:g}, tau2 = {self.tau2:g}: pass candidates_only=None or False"
            )
        self.candidates_only = balanced if candidates_only is None else candidates_only
        self.solver = SolverOptions.resolve(solver, DEFAULT_SOLVER, max_iter=max_iter, tol=tol)

    @property
    def max_iter(self) -> int:
        """The solver's iteration budget (``solver.max_iter``)."""
        return self.solver.max_iter

    @property
    def tol(self) -> float:
        """The solver's tolerance (``solver.tol``)."""
        return self.solver.tol

    def candidates(self, points: Tensor, strides: Tensor, gt_boxes: Tensor, gt_mask: Tensor):
        """``[B, A, G]`` bool centre prior.

        Inside the box and within ``radius * stride`` of its centre (a real ground truth holding
        no point keeps its nearest one)."""
        # Inside the centre square clipped to the box, and inside the box by INSIDE_MARGIN:
        # the box part of the clip is implied by the margin, so the square is not clipped.
        candidate = inside_boxes(points, gt_boxes, INSIDE_MARGIN) & inside_centre(
            points, strides, gt_boxes, self.radius, clip=False
        )
        return ensure_candidate(candidate & gt_mask[:, None], points, gt_boxes, gt_mask)

    def pair_costs(self, cls_logits, pred_boxes, gt_boxes, gt_labels, candidate):
        """For anchors ``[B, R, ...]``: ``cost [B, R, G]``, ``background [B, R]``, ``ious``."""
        cls, background = focal_terms(cls_logits, gt_labels, self.focal_alpha, self.focal_gamma)
        ious = box_iou(pred_boxes, gt_boxes)  # [B, R, G]
        cost = self.cls_weight * cls + self.iou_weight * iou_cost(ious, floor=True)
        cost = cost + CENTER_PRIOR_PENALTY * ~candidate
        return cost.float(), self.cls_weight * background.float(), ious

    def costs(
        self,
        *,
        points: Tensor,
        strides: Tensor,
        cls_logits: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The dense problem over all anchors (the assigner's inputs).

        ``cost [B, A, G]``, ``background [B, A]``, ``ious [B, A, G]`` and the centre prior
        ``candidate [B, A, G]``."""
        x = DenseInputs.check(points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask)
        candidate = self.candidates(x.points, x.strides, x.gt_boxes, x.gt_mask)
        cost, background, ious = self.pair_costs(
            x.cls_logits, x.pred_boxes, x.gt_boxes, x.gt_labels, candidate
        )
        return cost, background, ious, candidate

    def supplies(self, ious: Tensor, candidate: Tensor, gt_mask: Tensor) -> Tensor:
        """``[B, G]`` positive labels each ground truth supplies (0 on padding).

        Balanced (OTA): at most what the candidate anchors can carry. If ``sum k`` exceeds the
        number of candidate anchors the ks are scaled down to it, and where candidates are
        shared so that some ground truths still cannot all be served (two small objects
        whose only candidate is the same anchor), each supply is cut to its share of a maximum
        flow through the centre-prior graph (:func:`feasible_supplies`): the problem over the
        candidates then has a plan, and the solver converges. (The official OTA code keeps
        such supplies, so its 1e6 penalty pairs would have to carry the rest; its fixed 50
        iterations never get there.)
        """
        B, A, G = ious.shape
        if self.k is not None:
            k = torch.full((B, G), float(self.k), device=ious.device)
        else:
            q = min(self.candidate_topk, A)
            top = (ious * candidate).topk(q, dim=1).values  # [B, q, G]
            k = top.sum(1).floor().clamp_min(1.0)
        k = torch.where(gt_mask, k, 0.0)
        capacity = candidate.any(-1).sum(1, keepdim=True).float()  # [B, 1] candidate anchors
        total = k.sum(1, keepdim=True)
        k = torch.where(total > capacity, k * capacity / total.clamp_min(1.0), k)
        if math.isinf(self.tau1) and math.isinf(self.tau2):
            k = feasible_supplies(k, candidate)
        return k

    def _solve(self, cost, background, k, gt_mask, a=None):
        return uotmatch.match(
            cost,
            self.eps,
            self.tau1,
            self.tau2,
            a=a,
            b=k,
            gt_mask=gt_mask,
            background_cost=background,
            solver=self.solver,
        )

    def _assign(self, x: DenseInputs) -> AssignResult:
        if self.candidates_only:
            return self._assign_candidates(x)
        candidate = self.candidates(x.points, x.strides, x.gt_boxes, x.gt_mask)
        cost, background, ious = self.pair_costs(
            x.cls_logits, x.pred_boxes, x.gt_boxes, x.gt_labels, candidate
        )
        k = self.supplies(ious, candidate, x.gt_mask)
        m = self._solve(cost, background, k, x.gt_mask)
        gt_index = decode_plan(m.plan, self.decode)
        return result_from_index(gt_index, x.gt_labels, x.gt_boxes, ious, converged=m.converged)

    def _assign_candidates(self, x: DenseInputs) -> AssignResult:
        """Balanced OT over the candidate anchors only; the rest take background.

        Costs are computed for the candidates alone (a few percent of the anchors)."""
        candidate = self.candidates(x.points, x.strides, x.gt_boxes, x.gt_mask)
        B, A, G = candidate.shape
        idx, real = candidate_rows(candidate.any(-1))  # [B, L]

        def rows_of(t: Tensor) -> Tensor:  # [B, A, D] -> [B, L, D]
            return gather_rows(t, idx)

        sub_candidate = rows_of(candidate) & real[..., None]
        cost, background, ious = self.pair_costs(
            rows_of(x.cls_logits), rows_of(x.pred_boxes), x.gt_boxes, x.gt_labels, sub_candidate
        )
        k = self.supplies(ious, sub_candidate, x.gt_mask)
        m = self._solve(cost, background, k, x.gt_mask, a=real.float())
        # The anchors left out send their unit to the background: its column's largest entry
        # is 1 wherever some anchor was left out.
        left_out = (real.sum(1) < A).float()  # [B]
        sub_index = torch.where(real, decode_plan(m.plan, self.decode, left_out), -1)  # [B, L]
        return result_from_rows(
            sub_index, idx, A, ious, x.gt_labels, x.gt_boxes, converged=m.converged
        )


class OTAAssigner(UOTAssigner):
    """OTA: balanced optimal transport assignment (Ge et al., CVPR 2021, Algorithm 1).

    :class:`UOTAssigner` with ``tau1 = tau2 = inf``: every anchor receives exactly one unit
    (positive from a ground truth, or negative from background), every ground truth supplies its
    dynamic ``k``. Defaults as the paper: eps 0.1, centre-prior radius 2.5, candidate_topk 20,
    ``iou_weight`` (the paper's alpha) 1.5, and the official code's decoding. Only candidate
    anchors enter the solve (the same plan as the dense problem, to float precision).

    Example:
        >>> import torch
        >>> from uotmatch.detection import OTAAssigner, anchor_points
        >>> points, strides = anchor_points((64, 64))  # [86, 2], [86]
        >>> result = OTAAssigner()(
        ...     points=points,
        ...     strides=strides,
        ...     cls_logits=torch.full((1, 86, 3), -4.6),  # [B, A, K]
        ...     pred_boxes=torch.cat([points - 16, points + 16], 1)[None],  # [B, A, 4]
        ...     gt_boxes=torch.tensor([[[8.0, 8.0, 40.0, 40.0]]]),  # [B, G, 4]
        ...     gt_labels=torch.tensor([[2]]),  # [B, G]
        ... )
        >>> result.num_fg, result.labels[result.fg_mask]
        (tensor([5]), tensor([2, 2, 2, 2, 2]))
    """

    def __init__(
        self,
        *,
        eps: float = 0.1,
        radius: float = 2.5,
        candidate_topk: int = 20,
        k: float | None = None,
        cls_weight: float = 1.0,
        iou_weight: float = 1.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        decode: str = "official",
        candidates_only: bool | None = None,
        max_iter: int | None = None,
        tol: float | None = None,
        solver: SolverOptions | None = None,
    ):
        super().__init__(
            eps=eps,
            radius=radius,
            candidate_topk=candidate_topk,
            k=k,
            cls_weight=cls_weight,
            iou_weight=iou_weight,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            decode=decode,
            candidates_only=candidates_only,
            max_iter=max_iter,
            tol=tol,
            solver=solver,
        )
