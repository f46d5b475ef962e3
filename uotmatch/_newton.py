r"""Newton steps on the short side's dual: the second-order stages of the solver.

Scaling iterations (Sinkhorn) converge linearly at a rate set by how well the kernel mixes. On
the problems real training makes that rate can be 1 - 1e-5: a ground truth whose candidate
anchors carry its supply and little more (OTA's supplies cut to what the candidates can carry),
near-ties at an eps far below their cost gaps, exactly tight supplies (the optimal potentials
then lie at infinity and the sweeps' steps shrink with the error, ``eps x error``). Newton's
method on the dual is indifferent to that conditioning: it converges in about ten steps where
the sweeps need thousands, and by steps of about eps toward potentials at infinity.

The dual is maximised over the rows' potentials ``f`` (the short side: the solver puts it
first), the columns' ``g(f)`` taking their exact update (a c-transform, damped for a finite
``tau2``). That *semi-dual* ``F(f)`` is concave, with

.. math::
    \nabla F = t - r, \qquad
    -\nabla^2 F = \mathrm{diag}(t / \tau_1)
        + \tfrac{1}{\varepsilon}\big[(1 - \lambda_2)\,\mathrm{diag}(r)
        + \lambda_2\,\mathcal{L}(P\,\mathrm{diag}(1/c)\,P^\top)\big],

where ``r = P 1`` and ``c = P^T 1`` are the plan's marginals, ``t`` the rows' target (``a``, or
``a exp(-f / tau1)``), ``lambda_2 = tau2 / (tau2 + eps)``, and ``L(Q)`` the Laplacian of
``Q``'s off-diagonal part (``diag(Q 1) - Q`` written without the cancelling diagonal: a nearly
tight group of rows is coupled to the rest by tiny but accurate entries). For two hard
marginals the Hessian is singular along ``f + c 1`` (the plan does not move): a rank-one term
along the alive rows removes that direction. Each step solves the ``[M, M]`` systems by a
batched Cholesky factorisation and backtracks on ``F`` (Armijo); an item whose system or line
search fails takes a sweep instead, which never decreases ``F`` (a coordinate ascent step).

Everything here runs in the log domain and in float64 (:func:`applies` keeps it to small
problems, where that costs nothing): the plan is ``exp((f + g - C) / eps)`` with ``g`` the
exact column update, so no line is ever cut off by a kernel's floor or a scaling's clamp.

Between eps-scaling stages the potentials follow their tangent (:func:`_tangent`): a stage's
optimum moves with eps (by ``eps log(1 / slack)`` for a nearly tight supply, by ``eps log``
of the masses when eps is large), and a warm start that ignores that lags behind it.

References: Brauer, Clason, Lorenz and Wirth, "A Sinkhorn-Newton method for entropic optimal
transport" (2017); the semi-dual of Cuturi and Peyre, "Computational Optimal Transport" (2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from uotmatch._precision import threshold_
from uotmatch._state import Solve, State, freeze, optimal_translation, side_error

__all__ = [
    "EPS_DECAY",
    "FIRST_SIZE",
    "MIN_EPS_RATIO",
    "MAX_LINES",
    "applies",
    "begin_stage",
    "finish",
    "first",
    "run_stage",
]

#: Newton steps apply up to this many rows (the short side: the system is ``[M, M]`` per item).
MAX_LINES = 128
#: Problems of at most this many entries run Newton steps at every stage (:func:`first`).
FIRST_SIZE = 2**17
#: Newton's stages scale eps only when the estimated dual range exceeds ``MIN_EPS_RATIO`` times
#: eps (below, the steps reach the optimum from the warm start as fast as a schedule would), by
#: ``EPS_DECAY`` per stage (each stage starts near its optimum, from the tangent, so the schedule
#: moves faster than the sweeps').
MIN_EPS_RATIO = 1024.0
EPS_DECAY = 0.125
#: An intermediate stage takes at least one step, then stops once every alive row is within
#: ``STAGE_TOL`` of its target (relative), or after ``STAGE_STEPS`` steps.
STAGE_TOL = 1e-1
STAGE_STEPS = 8
#: A step moves no row's potential by more than a radius (a trust region in the potentials'
#: natural unit, eps) that starts at this and adapts (:func:`step`); a move of ``eps log(1 /
#: slack)`` reaches any slack down to 1e-14 in one step.
MAX_STEP = 32.0
#: Armijo's sufficient-increase fraction, and how often a step is halved before the item takes
#: a sweep instead.
ARMIJO = 1e-4
MAX_HALVINGS = 12
#: The gain of a step is trusted down to ``NOISE * finfo.eps * eps * mass``; below it (next to
#: the optimum), a step is judged by the error it leaves instead.
NOISE = 256
#: Ridge on the system's diagonal, relative to a row's mass over eps, beyond the rank-one term:
#: a group of rows that the exponential's underflow has cut off from the rest leaves a null
#: direction.
RIDGE = 1e-12
#: The tangent moves no potential faster than this per unit of eps: a nearly null direction of
#: the system turns rounding in its right-hand side into a wild tangent; the true ones are of
#: the size of the entropic terms' log-masses and log-counts.
TANGENT_CAP = 30.0
#: An item that eps is below the dtype's resolution for (status ``"precision"``: it cannot
#: reach tol) stops once its error has not halved in this many steps.
STALL_STEPS = 20
#: A row receiving less than this fraction of its target is *starved* (its potential far below
#: where its mass would flow): its item takes a sweep, which puts it back in one step.
STARVED = 1e-3
#: Exponents below this are taken as 0 (no subnormal numbers: ``exp`` is slow on them).
LOG_FLOOR = -700.0
FLOOR = math.exp(LOG_FLOOR) * 2

#: A trial step: the rows' ``lu``, the columns' exact ``lv``, the plan, and per item the gain.
_Trial = tuple[Tensor, Tensor, Tensor, list[float]]


def applies(cost: Tensor, tau1: float, tau2: float) -> bool:
    """Newton steps apply to ``cost [B, M, N]``.

    Both taus positive (a free side is solved in one sweep), at most ``MAX_LINES`` rows, and no
    gradients to carry through the iterations."""
    return tau1 > 0 and tau2 > 0 and cost.shape[1] <= MAX_LINES and not torch.is_grad_enabled()


def first(cost: Tensor, tau1: float, tau2: float) -> bool:
    """Every stage runs Newton steps.

    They apply, and the problem is small enough (``FIRST_SIZE`` entries) that a step costs about
    as much as a sweep (per-operation overhead, not arithmetic, sets the time), so that the few
    steps beat the many sweeps even on well-conditioned problems. Elsewhere the sweeps run, and
    hand the items they converge too slowly for to :func:`finish`."""
    B, M, N = cost.shape
    return applies(cost, tau1, tau2) and B * M * N <= FIRST_SIZE


# -- the plan of a row potential -------------------------------------------------------------------
#
# A stage fixes its exponents ``W = (f0 + g0 - C) / eps`` at its start ``(f0, g0)`` (kept in the
# state's ``f``, ``g``) and moves ``lu = (f - f0) / eps``, ``lv = (g - g0) / eps`` (the state's
# ``log_u``, ``log_v``): every plan of the stage is ``exp(W + lu + lv)``. The rounding of ``f0 +
# g0 - C`` (up to ``|C| x 1e-16``, which divided by a small eps can exceed the tolerance) is then
# the same in every evaluation: the stage solves one problem exactly, as the scaling domain does
# with its kernel, rather than a slightly different one at each step. The state's kernel ``K``
# holds the plan itself (its scalings ``u``, ``v`` stay 1).


def _anchor(s: Solve, st: State, f: Tensor, g: Tensor) -> None:
    """Start the stage's exponents at the potentials ``f``, ``g``."""
    st.f, st.g = f, g
    st.W = (f.unsqueeze(-1) + g.unsqueeze(1) - s.cost) / st.eps
    st.log_u, st.log_v = torch.zeros_like(f), torch.zeros_like(g)


def _columns(s: Solve, st: State, lu: Tensor) -> tuple[Tensor, Tensor]:
    """The columns' exact update ``lv [B, N]`` at the rows' ``lu [B, M]``, and the plan.

    The plan is ``P [B, M, N] = exp(W + lu + lv)``, from one pass of ``exp`` (stable whatever
    ``lu``: each column is scaled by its largest entry first). With ``lam2 = 1``, ``lv = log b -
    LSE_i(W_ij + lu_i)``: no large terms cancel."""
    lv, E, top = _column_update(s, st, lu)
    return lv, E.mul_(top.add_(lv).exp_().unsqueeze(1))


def _column_update(s: Solve, st: State, lu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_columns`' ``lv``, without the plan.

    With ``E = exp(W + lu - top)`` and ``top [B, N]``, from which the plan is ``E exp(top +
    lv)``."""
    lam2 = s.cols.lam(st.eps)
    # [B, M, N], -inf on forbidden pairs and dead lines
    E, top = _shifted_exp_(torch.add(st.W, lu.unsqueeze(-1)), 1)
    top = top.squeeze(1)
    lse = E.sum(1).clamp_min_(1e-300).log_().add_(top)  # LSE_i (f_i + g0_j - C_ij) / eps
    lv = s.cols.log_mass - lse
    if lam2 < 1:
        lv = lv.mul_(lam2).sub_(st.g, alpha=(1 - lam2) / st.eps)
    return lv.masked_fill_(s.cols.dead, 0.0), E, top


def _shifted_exp_(z: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """In place: ``exp(z - top)``, and ``top`` the maxima of ``z`` along ``dim`` (kept dim).

    ``top`` is 0 for a line with no finite entry. The stable half of a log-sum-exp over either
    side, written out rather than torch's ``logsumexp``: no exponent below ``LOG_FLOOR`` (``exp``
    meets no subnormal numbers), and fewer operations at small sizes."""
    top = z.amax(dim, keepdim=True).nan_to_num_(neginf=0.0)
    return threshold_(z.sub_(top).clamp_min_(LOG_FLOOR).exp_(), FLOOR, 0.0), top


def _rows(s: Solve, st: State, lv: Tensor) -> Tensor:
    """``[B, M]`` the rows' exact update ``lu`` at the columns' ``lv``."""
    lam1 = s.rows.lam(st.eps)
    E, top = _shifted_exp_(torch.add(st.W, lv.unsqueeze(1)), -1)  # [B, M, N]
    total = E.sum(-1)  # 0 for a row with no finite entry
    lu = lam1 * (s.rows.log_mass - total.clamp_min(1e-300).log_().add_(top.squeeze(-1)))
    if lam1 < 1:
        lu = lu - (1 - lam1) * st.f / st.eps
    return torch.where(s.rows.alive & (total > 0) & torch.isfinite(lu), lu, 0.0)


def _set(st: State, lu: Tensor, lv: Tensor, P: Tensor, items: Tensor | None = None) -> None:
    """Store ``lu``, ``lv`` and the plan (for ``items`` ``[B]`` only, when given)."""
    if items is not None:
        pick = items[:, None]
        lu, lv = torch.where(pick, lu, st.log_u), torch.where(pick, lv, st.log_v)
        P = torch.where(pick[..., None], P, st.K)
    st.log_u, st.log_v, st.K = lu, lv, P
    st.Kv, st.KTu = P.sum(-1), P.sum(1)


def _sweep(s: Solve, st: State, items: Tensor) -> None:
    """A sweep in the log domain for ``items``: the rows' exact update, then the columns'."""
    lu = _rows(s, st, st.log_v)
    lv, P = _columns(s, st, lu)
    _set(st, lu, lv, P, items)


# -- Newton steps ----------------------------------------------------------------------------------


def _system(s: Solve, st: State, r: Tensor, target: Tensor) -> Tensor:
    """``-Hessian`` of the semi-dual at the state, ``[B, M, M]`` (module docstring)."""
    eps, lam2 = st.eps, s.cols.lam(st.eps)
    P = st.K
    if lam2 == 1:  # the columns' exact update gave each of them its mass: c = b
        c_inv = s.cols.inverse_mass
    else:
        c = st.KTu
        c_inv = torch.where(c == 0, 1.0, c).reciprocal_()  # an empty column's P is 0 anyway
    Q = torch.bmm(P * c_inv.unsqueeze(1), P.mT)  # P diag(1/c) P^T
    S = Q + Q.mT  # 2 Q, symmetric to the last bit: its Laplacian is then semidefinite
    coupling = S.sum(-1).sub_(S.diagonal(dim1=1, dim2=2))  # 2 x the off-diagonal row sums
    H = S.mul_(-lam2 / (2 * eps))  # the off-diagonal entries; the diagonal is set below
    diag = coupling.mul_(lam2 / (2 * eps))
    if lam2 < 1:
        diag = diag.add_(r, alpha=(1 - lam2) / eps)
    if s.finite1:
        diag = diag.add_(target, alpha=1 / s.rows.tau)
    # The natural unit of the system: a row's mass over eps (its curvature when it alone moves).
    # Two hard marginals: the plan's mass is the masses' total.
    balanced = s.rows.hard and lam2 == 1
    mean = s.rows.mean_mass if balanced else (r.sum(-1) / s.rows.count).clamp_min_(1e-300)
    diag = diag.add_(mean.unsqueeze(-1), alpha=RIDGE / eps).masked_fill_(s.rows.dead, 1.0)
    H.diagonal(dim1=1, dim2=2).copy_(diag)  # dead rows: identity (their step is 0)
    # f + c 1 leaves the plan as it is (two hard marginals), or moves only the mass, which the
    # closed-form translation after each step optimises (finite taus): pin that direction.
    if balanced or s.translate:
        w = s.rows.alive_weight  # [B, M]: 1 on alive rows
        pin = s.rows.pin if balanced else (w * (mean / s.rows.count)[:, None]).unsqueeze(-1)
        H = H.baddbmm_(pin, w.unsqueeze(1), alpha=1 / eps)
    return H


def _gain(
    s: Solve, st: State, target_r: Tensor, target_c: Tensor | None, df: Tensor, dg: Tensor
) -> Tensor:
    """``[B]`` ``F(f + df) - F(f)`` for the exact column updates (``dg`` their change).

    From the rows' and columns' targets at ``f`` (``target_c`` None for hard columns): ``<a, df>``
    or ``-tau1 <t, expm1(-df / tau1)>`` for the rows, likewise the columns with ``-eps sum P``
    folded in (``sum P = <b, exp(-g / tau2)>`` at an exact update)."""
    rows, cols = s.rows, s.cols
    if rows.hard:
        gain = (rows.mass * df).sum(-1)
    else:
        gain = -rows.tau * (target_r * torch.expm1(-df / rows.tau)).sum(-1)
    if cols.hard:
        return gain + (cols.mass * dg).sum(-1)
    assert target_c is not None
    return gain - (cols.tau + st.eps) * (target_c * torch.expm1(-dg / cols.tau)).sum(-1)


def _translate(s: Solve, st: State) -> None:
    """For finite taus, the mass mode in closed form (``f + t, g - t``: ``W`` does not change).

    Its curvature, ``1/tau1 + 1/tau2``, is tiny for large taus, and the move it needs large,
    which a step along it (pinned by the system's rank-one term) would not make. The columns then
    take their exact update again (with a finite ``tau2`` it is not translation-covariant: ``g(f
    + t) = g(f) - lam2 t``)."""
    if s.translate:
        t = optimal_translation(s, st)
        st.f, st.g = st.f + t[:, None], st.g - t[:, None]
        lv, P = _columns(s, st, st.log_u)
        _set(st, st.log_u, lv, P, st.active)


def step(s: Solve, st: State, act: Tensor, target: Tensor) -> None:
    """One Newton step for the items ``act`` ``[B]`` (the others keep their state).

    From the rows' ``target`` at the state: direction, a step within the item's radius, Armijo
    backtracking; an item whose step fails takes a sweep instead. The per-item decisions are
    taken on the host, from one transfer of ``B`` numbers each (small problems: a few tiny
    tensor operations cost more than the transfer)."""
    r = st.Kv
    grad = torch.where(s.rows.alive & act[:, None], target - r, 0.0)
    L, info = torch.linalg.cholesky_ex(_system(s, st, r, target))
    d = torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1).div_(st.eps)  # in units of eps
    # per item: the gain's rate along d (in the potentials' units), the largest move, the
    # factorisation's failure, whether it steps
    rate, reach, failed, active = torch.stack(
        [(grad * d).sum(-1).mul_(st.eps), d.abs().amax(-1), info.to(d.dtype), act.to(d.dtype)]
    ).tolist()
    usable = [a > 0 and i == 0 and x > 0 for a, i, x in zip(active, failed, rate, strict=True)]
    # Along a nearly null direction (a nearly tight group of rows) the quadratic model is far
    # off: the dual is exponential there, and the step it asks for overshoots by orders of
    # magnitude. No row moves by more than the item's radius (in eps) in one step; the radius
    # doubles after each full step it cut short and shrinks after a step that had to be
    # shortened, so that a large move (a supply that must cross a 1e6 penalty) takes a few
    # dozen steps, not millions.
    if st.radius is None:
        st.radius = [MAX_STEP] * len(usable)
    t0 = [
        min(1.0, rad / max(m, 1e-300)) if u else 0.0
        for u, rad, m in zip(usable, st.radius, reach, strict=True)
    ]
    if not all(usable):  # (a failed factorisation's NaN stays out)
        d = torch.where(torch.tensor(usable, dtype=torch.bool, device=d.device)[:, None], d, 0.0)
    base_u, base_v = st.log_u, st.log_v
    target_c = None if s.cols.hard else s.cols.target(st.gv(s))
    # Two hard sides: the rows' gain is linear in the step (``eps t <a, d>``), the columns'
    # ``eps <b, lv - lv0>``; each trial then transfers two numbers per item.
    rows_rate = (s.rows.mass * d).sum(-1) if s.rows.hard and s.cols.hard else None

    def trial(t: list[float]) -> _Trial:
        if all(ti == 1.0 for ti in t):  # full steps (the common case): no step lengths to apply
            lu = base_u + d
        else:
            lu = base_u + torch.tensor(t, dtype=d.dtype, device=d.device)[:, None] * d
        lv, P = _columns(s, st, lu)
        if rows_rate is None:
            gain = _gain(s, st, target, target_c, st.eps * (lu - base_u), st.eps * (lv - base_v))
            return lu, lv, P, gain.tolist()
        a_d, b_dlv = torch.stack([rows_rate, (s.cols.mass * (lv - base_v)).sum(-1)]).tolist()
        gains = [st.eps * (x * y + z) for x, y, z in zip(t, a_d, b_dlv, strict=True)]
        return lu, lv, P, gains

    lu, lv, P, gains = trial(t0)
    ok = [u and g >= ARMIJO * t * x for u, g, t, x in zip(usable, gains, t0, rate, strict=True)]
    if ok == [a > 0 for a in active]:  # every step accepted as it is: the common case
        _set(st, lu, lv, P)
        # a full step that the radius cut short: twice the radius next time
        st.radius = [2 * q if o and t < 1 else q for o, t, q in zip(ok, t0, st.radius, strict=True)]
        _translate(s, st)
        return
    taken = _backtrack(s, st, trial, t0, rate, gains, target, usable, (lu, lv, P))
    radius = []
    for u, t, q, took in zip(usable, t0, st.radius, taken, strict=True):
        q = 2 * q if u and t < 1 and took >= t else q  # the full step, cut short by the radius
        radius.append(max(q / 4, MAX_STEP) if 0 < took < t else q)  # a step that was shortened
    st.radius = radius
    failed = [a > 0 and not took > 0 for a, took in zip(active, taken, strict=True)]
    if any(failed):
        _sweep(s, st, torch.tensor(failed, dtype=torch.bool, device=d.device))
    _translate(s, st)


def _backtrack(
    s: Solve,
    st: State,
    trial: Callable[[list[float]], _Trial],
    t0: list[float],
    rate: list[float],
    gains: list[float],
    target: Tensor,
    pending: list[bool],
    first: tuple[Tensor, Tensor, Tensor],
) -> list[float]:
    """Armijo backtracking from the steps ``t0``, halving.

    Per item (on the host): ``rate`` the gain's rate along the direction, ``gains`` the first
    trial's (``first``: its ``lu``, ``lv`` and plan), ``pending`` the items that step. Stores
    each item's first accepted trial; returns the step each item took (0 where none was
    accepted). Next to the optimum the gain is below the rounding of its own terms: there a step
    is also accepted when it lowers the rows' error (the columns' is 0 after their exact
    update)."""
    r = st.Kv
    noise = (NOISE * torch.finfo(r.dtype).eps * st.eps * target.sum(-1)).tolist()
    taken = [0.0] * len(t0)
    err_now: list[float] | None = None
    lu_kept, lv_kept, P_kept = st.log_u, st.log_v, st.K
    t = t0
    lu, lv, P = first
    for k in range(MAX_HALVINGS):
        if k:
            lu, lv, P, gains = trial(t)
        predicted = [ti * x for ti, x in zip(t, rate, strict=True)]
        ok = [p and g >= ARMIJO * q for p, g, q in zip(pending, gains, predicted, strict=True)]
        noisy = [
            p and not o and q < n for p, o, q, n in zip(pending, ok, predicted, noise, strict=True)
        ]
        if any(noisy):
            if err_now is None:
                err_now = side_error(s.rows, r, st.fu(s)).tolist()
            fu = st.f + st.eps * lu if s.finite1 else st.f
            errs = side_error(s.rows, P.sum(-1), fu).tolist()
            ok = [o or (n and e < e0) for o, n, e, e0 in zip(ok, noisy, errs, err_now, strict=True)]
        if any(ok):
            pick = torch.tensor(ok, dtype=torch.bool, device=r.device)[:, None]
            lu_kept, lv_kept = torch.where(pick, lu, lu_kept), torch.where(pick, lv, lv_kept)
            P_kept = torch.where(pick[..., None], P, P_kept)
        taken = [ti if o else tk for ti, o, tk in zip(t, ok, taken, strict=True)]
        pending = [p and not o for p, o in zip(pending, ok, strict=True)]
        if not any(pending):
            break
        t = [ti / 2 for ti in t]
    _set(st, lu_kept, lv_kept, P_kept)
    return taken


# -- stages ----------------------------------------------------------------------------------------


def _tangent(s: Solve, st: State) -> Tensor:
    """``[B, M]`` ``df / deps`` of the rows' optimal potentials at the current state.

    The state is near-optimal; by the implicit function theorem: ``A df/deps = dG/deps`` with ``A``
    the Newton system and ``G = t - r`` the semi-dual's gradient, ``dG/deps = (1 / eps) sum_j P_ij
    (x_ij - lam2 y_j)`` for ``x = log P`` and ``y_j = sum_i P_ij x_ij / c_j`` (the columns follow
    at ``dg_j / deps = lam2 y_j``)."""
    eps, lam2 = st.eps, s.cols.lam(st.eps)
    P, r, c = st.K, st.Kv, st.KTu
    Px = P * torch.where(P > 0, P, 1.0).log()
    y = torch.where(c > 0, Px.sum(1) / c, 0.0)
    rhs = (Px.sum(-1) - lam2 * torch.bmm(y.unsqueeze(1), P.mT).squeeze(1)) / eps
    rhs = torch.where(s.rows.alive, rhs, 0.0)
    L, info = torch.linalg.cholesky_ex(_system(s, st, r, s.rows.target(st.fu(s))))
    d = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
    ok = (info == 0) & torch.isfinite(d).all(-1)
    return torch.where(ok[:, None], d.clamp(-TANGENT_CAP, TANGENT_CAP), 0.0)


def begin_stage(s: Solve, st: State, eps: float) -> None:
    """Move to ``eps``: the rows' potentials follow their tangent, then one sweep.

    The tangent is the previous stage's (the warm start at the first); then one sweep at ``eps``
    (the columns from those rows, the rows from those columns, the columns again), so that no line
    starts cut off."""
    f, g = st.f + st.eps * st.log_u, st.g + st.eps * st.log_v
    if st.K is not None:
        f = f + (eps - st.eps) * _tangent(s, st)
    st.eps = eps
    _anchor(s, st, f, g)
    lv = _column_update(s, st, st.log_u)[0]  # the plan of these columns is not needed
    lu = _rows(s, st, lv)
    lv, P = _columns(s, st, lu)
    _set(st, lu, lv, P)
    _translate(s, st)


def run_stage(s: Solve, st: State, final: bool) -> None:
    """A stage of Newton steps.

    Intermediate: at least one step, then until every alive row is within ``STAGE_TOL`` of its
    target (relative), at most ``STAGE_STEPS`` steps. Final: until every item is within ``tol``
    or the budget is spent, items freezing as they converge. An item with a starved row takes a
    sweep instead of a Newton step."""
    budget = s.max_iter - st.it if final else min(STAGE_STEPS, s.max_iter - st.it - 1)
    best: Tensor | None = None
    stalled_since = torch.zeros_like(st.iterations)
    imprecise = bool(s.imprecise.any())
    for k in range(max(budget, 0) + 1):
        r, target = st.Kv, s.rows.target(st.fu(s))
        if final:
            # The rows' error first; the columns' (0 up to rounding after their exact update)
            # only for the items that meet tol on the rows, and at the last iteration.
            rows_err = s.rows.miss(r, target) if not s.rows.free else torch.zeros_like(st.err)
            near = st.active & (rows_err <= s.tol)
            if k == budget or bool(near.any()):
                cols_err = side_error(s.cols, st.KTu, st.gv(s))
                if freeze(st, torch.maximum(rows_err, cols_err), s.tol) or k == budget:
                    return
            if imprecise:  # stop the items that cannot settle once they stall
                if best is None:
                    best = rows_err
                better = rows_err < best / 2
                best = torch.where(better, rows_err, best)
                stalled_since = torch.where(better, 0, stalled_since + 1)
                stop = st.active & s.imprecise & (stalled_since >= STALL_STEPS)
                if bool(stop.any()):
                    st.err = torch.where(stop, rows_err, st.err)
                    st.iterations.masked_fill_(stop, st.it)
                    st.active = st.active & ~stop
                    if not bool(st.active.any()):
                        return
            act = st.active
        else:
            rel = (target - r).abs() / torch.maximum(target, r).clamp_min(1e-300)
            line_err = torch.where(s.rows.alive, rel, 0.0).amax(-1) if rel.shape[1] else rel[:, 0]
            act = st.active & ((line_err > STAGE_TOL) | (k == 0))
            if k == budget or not bool(act.any()):
                return
        starved = act & (s.rows.alive & (r < STARVED * target)).any(-1)
        if bool(starved.any()):
            _sweep(s, st, starved)
            act = act & ~starved
            if bool(act.any()):
                step(s, st, act, target=s.rows.target(st.fu(s)))
        else:  # some item is active here (a stage returns once none is)
            step(s, st, act, target)
        st.it += 1


def finish(s: Solve, st: State, items: Tensor) -> None:
    """The final stage, by Newton steps, for ``items`` ``[B]`` of a solve the sweeps run.

    From their current potentials, in float64, for the rest of the budget; their plan,
    potentials, error and iterations written back, and the items frozen."""
    idx = torch.nonzero(items).squeeze(1)
    sub = s.subset(idx, torch.float64)
    f, g = st.f + st.eps * st.log_u, st.g + st.eps * st.log_v
    sub_st = State(
        eps=st.eps,
        f=f[idx].double(),
        g=g[idx].double(),
        log_u=torch.zeros_like(f[idx], dtype=torch.float64),
        log_v=torch.zeros_like(g[idx], dtype=torch.float64),
        active=torch.ones(len(idx), dtype=torch.bool, device=idx.device),
        err=st.err[idx].double(),
        iterations=st.iterations[idx].clone(),
        it=st.it,
    )
    begin_stage(sub, sub_st, st.eps)
    run_stage(sub, sub_st, final=True)
    sub_st.iterations.masked_fill_(sub_st.active, sub_st.it)
    dtype = st.K.dtype
    f_new = sub_st.f + sub_st.eps * sub_st.log_u
    g_new = sub_st.g + sub_st.eps * sub_st.log_v
    st.f, st.g = st.f.index_copy(0, idx, f_new.to(dtype)), st.g.index_copy(0, idx, g_new.to(dtype))
    st.log_u, st.log_v = st.log_u.index_fill(0, idx, 0.0), st.log_v.index_fill(0, idx, 0.0)
    st.u, st.v = st.log_u.exp(), st.log_v.exp()
    st.K = st.K.index_copy(0, idx, sub_st.K.to(dtype))  # the plan, at unit scalings
    st.Kv = st.Kv.index_copy(0, idx, sub_st.Kv.to(dtype))
    st.KTu = st.KTu.index_copy(0, idx, sub_st.KTu.to(dtype))
    st.err = st.err.index_copy(0, idx, sub_st.err.to(st.err.dtype))
    st.iterations = st.iterations.index_copy(0, idx, sub_st.iterations)
    st.active = st.active & ~items
