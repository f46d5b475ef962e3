"""The front door: validate, choose a path, solve, wrap the result.

The problem is validated into a :class:`~uotmatch._problem.Problem`; the paths are empty, exact,
screened and dense."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from uotmatch import _exact, _newton, _screen
from uotmatch._options import MAX_ITER, TOL, SolverOptions
from uotmatch._precision import PRECISION, cast_plan, overflow_error
from uotmatch._problem import Problem, full_cost
from uotmatch._result import STATUSES, Array, Matching
from uotmatch._solver import solve
from uotmatch._state import Marginal, SolveOutput

__all__ = ["MAX_ITER", "TOL", "match"]

INF = math.inf
#: A budget below this is named as the cause when items run out of it.
SMALL_BUDGET = 50
#: Solves of at most this many cost entries run in inference mode (:func:`_run`).
INFERENCE_SIZE = 2**20


def match(
    cost: Array,
    eps: float,
    tau1: float = INF,
    tau2: float = INF,
    *,
    a: Array | None = None,
    b: Array | None = None,
    gt_mask: Array | None = None,
    background_cost: float | Array | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    screen: bool | None = None,
    solver: SolverOptions | None = None,
) -> Matching:
    r"""Match predictions (rows) to ground truths (columns) by entropic unbalanced OT.

    Per batch item the plan is the minimiser over :math:`P \ge 0` of

    .. math::
        \langle C, P\rangle + \varepsilon \sum_{ij} P_{ij}(\log P_{ij} - 1)
        + \tau_1 \mathrm{KL}(P\mathbf{1} \,|\, a) + \tau_2 \mathrm{KL}(P^\top\mathbf{1} \,|\, b),
        \qquad \mathrm{KL}(x|y) = \textstyle\sum x \log(x/y) - x + y.

    ``tau = inf`` makes that marginal a hard constraint and ``tau = 0`` drops it. For eps > 0 this
    is POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=eps, reg_m=(tau1, tau2),
    reg_type='entropy')`` and OTT's ``tau_a = tau1 / (tau1 + eps)``,
    ``tau_b = tau2 / (tau2 + eps)``.
    The UOT paper's masses ``1 / N_p`` instead of our unit masses give the same plan divided by
    ``N_p``: a uniform cost shift of ``-eps * log N_p``.

    The limits (all with eps = 0, computed exactly):

    ========================  ===============================================================
    ``tau1=inf, tau2=0``      each prediction to its cheapest column (nearest ground truth;
                              with a background column its cost acts as a threshold)
    ``tau1=0, tau2=inf``      each ground truth to its cheapest prediction
    ``tau1=inf, tau2=inf``    balanced OT: Hungarian one-to-one for unit masses (OTA with k>1)
    ========================  ===============================================================

    Args:
        cost: ``[M, N]`` or ``[B, M, N]`` costs; rows are predictions, columns ground truths. A
            torch tensor (any device; float16/bfloat16/float32/float64, half precision computed
            in float32), a numpy array or nested lists. ``+inf`` marks a forbidden pair.
        eps: entropic regularisation, ``>= 0`` (0 only for the three limits above).
        tau1: prediction-marginal penalty in ``[0, inf]``.
        tau2: ground-truth-marginal penalty in ``[0, inf]``.
        a: prediction masses ``[M]`` or ``[B, M]``, default 1 each.
        b: ground-truth masses ``[N]`` or ``[B, N]``, default 1 each.
        gt_mask: bool ``[N]`` or ``[B, N]``, True on the real columns of a padded batch
            (anywhere, not only a prefix). Masked columns get exactly zero plan; each item
            solves as if they were absent.
        background_cost: ``None``, a float, or ``[M]`` / ``[B, M]``. Appends a background column
            ∅ (last) with this cost and mass ``max(sum a - sum b, 0)`` over the real columns.
        max_iter: iterations at most (eps-scaling stages included); default
            1000.
        tol: an item stops once its ``marginal_error`` (relative L1) is at most this; default
            1e-5.
        screen: background screening (below): None uses it when it applies and pays (1024
            predictions or more), True whenever it applies, False never. True is refused
            (``ValueError``) where it cannot apply.
        solver: the three options above as one :class:`SolverOptions` value (what the
            assigners and matchers pass); refused together with any of them.

    Returns:
        A :class:`Matching`: the plan in the caller's container, device and dtype, per-item
        ``converged``, ``marginal_error``, ``iterations`` and ``status``, potentials ``f``,
        ``g``, and the decoders ``gt_index()`` and ``pairs()``.

    Raises:
        ValueError: on malformed input (the message names the argument); on problems no plan
            can satisfy (``tau1 = tau2 = inf`` with unequal total masses, a prediction or
            ground truth with mass but no allowed partner under a hard marginal); on eps = 0
            outside the three limits; and when the optimal plan's entries exceed the dtype's
            range (e.g. very negative costs with small taus: its mass is about
            ``exp(-C / (eps + tau1 + tau2))``).

    Gradients: when ``cost`` (or ``a``, ``b``, ``background_cost``) requires grad, the plan is
    differentiated through the iterations (memory grows with iterations x B x M x N; the eps = 0
    limits are piecewise constant and come back detached). Otherwise no graph is kept.

    Speed: a balanced problem (``tau1 = tau2 = inf``) with a background column and at least
    1024 predictions is *screened* first: predictions whose every ground-truth cost exceeds
    their background cost by more than a bound on the optimal prices (plus a margin of the
    dtype's precision) provably send their whole mass to the background, so they leave the
    solve and their plan rows are written directly. The result is the dense solve's to the
    dtype's precision; for a detection batch (most anchors far from every object) it is several
    times faster. Not used when gradients are needed.

    Precision: any cost scale works. Small eps is reached by eps-scaling from the estimated
    range of the dual potentials, and float32 problems whose costs are too large for float32 to
    resolve eps (``|C| / eps`` above about 8e3), or whose plan could overflow float32, are solved
    in float64 (the plan comes back in the caller's dtype).

    Troubleshooting: ``converged`` False and ``status`` tell why. ``"max_iter"``: the budget ran
    out; nearly infeasible balanced problems and very small eps against the cost differences
    need more iterations (or a finite tau, which also converges faster). ``"precision"``: eps
    is below what even float64 resolves at these costs (``|C| / eps`` above about 4e12; a
    warning says so too): scale the costs down or raise eps.

    Example:
        >>> import torch, uotmatch
        >>> cost = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.6]])
        >>> m = uotmatch.match(cost, eps=0.0, background_cost=0.4)  # Hungarian + background
        >>> m.gt_index()
        tensor([ 0,  1, -1])
        >>> m.plan
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    p = Problem.build(
        cost,
        eps,
        tau1,
        tau2,
        a=a,
        b=b,
        gt_mask=gt_mask,
        background_cost=background_cost,
        solver=SolverOptions.resolve(solver, max_iter=max_iter, tol=tol, screen=screen),
    )
    B, M, N = p.cost.shape
    if M * (N + int(p.has_background)) == 0:
        solution = _solve_empty(p)
    elif p.eps == 0:
        solution = _solve_exact(p)
    elif (limit := p.as_balanced_limit(PRECISION)) is not None:
        solution = _solve_balanced_limit(*limit)
    else:
        solution = _solve_iterative(p)
    return _wrap(p, solution)


def _solve_iterative(p: Problem) -> _Solution:
    screened = _screen_rows(p)
    return _solve_dense(p) if screened is None else _solve_screened(p, screened)


def _solve_balanced_limit(limit: Problem, shift: Tensor) -> _Solution:
    """Both taus beyond what the dtype resolves against eps.

    The balanced problem of :meth:`Problem.as_balanced_limit`, its potentials translated back."""
    limit._check_feasible()
    s = _solve_iterative(limit)
    potentials = s.potentials

    def translated() -> tuple[Tensor, Tensor]:
        f, g = potentials()
        return f + shift[:, None], g - shift[:, None]

    s.potentials = translated
    return s


@dataclass
class _Solution:
    """What every path returns, as ``[B, ...]`` tensors in the problem's working dtype."""

    plan: Tensor  # [B, M, N(+1)]
    potentials: Callable[[], tuple[Tensor, Tensor]]
    error: Tensor  # [B]
    iterations: Tensor  # [B] int64
    converged: Tensor  # [B] bool
    imprecise: Tensor  # [B] bool
    finite: Tensor  # [B] bool: a finite plan


def _solve_empty(p: Problem) -> _Solution:
    """Nothing to transport: a zero plan (feasibility was checked)."""
    B, M, _ = p.cost.shape
    n_cols = p.col_mass.shape[1]
    plan = p.cost.new_zeros(B, M, n_cols)
    fg = (p.cost.new_zeros(B, M), p.cost.new_zeros(B, n_cols))
    zeros = torch.zeros(B, dtype=torch.bool, device=p.cost.device)
    return _Solution(plan, lambda: fg, p.cost.new_zeros(B), zeros.long(), ~zeros, zeros, ~zeros)


def _solve_exact(p: Problem) -> _Solution:
    full = p.full_cost(transpose=False)
    p.check_columns(full, full.amin(-2))
    C, a, b = full.detach(), p.a.detach(), p.col_mass.detach()
    tau1, tau2 = p.tau1, p.tau2
    if (tau1, tau2) == (INF, 0.0):
        plan, fg = _exact.nearest_column(C, a)
        potentials = lambda: fg  # noqa: E731
    elif (tau1, tau2) == (0.0, INF):
        plan, fg = _exact.nearest_row(C, b)
        potentials = lambda: fg  # noqa: E731
    elif (tau1, tau2) == (INF, INF):
        plan, potentials = _exact.balanced(C, a, b, p.has_background)
    else:  # refused when the problem was built (uotmatch._options.regime)
        raise AssertionError(f"eps = 0 with (tau1, tau2) = ({tau1}, {tau2})")
    B = plan.shape[0]
    zeros = torch.zeros(B, dtype=torch.bool, device=plan.device)
    return _Solution(plan, potentials, p.cost.new_zeros(B), zeros.long(), ~zeros, zeros, ~zeros)


def _screen_rows(p: Problem) -> _screen.Screen | None:
    """Background screening, when it applies and is asked for or pays.

    It applies to balanced problems with a background column and no gradients; it is asked for
    with ``screen=True`` and pays (``screen=None``) from ``_screen.MIN_ROWS`` rows."""
    applies = p.balanced and p.has_background and not p.grad
    if p.screen is False or not applies:
        return None
    if p.screen is None and p.cost.shape[1] < _screen.MIN_ROWS:
        return None
    # Its price bound is finite only if every ground truth with mass has a finite cost.
    max_kept = 1.0 if p.screen else _screen.MAX_KEPT_FRACTION
    assert p.background is not None  # applies: a background column
    return _screen.screen(p.cost, p.real_min, p.background, p.a, p.b, p.eps, max_kept)


def _run(p: Problem, cost: Tensor, rows: Marginal, cols: Marginal, transpose: bool, **kw):
    """The solver on ``cost``, back in the problem's orientation and dtype.

    ``cost`` is ``[B, M, N]``, or its transpose (then ``rows`` and ``cols`` swap places in the
    call); returns the output and ``(plan, f, g)``."""
    first, second = (cols, rows) if transpose else (rows, cols)
    kw["newton_first"] = p.method == "auto"
    if p.grad:
        with torch.enable_grad():
            out = solve(cost, first, second, eps=p.eps, max_iter=p.max_iter, tol=p.tol, **kw)
    elif cost.numel() <= INFERENCE_SIZE:
        # Small problems are overhead-bound: inference mode trims every operation's bookkeeping
        # (about 10% of the solve); the outputs are copied out (a negligible pass at this size)
        # so that they can enter autograd and in-place operations afterwards.
        with torch.inference_mode():
            out = solve(cost, first, second, eps=p.eps, max_iter=p.max_iter, tol=p.tol, **kw)
        cast = out.plan.dtype != p.cost.dtype  # then the plan, f, g and error are copied below
        out = SolveOutput(
            **{
                k.name: getattr(out, k.name)
                if cast and k.name in ("plan", "f", "g", "error")
                else getattr(out, k.name).clone()
                for k in fields(out)
            }
        )
    else:
        with torch.no_grad():
            out = solve(cost, first, second, eps=p.eps, max_iter=p.max_iter, tol=p.tol, **kw)
    plan, f, g = (out.plan.mT, out.g, out.f) if transpose else (out.plan, out.f, out.g)
    dtype = p.cost.dtype  # a solve moved to float64 for precision comes back in its dtype
    if plan.dtype != dtype:
        plan = cast_plan(plan, dtype, bounded=p.balanced)
        f, g, out.error = f.to(dtype), g.to(dtype), out.error.to(dtype)
    return out, plan, f, g


def _solve_dense(p: Problem) -> _Solution:
    B, M, N = p.cost.shape
    # The solver's fast reductions run along the last dimension: tall problems (M > N, the rule
    # in detection) are solved transposed, [B, N(+1), M]. The objective is symmetric in
    # (rows, a, tau1) <-> (columns, b, tau2), so the plan is the same.
    transpose = M > N + int(p.has_background)
    work = p.full_cost(transpose)
    full = work.mT if transpose else work  # [B, M, N(+1)] view
    col_min = work.amin(-1) if transpose else work.amin(-2)  # fast along the last dimension
    p.check_columns(full, col_min)
    rows = Marginal(p.a, p.tau1, p.row_min)
    cols = Marginal(p.col_mass, p.tau2, col_min)
    out, plan, f, g = _run(p, work, rows, cols, transpose)
    return _Solution(
        plan, lambda: (f, g), out.error, out.iterations, out.converged, out.imprecise, out.finite
    )


def _solve_screened(p: Problem, screen: _screen.Screen) -> _Solution:
    """Solve the kept rows of a screened balanced problem, then rebuild the full solution.

    The plan ``[B, M, N + 1]``, the potentials and the errors."""
    N = p.cost.shape[2]
    assert p.background is not None  # screened problems have a background column
    a_k = screen.kept_mass(p.a)
    b_k = torch.cat([p.b, (a_k.sum(-1) - p.b.sum(-1)).unsqueeze(-1)], dim=-1)  # ∅ less excluded
    transpose = a_k.shape[1] > N + 1
    work = full_cost(screen.gather(p.cost), screen.gather(p.background), transpose)
    p.check_columns(work.mT if transpose else work, work.amin(-1 if transpose else -2), a_k)
    # Errors relative to the full problem's mass: the excluded rows add none (exactly a_i to ∅).
    out, plan_k, f_k, g = _run(
        p, work, Marginal(a_k, INF), Marginal(b_k, INF), transpose, error_mass=p.a.sum(-1)
    )
    plan = screen.expand_plan(plan_k, p.a)
    background = p.background

    def potentials() -> tuple[Tensor, Tensor]:
        return screen.expand_f(f_k, g, background, p.a, p.eps), g

    return _Solution(
        plan, potentials, out.error, out.iterations, out.converged, out.imprecise, out.finite
    )


def _slow_cause(p: Problem) -> str:
    """The likely cause of items running out of iterations, and what to do."""
    B, M, N = p.cost.shape
    short = min(M, N + int(p.has_background))
    todo = (
        "To allow more iterations: max_iter= (match, the assigners and matchers) or the "
        "training CLIs' --max-iter"
    )
    if p.max_iter < SMALL_BUDGET:
        return (
            f"max_iter = {p.max_iter} is small: Newton's stages typically take 5 to 30 "
            "iterations, the scaling sweeps tens to hundreds. " + todo
        )
    if p.grad or short > _newton.MAX_LINES or p.tau1 == 0 or p.tau2 == 0:
        why = (
            "gradients are carried through the iterations"
            if p.grad
            else f"the shorter side has {short} > {_newton.MAX_LINES} lines"
            if short > _newton.MAX_LINES
            else "a tau is 0"
        )
        return (
            f"These items ran scaling sweeps only ({why}), which converge slowly on nearly "
            "tight supplies and on near-ties at an eps far below their cost gaps. "
            + todo
            + ", or a larger eps, or finite taus"
        )
    if p.balanced:
        return (
            "Newton's stages reach tol in tens of iterations on any problem with a plan, so the "
            "likely cause is the masses: no plan over the finite-cost pairs carries them "
            "exactly, or only one through very large costs (e.g. a ground truth whose "
            "candidates cannot carry its supply, which a 1e6 penalty pair then must). Check "
            "the supplies, or use finite taus. " + todo
        )
    return (
        "Newton's stages reach tol in tens of iterations on most problems: the likely cause is "
        "a plan far from the masses' scale (taus far below the costs, or far above them). "
        + todo
        + ", or a larger eps"
    )


def _wrap(p: Problem, s: _Solution) -> Matching:
    """The :class:`Matching` in the caller's container.

    A plan that is not finite, or does not fit the caller's dtype, is an error rather than an
    answer."""
    plan = s.plan
    if not bool(s.finite.all()):  # the solvers' own check: no pass over the plan here
        finite = plan[torch.isfinite(plan)]
        raise overflow_error(float(finite.amax()) if finite.numel() else math.inf, plan.dtype)
    narrow = p.out_dtype in (torch.float16, torch.bfloat16) and plan.numel()  # than work
    if narrow and bool((plan > torch.finfo(p.out_dtype).max).any()):
        raise overflow_error(float(plan.amax()), p.out_dtype)
    status = [
        "converged" if bool(c) else ("precision" if bool(i) else "max_iter")
        for c, i in zip(s.converged.tolist(), s.imprecise.tolist(), strict=True)
    ]
    failed = [k for k in STATUSES if k != "converged" and k in status]
    if failed:  # one text per kind of failure, so the default filter shows it once per caller
        texts = [
            f"{k}: {STATUSES[k]}" + (f". {_slow_cause(p)}" if k == "max_iter" else "")
            for k in failed
        ]
        met = [
            str(i)
            for i, (k, e) in enumerate(zip(status, s.error.tolist(), strict=True))
            if k == "precision" and e <= p.tol
        ]
        if met:  # marginals met, and yet not converged: say why, with the items
            texts.append(
                f"items {', '.join(met[:8])}{', ...' if len(met) > 8 else ''} meet the "
                "marginals to tol but are not called converged: their eps is not resolved"
            )
        warnings.warn(
            "uotmatch.match: some items did not converge (Matching.status and marginal_error "
            "say which and by how much): " + "; ".join(texts),
            RuntimeWarning,
            stacklevel=3,
        )
    return Matching(
        plan=plan,
        converged=s.converged,
        error=s.error,
        iterations=s.iterations,
        status=status,
        has_background=p.has_background,
        potentials=s.potentials,
        kind=p.kind,
        batched=p.batched,
        out_dtype=p.out_dtype,
        gt_mask=p.gt_mask,
    )
