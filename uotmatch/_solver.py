"""The solver's front: the prepared problem and the driver of its eps-scaling stages.

Each stage runs by Newton steps (:mod:`uotmatch._newton`) where they apply, by scaling sweeps
(:mod:`uotmatch._sinkhorn`) elsewhere."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uotmatch import _newton, _precision, _sinkhorn
from uotmatch._precision import ABSORB_FRACTION, CLAMP_FRACTION, KERNEL_LOG_FLOOR
from uotmatch._schedule import eps_schedule
from uotmatch._state import Marginal, Solve, SolveOutput, output, start

__all__ = ["prepare", "solve"]


def prepare(
    cost: Tensor,
    rows: Marginal,
    cols: Marginal,
    eps: float,
    max_iter: int,
    tol: float,
    error_mass: Tensor | None,
    check_every: int | None,
    newton: bool | None,
    newton_first: bool = True,
) -> Solve:
    """The :class:`Solve` of :func:`solve`'s arguments.

    Alive lines, working dtype (the precision policy), the eps schedule, the check interval and
    whether Newton steps apply."""
    B, M, N = cost.shape
    tau1, tau2 = rows.tau, cols.tau
    row_min = cost.amin(-1) if rows.cost_min is None else rows.cost_min  # [B, M]
    col_min = cost.amin(-2) if cols.cost_min is None else cols.cost_min  # [B, N]
    # A line with only forbidden entries, or zero mass under a tau > 0 (KL to 0 forces it
    # empty), carries nothing: exactly zero plan, potential pinned to 0, excluded from the error.
    row_alive = row_min < math.inf  # [B, M]
    row_alive = row_alive if tau1 == 0 else row_alive & (rows.mass > 0)
    col_alive = col_min < math.inf  # [B, N]
    col_alive = col_alive if tau2 == 0 else col_alive & (cols.mass > 0)
    ranges = _precision.line_ranges(row_min, col_min, row_alive, col_alive)  # [4, B]
    magnitude = _precision.potential_magnitude(
        ranges, row_alive, col_alive, rows.mass, cols.mass, tau1, tau2
    )
    rescue = _newton.applies(cost, tau1, tau2) if newton is None else newton
    newton_sized = rescue and _newton.first(cost, tau1, tau2)  # Newton could run every stage
    use_newton = newton_sized and newton_first
    if use_newton or _precision.needs_float64(
        magnitude,
        _precision.plan_log_bound(
            row_min, row_alive, col_alive, rows.mass, cols.mass, tau1, tau2, eps
        ),
        cost.dtype,
        eps,
    ):
        cost, row_min, col_min = cost.double(), row_min.double(), col_min.double()
        rows = Marginal(rows.mass.double(), tau1)
        cols = Marginal(cols.mass.double(), tau2)
        error_mass = None if error_mass is None else error_mass.double()
    any_dead = not bool(row_alive.all() and col_alive.all())
    if any_dead:
        # A line whose costs are all +inf already (padding) needs no pass over the cost.
        dead_finite = ((row_min < math.inf) & ~row_alive).any() | (
            (col_min < math.inf) & ~col_alive
        ).any()
        if bool(dead_finite):
            cost = cost.masked_fill(~row_alive[..., None] | ~col_alive[:, None, :], math.inf)
        row_min = torch.where(row_alive, row_min, math.inf)
        col_min = torch.where(col_alive, col_min, math.inf)
    rows = Marginal(rows.mass, tau1, row_min).live(row_alive, error_mass)
    cols = Marginal(cols.mass, tau2, col_min).live(col_alive, error_mass)
    if check_every is None:
        if cost.is_cuda:
            check_every = _sinkhorn.CHECK_EVERY_CUDA
        else:  # a check is ~30 tiny ops: on small problems that is several mat-vecs' worth
            small = B * M * N < _sinkhorn.CHECK_EVERY_CPU_SIZE
            check_every = _sinkhorn.CHECK_EVERY_CPU_SMALL if small else 1
    floor = KERNEL_LOG_FLOOR[cost.dtype]
    if newton_sized:  # Newton's schedule whichever stages run: Newton finishes what sweeps crawl on
        stages = eps_schedule(ranges, eps, _newton.EPS_DECAY, cost.dtype, _newton.MIN_EPS_RATIO)
    else:
        stages = eps_schedule(ranges, eps, _sinkhorn.EPS_DECAY, cost.dtype)
    return Solve(
        cost=cost,
        rows=rows,
        cols=cols,
        eps=eps,
        stages=stages,
        max_iter=max_iter,
        tol=tol,
        check_every=check_every,
        newton=use_newton,
        rescue=rescue,
        translate=0 < tau1 and 0 < tau2 and not (math.isinf(tau1) and math.isinf(tau2)),
        any_dead=any_dead,
        imprecise=_precision.imprecise(magnitude, cost.dtype, eps),
        floor=floor,
        absorb_at=-floor / ABSORB_FRACTION,
        log_clamp=-floor / CLAMP_FRACTION,
        tiny=torch.finfo(cost.dtype).tiny,
    )


def solve(
    cost: Tensor,
    rows: Marginal,
    cols: Marginal,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    error_mass: Tensor | None = None,
    check_every: int | None = None,
    newton: bool | None = None,
    newton_first: bool = True,
) -> SolveOutput:
    """Solve a batch of entropic UOT problems.

    Args:
        cost: ``[B, M, N]`` finite or ``+inf`` (forbidden pair) costs. Reductions over the last
            dimension are the fast ones, and Newton steps are taken on the rows' dual: pass the
            transposed problem when ``M > N``.
        rows: the rows' marginal (masses ``[B, M]``, 0 for an absent line; their cost minima
            when the caller has them).
        cols: the columns' (masses ``[B, N]``), likewise.
        eps: entropic regularisation, ``> 0``.
        max_iter: total iterations (sweeps and Newton steps, eps-scaling stages included).
        tol: stop an item once its relative marginal error is at most this.
        error_mass: ``[B]``, when given, the mass the hard sides' errors are relative to
            (default: each side's prescribed total), e.g. that of the full problem a screened
            one came from.
        check_every: sweeps between convergence checks (the only host syncs of the sweeps);
            None: ``CHECK_EVERY_CUDA`` on CUDA, else by size (``CHECK_EVERY_CPU_*``).
        newton: Newton steps on the rows' dual (:mod:`uotmatch._newton`): None where they apply
            (:func:`uotmatch._newton.applies`: at every stage of small problems, elsewhere for
            the items the sweeps converge too slowly for), False never.
        newton_first: with Newton steps, small problems run them at every stage (else the
            sweeps do, and Newton steps finish the items they converge too slowly for);
            ``SolverOptions.method`` ``"auto"`` (True) or ``"sweeps"`` (False).
    """
    s = prepare(cost, rows, cols, eps, max_iter, tol, error_mass, check_every, newton, newton_first)
    st = start(s, _sinkhorn.OMEGA)
    for stage, eps_s in enumerate(s.stages):
        final = stage == len(s.stages) - 1
        if s.newton:
            _newton.begin_stage(s, st, eps_s)
            _newton.run_stage(s, st, final)
        else:
            _sinkhorn.begin_stage(s, st, eps_s)
            _sinkhorn.run_sweeps(s, st, final)
    return output(s, st)
