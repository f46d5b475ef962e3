"""The scaling sweeps (Sinkhorn's iteration), batched and log-stabilised.

The stages of the solver where Newton's do not apply (gradients to carry, a short side of more
than ``_newton.MAX_LINES`` lines, large problems, a free side).

The iterations run in the *scaling* domain on a kernel ``K = exp((f + g - C) / eps)`` built at
the current potentials (the *absorbed* ones), with ``u = exp(df / eps)`` and ``v = exp(dg /
eps)`` on top: a half-step is then one batched mat-vec instead of a log-sum-exp over the whole
``[B, M, N]`` tensor. When ``|log u|`` or ``|log v|`` grows large they are folded into ``f, g``
and the kernel is rebuilt (Schmitzer's absorption), so nothing overflows or underflows whatever
eps and the cost scale. Accelerations, none of which changes the fixed point:

* over-relaxation (weight ``OMEGA``); an item whose error grows falls back to plain steps, and so
  does one whose first sweep of the final stage shows it fast (its rows' miss falls: plain sweeps
  then contract faster than over-relaxed ones, which overshoot);
* translation-invariant steps for finite taus (Sejourne, Vialard and Peyre, AISTATS 2022): the
  dual-optimal shift ``f + t, g - t`` after every sweep removes the slow mass mode;
* convergence measured every iteration on large CPU problems, every few on small ones, every
  ``CHECK_EVERY_CUDA`` on CUDA (a host sync there).

Gradients, when asked for, flow through the unrolled iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uotmatch import _newton
from uotmatch._state import Solve, State, freeze, kernel, optimal_translation, side_error

__all__ = [
    "CHECK_EVERY_CPU_SIZE",
    "CHECK_EVERY_CPU_SMALL",
    "CHECK_EVERY_CUDA",
    "EPS_DECAY",
    "begin_stage",
    "run_sweeps",
    "sweep",
]

#: On CUDA, convergence is measured (one host sync) every this many iterations. On CPU, where a
#: check costs no sync but ~30 small ops, every iteration once ``B * M * N`` reaches
#: ``CHECK_EVERY_CPU_SIZE`` (the mat-vecs dominate), else every ``CHECK_EVERY_CPU_SMALL``.
CHECK_EVERY_CUDA = 10
CHECK_EVERY_CPU_SIZE = 2**20
CHECK_EVERY_CPU_SMALL = 3
#: Scalings are looked at for absorption every this many iterations (at the checks that fall in).
ABSORB_CHECK_EVERY = 5
#: Ratio between consecutive eps-scaling stages of the scaling sweeps, and the sweeps spent at
#: each intermediate stage.
EPS_DECAY = 0.5
STAGE_ITERS = 10
#: At the final stage, an item the sweeps would take more than ``NEWTON_PATIENCE`` further
#: sweeps to converge, after ``NEWTON_AFTER`` sweeps, finishes by Newton steps (:func:`check`).
NEWTON_AFTER = 10
NEWTON_PATIENCE = 30
#: Over-relaxation weight of the sweeps (1 = plain Sinkhorn); items whose error grows, or that the
#: final stage's first sweep shows to be fast (``FAST_FALL``), fall back to 1.
OMEGA = 1.5
#: An item whose rows' miss falls to this fraction or less in the final stage's first
#: (over-relaxed) sweep is fast: plain sweeps converge it sooner, and over-relaxing only overshoots.
#: Measured: dense random costs fall to 0.06-0.2, DETR matchings to 0.1-0.35 at initialisation and
#: to 0.5-1 with queries near their targets (plain: 9 sweeps instead of 12); OTA-like supplies,
#: where over-relaxation pays, rise to 1.2.
FAST_FALL = 1.0


def begin_stage(s: Solve, st: State, eps: float) -> None:
    """Move to ``eps``: fold the scalings into the potentials and rebuild the kernel there.

    The scalings are reset to 1."""
    if st.K is not None:
        st.f, st.g = st.f + st.eps * st.log_u, st.g + st.eps * st.log_v
    st.eps = eps
    st.K = kernel(s.cost, st.f, st.g, eps, out=st.K)
    st.log_u, st.log_v = torch.zeros_like(st.f), torch.zeros_like(st.g)
    st.u, st.v = torch.ones_like(st.f), torch.ones_like(st.g)
    _constants(s, st)
    # K @ 1; K^T u is made by the next sweep.
    st.Kv, st.KTu = st.K.sum(-1), None  # type: ignore[assignment]


def _constants(s: Solve, st: State) -> None:
    """The constant parts of the log-scaling updates at the absorbed potentials.

    ``log u = lam1 (log a - log K v) - (1 - lam1) f / eps``, likewise ``log v``."""
    lam1, lam2 = s.rows.lam(st.eps), s.cols.lam(st.eps)
    st.c_u = lam1 * s.rows.log_mass - (1 - lam1) / st.eps * st.f
    st.c_v = lam2 * s.cols.log_mass - (1 - lam2) / st.eps * st.g


def column_update(s: Solve, st: State, KTu: Tensor) -> Tensor:
    """``log v`` of the exact column half-step for ``KTu = K^T u`` (0 on dead columns)."""
    new_v = torch.add(st.c_v, KTu.clamp_min(s.tiny).log(), alpha=-s.cols.lam(st.eps))
    return new_v.masked_fill_(s.cols.dead, 0.0) if s.any_dead else new_v


def sweep(s: Solve, st: State, weight: Tensor | None = None) -> None:
    """One scaling iteration (rows, then columns), relaxed by ``weight [B, 1]``.

    The default weight is the state's: over-relaxed, 0 for frozen items; clamped steps never
    overflow between absorptions. For finite taus, the dual-optimal translation follows."""
    weight = st.weight if weight is None else weight
    lam1 = s.rows.lam(st.eps)
    new_u = torch.add(st.c_u, st.Kv.clamp_min(s.tiny).log(), alpha=-lam1)
    if s.any_dead:
        new_u = new_u.masked_fill_(s.rows.dead, 0.0)
    st.log_u = torch.lerp(st.log_u, new_u, weight).clamp_(-s.log_clamp, s.log_clamp)
    st.u = st.log_u.exp()
    st.KTu = torch.bmm(st.u.unsqueeze(1), st.K).squeeze(1)  # [B, N]
    new_v = column_update(s, st, st.KTu)
    st.log_v = torch.lerp(st.log_v, new_v, weight).clamp_(-s.log_clamp, s.log_clamp)
    st.v = st.log_v.exp()
    if s.translate:
        _translate(s, st)
    # v^T K^T rather than K v: a row-vector times the transposed view is ~8x faster on CPU (a
    # strided mat-vec with a short inner dimension is not).
    st.Kv = torch.bmm(st.v.unsqueeze(1), st.K.mT).squeeze(1)  # [B, M]


def _translate(s: Solve, st: State) -> None:
    """The translation-invariant step: Sinkhorn's slow mass mode removed in closed form.

    It goes into the absorbed potentials, which leaves the kernel as it is."""
    t = optimal_translation(s, st)
    st.f, st.g = st.f + t[:, None], st.g - t[:, None]
    _constants(s, st)


def check(s: Solve, st: State, last: bool, stage_start: int) -> bool:
    """The convergence check of the sweeps, at the final stage; True once every item is done.

    The short side first (cheap); the long side only once some item meets tol on the short one,
    and always at the last iteration, so that the final error is complete. Over-relaxation is
    not monotone far from the optimum: an item whose error grew falls back to plain sweeps for
    good. An item that the sweeps would take more than ``NEWTON_PATIENCE`` further sweeps to
    converge (at the rate of its last check), after ``NEWTON_AFTER`` sweeps of the stage,
    finishes by Newton steps where they apply (``_newton.finish``): a nearly flat dual
    direction, which the sweeps crawl along, is a few steps for Newton. The scalings are looked
    at for absorption every few checks (the clamp bounds them at all times; absorbing only
    restores full-length steps).
    """
    short_err = side_error_of(s, st, short=True)
    # Per item on the host, from one transfer: some item near tol, the scalings large (every
    # few checks), some item to finish by Newton steps (after NEWTON_AFTER sweeps).
    flags = [((short_err <= s.tol) & st.active).any()]
    look = st.it % ABSORB_CHECK_EVERY < s.check_every
    if look:
        flags.append(torch.cat([st.log_u, st.log_v], 1).abs().gt(s.absorb_at).any())
    stalled = None
    if s.rescue and not last and st.it - stage_start >= NEWTON_AFTER:
        rate = short_err / st.last_err  # per check
        need = s.check_every * (s.tol / short_err).log() / rate.log()  # sweeps to tol
        slow = (rate >= 1) | (need > NEWTON_PATIENCE)
        stalled = st.active & (short_err > s.tol) & slow
        flags.append(stalled.any())
    values = iter(torch.stack(flags).tolist())  # in the order appended
    near, big, rescue = next(values), look and next(values), next(values, False)
    if (near or last) and freeze(st, torch.maximum(short_err, side_error_of(s, st, False)), s.tol):
        return True
    if rescue and stalled is not None:
        _newton.finish(s, st, stalled & st.active)
        if not bool(st.active.any()):
            return True
    st.omega.masked_fill_((short_err > st.last_err)[:, None], 1.0)
    st.last_err = short_err
    if big:
        absorb(s, st)
    return False


def absorb(s: Solve, st: State) -> None:
    """Fold the active items' scalings into their potentials and rebuild the kernel there.

    Only the active items fold, and only their kernel changes: a frozen item's plan (and the
    error it converged with) stays as it was.
    """
    fold_u, fold_v = st.log_u * st.active[:, None], st.log_v * st.active[:, None]
    st.f, st.g = st.f + st.eps * fold_u, st.g + st.eps * fold_v
    if bool(st.active.all()):
        st.K = kernel(s.cost, st.f, st.g, st.eps, out=st.K)
    else:  # a frozen item's plan may be Newton's (_newton.finish): keep it as it is
        st.K = torch.where(st.active[:, None, None], kernel(s.cost, st.f, st.g, st.eps), st.K)
    _constants(s, st)
    st.log_u, st.log_v = st.log_u - fold_u, st.log_v - fold_v
    st.u, st.v = st.log_u.exp(), st.log_v.exp()
    st.Kv = torch.bmm(st.v.unsqueeze(1), st.K.mT).squeeze(1)
    st.KTu = torch.bmm(st.u.unsqueeze(1), st.K).squeeze(1)


def side_error_of(s: Solve, st: State, short: bool) -> Tensor:
    """``[B]`` the error of the shorter side (``short``) or of the longer one."""
    if (st.u.shape[1] > st.v.shape[1]) == short:
        return side_error(s.cols, st.v * st.KTu, st.gv(s))
    return side_error(s.rows, st.u * st.Kv, st.fu(s))


def _rows_miss(s: Solve, st: State) -> Tensor:
    """``[B]`` the rows' L1 miss (after a sweep the columns' is 0: their update is exact).

    :func:`run_sweeps` compares it before and after a sweep. Unnormalised, unlike
    :meth:`Marginal.error`: with a finite tau the plan's own mass, its scale, moves between the
    two readings, and the normalised ratio kept some DETR matchings over-relaxed (at eps 0.01,
    taus 10 and 1: 18 to 24 sweeps instead of 12 to 15)."""
    return (st.u * st.Kv - s.rows.target(st.fu(s))).abs().sum(-1)


def run_sweeps(s: Solve, st: State, final: bool) -> None:
    """A stage of scaling sweeps.

    ``STAGE_ITERS`` at an intermediate stage, the rest of the budget (until every item converges)
    at the final one. An item whose rows' miss the final stage's first sweep cuts to ``FAST_FALL``
    of itself or less (whose miss falls) continues by plain sweeps (no host sync)."""
    budget = s.max_iter - st.it if final else min(STAGE_ITERS, s.max_iter - st.it - 1)
    stage_start = st.it
    # (free rows: the columns' exact update settles them)
    miss = _rows_miss(s, st) if final and not s.rows.free else None
    weight = st.weight  # made again where the checks change it
    for k in range(max(budget, 0)):
        sweep(s, st, weight)
        st.it += 1
        if not final:
            continue
        at_check = not ((k + 1) % s.check_every and k + 1 < budget)
        if at_check:
            if check(s, st, last=k + 1 == budget, stage_start=stage_start):
                break
            weight = st.weight
        if miss is not None and k == 0:  # a fast problem: plain sweeps from here on
            fast = _rows_miss(s, st) <= FAST_FALL * miss
            st.omega.masked_fill_(fast[:, None], 1.0)
            weight = st.weight
