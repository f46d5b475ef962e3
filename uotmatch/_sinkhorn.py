"""Batched, log-stabilised scaling iterations for entropic unbalanced optimal transport.

Pure tensor code: no validation and no container handling (that is :mod:`uotmatch._match`).

The problem, per batch item (see ``docs``/README for the conventions)::

    min_{P >= 0} <C, P> + eps * sum P (log P - 1) + tau1 * KL(P 1 | a) + tau2 * KL(P^T 1 | b)

Its solution is ``P_ij = exp((f_i + g_j - C_ij) / eps)`` for the potentials fixed by

    f = lam1 * eps * (log a - LSE_j((g_j - C_ij) / eps)),   lam1 = tau1 / (tau1 + eps)
    g = lam2 * eps * (log b - LSE_i((f_i - C_ij) / eps)),   lam2 = tau2 / (tau2 + eps)

(``lam = 1`` for ``tau = inf``, ``lam = 0`` for ``tau = 0``). We iterate these updates in the
*scaling* domain on a kernel ``K = exp((f + g - C) / eps)`` built from the current potentials,
``u = exp(df / eps)``, ``v = exp(dg / eps)``: each half-step is then one batched mat-vec instead of
a log-sum-exp over the whole ``[B, M, N]`` tensor. Whenever ``|log u|`` or ``|log v|`` grows large
they are folded into ``f, g`` and the kernel is rebuilt (Schmitzer's absorption), so nothing
overflows or underflows whatever eps and the cost scale. Small eps is reached by eps-scaling:
a geometric schedule of decreasing eps from the estimated dual range (the whole range: no cap
below the dtype's precision), each stage warm-started from the previous potentials. The first
stage starts from a c-transform of both sides (:func:`warm_start`), so that every line has a
kernel entry of 1 whatever its cost offset (a column whose costs are all 1e6 is served).

Accelerations, none of which changes the fixed point:

* over-relaxation (weight ``OMEGA``; an item whose error grows falls back to plain steps);
* translation-invariant steps for finite taus (Sejourne, Vialard and Peyre, AISTATS 2022): the
  dual-optimal shift ``f + t, g - t`` after every sweep removes the slow mass mode;
* closed-form single-entry columns (:class:`_Compaction`) on sparse kernels for long solves;
* convergence measured every iteration on large CPU problems, every few on small ones, every
  ``CHECK_EVERY_CUDA`` on CUDA (a host sync there).

Gradients, when asked for, flow through the iterations (autograd through the unrolled loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: On CUDA, convergence is measured (one host sync) every this many iterations. On CPU, where a
#: check costs no sync but ~30 small ops, every iteration once ``B * M * N`` reaches
#: ``CHECK_EVERY_CPU_SIZE`` (the mat-vecs dominate), else every ``CHECK_EVERY_CPU_SMALL``.
CHECK_EVERY_CUDA = 10
CHECK_EVERY_CPU_SIZE = 2**20
CHECK_EVERY_CPU_SMALL = 3
#: ``|log u|`` or ``|log v|`` above ``|KERNEL_LOG_FLOOR| / ABSORB_FRACTION`` folds the scalings
#: into the potentials and rebuilds the kernel (22.9 in float32, 200 in float64); it must stay
#: below the clamp, which bounds each side by 26.7 (233). Entries floored
#: at build time then stay below exp(floor / 3) (1e-12 in float32): negligible.
ABSORB_FRACTION = 3.5
#: ... looked at every this many iterations (at the checks that fall in).
ABSORB_CHECK_EVERY = 5
#: Each step clamps ``log u`` and ``log v`` to ``|KERNEL_LOG_FLOOR| / CLAMP_FRACTION``: no overflow
#: between absorptions (a clamped step is only a shorter step of the same iteration).
CLAMP_FRACTION = 3.0
#: Kernel entries ``exp(x)`` with ``x`` below this are set to 0 (far from subnormal numbers).
KERNEL_LOG_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
#: Ratio between consecutive eps-scaling stages.
EPS_DECAY = 0.5
#: No eps-scaling unless the estimated dual range exceeds this many times eps.
MIN_EPS_RATIO = 64.0
#: Column compaction (:class:`_Compaction`) is used when at most this fraction of columns remain,
#: for solves still running after ``COMPACT_AFTER`` iterations of the final stage (building it
#: costs about as much as a few dense iterations).
COMPACT_MAX_FRACTION = 0.5
COMPACT_AFTER = 8
#: ... and for kernels of at least this many entries (below, finding the single-entry columns
#: costs more than the iterations it saves).
COMPACT_MIN_SIZE = 2**20
#: Scaling iterations spent at each intermediate eps-scaling stage.
STAGE_ITERS = 10
#: Over-relaxation weight (1 = plain Sinkhorn); items whose error grows fall back to 1.
OMEGA = 1.5
#: A float32 problem is solved in float64 when rounding the kernel's exponents ``(f + g - C) /
#: eps`` errs by more than this (``|C| / eps`` above ~8e3), or when its plan could hold entries
#: above ``exp(LOG_SAFE[float32])``; an item is ``imprecise`` when even its working dtype errs
#: by more (the iterations then cannot settle).
PRECISION = 1e-3
LOG_SAFE = {torch.float32: 60.0, torch.float64: 650.0}


@dataclass
class SinkhornOutput:
    """Raw solver output; shapes use B items, M rows (predictions), N columns."""

    plan: Tensor  # [B, M, N]
    f: Tensor  # [B, M]
    g: Tensor  # [B, N]
    error: Tensor  # [B]
    iterations: Tensor  # [B] int64
    converged: Tensor  # [B] bool: error <= tol and a finite plan
    imprecise: Tensor  # [B] bool: eps below what the working dtype resolves at these costs
    finite: Tensor  # [B] bool: every plan entry finite


@dataclass
class Marginal:
    """One side of the problem: its masses ``[B, L]`` (0 for an absent line, e.g. a masked
    column), its penalty ``tau`` in ``[0, inf]`` and, when the caller has them, the minima of its
    lines' costs ``[B, L]`` (``+inf`` where a line allows nothing)."""

    mass: Tensor
    tau: float
    cost_min: Tensor | None = None


def damping(tau: float, eps: float) -> float:
    """``tau / (tau + eps)``: the exponent of the scaling update (OTT's ``tau_a``)."""
    if math.isinf(tau):
        return 1.0
    return tau / (tau + eps)


def kernel(cost: Tensor, f: Tensor, g: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """``exp((f_i + g_j - C_ij) / eps)`` as ``[B, M, N]`` (into ``out`` when given, no grad).

    Entries below ``exp(KERNEL_LOG_FLOOR)`` are exactly 0 (forbidden pairs included): on CPU,
    ``exp`` is ~20x slower when its result is subnormal or its argument is huge or -inf.
    """
    left = torch.stack([f, torch.ones_like(f)], dim=-1)  # [B, M, 2]
    right = torch.stack([torch.ones_like(g), g], dim=-2)  # [B, 2, N]
    scale = 1.0 / eps
    if out is not None and not torch.is_grad_enabled():
        x = torch.baddbmm(cost, left, right, beta=-scale, alpha=scale, out=out)
    else:
        x = torch.baddbmm(cost, left, right, beta=-scale, alpha=scale)  # (f + g - C) / eps
    floor = KERNEL_LOG_FLOOR[cost.dtype]
    cutoff = math.exp(floor) * (1 + 1e-4)
    if torch.is_grad_enabled() and x.requires_grad:  # autograd needs exp's output intact
        return torch.nn.functional.threshold(x.clamp_min(floor).exp(), cutoff, 0.0)
    return torch.nn.functional.threshold_(x.clamp_min_(floor).exp_(), cutoff, 0.0)


@dataclass
class _Side:
    """One marginal's condition: ``mass * exp(-potential / tau)`` is what the plan must give."""

    log_mass: Tensor  # [B, L], finite
    alive: Tensor  # [B, L] bool
    tau: float
    mass: Tensor  # [B, L], 0 on dead lines
    total: Tensor  # [B]: prescribed total mass (1 where that is 0)

    @classmethod
    def make(
        cls, log_mass: Tensor, alive: Tensor, tau: float, total: Tensor | None = None
    ) -> _Side:
        """``total`` ``[B]`` overrides the mass errors are relative to (default: this side's)."""
        mass = torch.where(alive, log_mass.exp(), torch.zeros_like(log_mass))
        total = mass.sum(-1) if total is None else total
        return cls(log_mass, alive, tau, mass, torch.where(total > 0, total, 1.0))

    def error(self, actual: Tensor, potential: Tensor) -> Tensor | None:
        """``||actual - target||_1 / max(||mass||_1, ||target||_1)`` per item (``actual`` is 0
        on dead lines); ``None`` when ``tau = 0``: that marginal is free, so it has no
        condition to violate.

        Normalised by the larger of the prescribed and the target mass: where the optimum moves
        almost no mass (tau small against the costs) the error stays a fraction of the
        problem's mass, and where it moves far more (negative costs, small tau) a fraction of
        what it moves (which is all a floating-point plan can resolve). With ``tau = inf`` the
        two are the same.
        """
        if self.tau == 0:
            return None
        if math.isinf(self.tau):
            return (actual - self.mass).abs_().sum(-1).div_(self.total)
        target = torch.where(self.alive, (self.log_mass - potential / self.tau).exp(), 0.0)
        return (actual - target).abs_().sum(-1).div_(torch.maximum(self.total, target.sum(-1)))


def _side_error(side: _Side, actual: Tensor, potential: Tensor) -> Tensor:
    """:meth:`_Side.error`, or 0 for a free side or an empty dimension, ``[B]``."""
    e = side.error(actual, potential) if actual.shape[1] else None
    return actual.new_zeros(actual.shape[0]) if e is None else e


def marginal_error(
    row_mass: Tensor,
    col_mass: Tensor,
    rows: _Side,
    cols: _Side,
    f: Tensor,
    g: Tensor,
) -> Tensor:
    """Relative L1 violation of the optimality conditions on both marginals, ``[B]``.

    For the rows, ``||P 1 - a exp(-f / tau1)||_1 / max(||a||_1, ||a exp(-f / tau1)||_1)`` (the
    fraction of mass misplaced; the target is ``a`` itself when ``tau1 = inf``; a ``tau1 = 0``
    side has no condition), and likewise for the columns; the larger side wins.
    """
    return torch.maximum(_side_error(rows, row_mass, f), _side_error(cols, col_mass, g))


def plan_error(
    plan: Tensor, f: Tensor, g: Tensor, a: Tensor, b: Tensor, tau1: float, tau2: float
) -> Tensor:
    """:func:`marginal_error` of any plan ``[B, M, N]`` and potentials (e.g. another solver's),
    for masses ``a [B, M]``, ``b [B, N]``; lines of zero mass count as absent."""
    rows = _Side.make(a.log(), a > 0, tau1)
    cols = _Side.make(b.log(), b > 0, tau2)
    return marginal_error(plan.sum(-1), plan.sum(-2), rows, cols, f, g)


def _optimal_translation(
    log_a: Tensor,
    log_b: Tensor,
    f: Tensor,
    g: Tensor,
    tau1: float,
    tau2: float,
    row_alive: Tensor,
    col_alive: Tensor,
) -> Tensor:
    """``argmax_t`` of the dual along ``(f + t, g - t)``, ``[B]``; needs ``0 < tau1, tau2`` and
    not both infinite. Closed form: ``t = log(<a, e^{-f/tau1}> / <b, e^{-g/tau2}>) /
    (1/tau1 + 1/tau2)``, reading ``e^{-f/inf} = 1`` and ``1/inf = 0``."""
    neg = torch.tensor(-math.inf, dtype=f.dtype, device=f.device)
    inv1 = 0.0 if math.isinf(tau1) else 1.0 / tau1
    inv2 = 0.0 if math.isinf(tau2) else 1.0 / tau2
    lhs = torch.where(row_alive, log_a - f * inv1, neg).logsumexp(-1)
    rhs = torch.where(col_alive, log_b - g * inv2, neg).logsumexp(-1)
    t = (lhs - rhs) / (inv1 + inv2)
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def eps_schedule(row_min: Tensor, col_min: Tensor, eps: float) -> list[float]:
    """Decreasing eps values ending at ``eps``.

    Starts at the spread of the row and column minima (alive lines only; pass ``+inf`` for dead
    ones), a cheap estimate of the range of the dual potentials that, unlike the raw cost range,
    ignores large penalty constants. The whole range is covered (halving each stage), up to
    the precision of the dtype: a spread above ``eps / finfo.eps`` cannot be resolved anyway.
    """
    spread = 0.0
    for mins in (row_min, col_min):  # dead lines hold +inf
        if mins.numel():
            lo = mins.amin()
            hi = torch.where(mins < math.inf, mins, lo).amax()
            gap = float((hi - lo).detach())
            spread += gap if math.isfinite(gap) else 0.0
    stages = []
    e = min(spread, eps / torch.finfo(row_min.dtype).eps) if spread > eps * MIN_EPS_RATIO else eps
    while e > eps:
        stages.append(e)
        e *= EPS_DECAY
    return stages + [eps]


def warm_start(
    cost: Tensor,
    row_min: Tensor,
    col_min: Tensor,
    row_alive: Tensor,
    col_alive: Tensor,
    lam1: float,
    lam2: float,
    tau1: float,
    tau2: float,
) -> tuple[Tensor, Tensor]:
    """Initial potentials ``f [B, M]``, ``g [B, N]``: a (damped) c-transform of both sides.

    The longer side takes its lines' minima, the other side the c-transform against it
    (``f_i = min_j C_ij - g_j``; one pass over the cost, along its fast dimension when the
    columns are the longer side), each damped by ``lam = tau / (tau + eps)`` of the first
    stage (a ``tau = 0`` side stays at 0). Every line then has a kernel entry of about 1: none
    starts below the kernel's floor, whatever its offset (a column whose costs are all 1e6),
    which the iterations could otherwise only reach by steps of a few eps.
    """
    zero_m, zero_n = row_min.new_zeros(row_min.shape), col_min.new_zeros(col_min.shape)
    f, g = zero_m, zero_n
    if cost.numel() == 0:
        return f, g
    # ``cost`` is +inf on dead lines (the potentials there are 0), so they never win a minimum.
    if cost.shape[2] >= cost.shape[1]:  # columns the longer side: g first, then f along dim 2
        if tau2 > 0:
            g = torch.where(col_alive, lam2 * col_min, zero_n)
        if tau1 > 0:
            reduced = (cost - g[:, None, :]).amin(-1)
            f = torch.where(row_alive & (reduced < math.inf), lam1 * reduced, zero_m)
    else:
        if tau1 > 0:
            f = torch.where(row_alive, lam1 * row_min, zero_m)
        if tau2 > 0:
            reduced = (cost - f[..., None]).amin(-2)
            g = torch.where(col_alive & (reduced < math.inf), lam2 * reduced, zero_n)
    return f, g


@dataclass
class _Compaction:
    """Columns whose kernel has a single usable entry, solved in closed form.

    Under a hard column marginal (``tau2 = inf``, no translation), a column j whose kernel holds
    one entry ``K_rj`` (the others floored to 0, e.g. penalty or forbidden costs) has the exact
    update ``v_j = b_j / (K_rj u_r)``: it sends exactly ``b_j`` through row r, so its only effect
    on the iteration is ``b_j / u_r`` in that row's ``K v``. Such columns leave the mat-vecs;
    the rest are gathered into a compact kernel. (Kernel entries floored at build time stay
    negligible until the next build, as in the dense iteration.)
    """

    idx: Tensor  # [B, L] the iterated columns
    row: Tensor  # [B, N] row of each single-entry column's entry
    log_k: Tensor  # [B, N] log of that entry
    mass: Tensor  # [B, M] sum of b_j over the eliminated columns, per row

    @classmethod
    def build(cls, K: Tensor, log_b: Tensor, mass_b: Tensor, floor: float) -> _Compaction | None:
        B, M, N = K.shape
        # Per column, in one mat-mat product over sign(K) (reductions over dim 1 are slow on
        # CPU): the number of nonzero entries and, for single-entry columns, their row.
        ones_idx = torch.stack(
            [
                torch.ones(M, dtype=K.dtype, device=K.device),
                torch.arange(M, dtype=K.dtype, device=K.device),
            ]
        )
        count, row = torch.bmm(ones_idx.expand(B, 2, M), K.sign()).round_().long().unbind(1)
        row = row.clamp_(0, M - 1)  # meaningful where count == 1
        top = K.gather(1, row.unsqueeze(1)).squeeze(1)  # [B, N]
        single = (count == 1) & (top > math.exp(floor / 2))  # v_j stays far from overflow
        keep = ~single
        L = max(int(keep.sum(1).max()), 1)  # at least one iterated column: no empty reductions
        if L > COMPACT_MAX_FRACTION * N:
            return None
        idx = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True)[1][:, :L]
        eliminated = torch.ones_like(keep).scatter_(1, idx, False)  # all single (keep first)
        mass = torch.zeros(B, M, dtype=K.dtype, device=K.device)
        mass.scatter_add_(1, row, torch.where(eliminated, mass_b, 0.0))
        return cls(idx, row, top.clamp_min(torch.finfo(K.dtype).tiny).log(), mass)

    def gather(self, x: Tensor) -> Tensor:
        """``[B, N]`` -> ``[B, L]``."""
        return x.gather(1, self.idx)

    def kernel(self, K: Tensor) -> Tensor:
        """``[B, M, N]`` -> ``[B, M, L]``."""
        return K.gather(2, self.idx.unsqueeze(1).expand(-1, K.shape[1], -1))

    def expand(self, log_v: Tensor, log_b: Tensor, log_u: Tensor) -> Tensor:
        """Full ``[B, N]`` log scalings: the iterated ones, and ``log b - log K_rj - log u_r``."""
        closed = log_b - self.log_k - log_u.gather(1, self.row)
        return closed.scatter(1, self.idx, log_v)


@dataclass
class _Work:
    """The column-side state the iteration runs on: all columns, or a :class:`_Compaction`."""

    K: Tensor  # [B, M, N] or [B, M, L]
    c_v: Tensor  # [B, N] or [B, L]
    log_v: Tensor
    alive: Tensor
    cols: _Side
    compact: _Compaction | None

    @classmethod
    def make(cls, K, g, log_b, lam2, eps, cols, col_alive, compact, floor, log_v=None) -> _Work:
        """All columns, or (``compact``) the compaction of ``K`` if it pays; ``log_v`` is the
        current full ``[B, N]`` state (zeros at a fresh kernel)."""
        c_v = lam2 * log_b - (1 - lam2) / eps * g
        log_v = torch.zeros_like(g) if log_v is None else log_v
        cp = _Compaction.build(K, log_b, cols.mass, floor) if compact else None
        if cp is None:
            return cls(K, c_v, log_v, col_alive, cols, None)
        side = _Side(
            cp.gather(cols.log_mass),
            cp.gather(cols.alive),
            cols.tau,
            cp.gather(cols.mass),
            cols.total,
        )
        return cls(cp.kernel(K), cp.gather(c_v), cp.gather(log_v), cp.gather(col_alive), side, cp)

    def gather(self, x: Tensor) -> Tensor:
        return x if self.compact is None else self.compact.gather(x)

    def Kv(self, v: Tensor, u: Tensor) -> Tensor:
        """``K v`` ``[B, M]``, plus ``b_j / u_r`` per row r for the eliminated columns.

        ``v^T K^T`` rather than ``K v``: a row-vector times the transposed view is ~8x faster
        on CPU (a strided mat-vec with a short inner dimension is not)."""
        return self.with_eliminated(torch.bmm(v.unsqueeze(1), self.K.mT).squeeze(1), u)

    def with_eliminated(self, Kv: Tensor, u: Tensor) -> Tensor:
        """``Kv`` plus what the eliminated columns add to it: ``b_j / u_r`` per row r."""
        return Kv if self.compact is None else Kv + self.compact.mass / u

    def full_log_v(self, log_b: Tensor, log_u: Tensor) -> Tensor:
        if self.compact is None:
            return self.log_v
        return self.compact.expand(self.log_v, log_b, log_u)


def sinkhorn(
    cost: Tensor,
    rows: Marginal,
    cols: Marginal,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    error_mass: Tensor | None = None,
    compact: bool | None = None,
    check_every: int | None = None,
) -> SinkhornOutput:
    """Solve a batch of entropic UOT problems.

    Args:
        cost: ``[B, M, N]`` finite or ``+inf`` (forbidden pair) costs. Reductions over the last
            dimension are the fast ones: pass the transposed problem when ``M >> N``.
        rows, cols: the two marginals (masses ``[B, M]`` and ``[B, N]``, 0 for an absent line;
            their cost minima when the caller has them).
        eps: entropic regularisation, ``> 0``.
        max_iter: total scaling iterations (eps-scaling stages included).
        tol: stop an item once its relative marginal error is at most this.
        error_mass: ``[B]``, when given, the mass marginal errors are relative to (default: each
            side's prescribed total), e.g. that of the full problem a screened one came from.
        compact: closed-form single-entry columns (:class:`_Compaction`): None when it pays
            (large sparse kernels, ``COMPACT_MIN_SIZE``), True from any size, False never. It
            applies under a hard column marginal without translation steps and without
            gradients; the caller refuses True elsewhere.
        check_every: iterations between convergence checks (the only host syncs of the loop);
            None: ``CHECK_EVERY_CUDA`` on CUDA, else by size (``CHECK_EVERY_CPU_*``).
    """
    B, M, N = cost.shape
    tau1, tau2 = rows.tau, cols.tau
    row_min = cost.amin(-1) if rows.cost_min is None else rows.cost_min  # [B, M]
    col_min = cost.amin(-2) if cols.cost_min is None else cols.cost_min  # [B, N]
    # A line with only forbidden entries, or zero mass under a tau > 0 (KL to 0 forces it
    # empty), carries nothing: exactly zero plan, potential pinned to 0, excluded from the error.
    row_alive = (row_min < math.inf) & ((rows.mass > 0) | (tau1 == 0))  # [B, M]
    col_alive = (col_min < math.inf) & ((cols.mass > 0) | (tau2 == 0))  # [B, N]
    magnitude, log_bound = _scales(row_min, col_min, row_alive, col_alive, rows, cols, eps)
    if cost.dtype == torch.float32 and bool(
        (
            (magnitude * torch.finfo(torch.float32).eps > PRECISION * eps)
            | (log_bound > LOG_SAFE[torch.float32])
        ).any()
    ):
        cost, row_min, col_min = cost.double(), row_min.double(), col_min.double()
        rows = Marginal(rows.mass.double(), tau1)
        cols = Marginal(cols.mass.double(), tau2)
        error_mass = None if error_mass is None else error_mass.double()
    imprecise = magnitude * torch.finfo(cost.dtype).eps > PRECISION * eps  # [B]
    log_a, log_b = rows.mass.log(), cols.mass.log()  # -inf for zero mass
    any_dead = not bool(row_alive.all() and col_alive.all())
    if any_dead:
        cost = cost.masked_fill(~row_alive[..., None] | ~col_alive[:, None, :], math.inf)
        row_min = torch.where(row_alive, row_min, math.inf)
        col_min = torch.where(col_alive, col_min, math.inf)
    # With tau = 0 the masses play no part; keep the logs finite so 0 * log never is NaN.
    zero_m, zero_n = torch.zeros_like(row_min), torch.zeros_like(col_min)
    log_a = torch.where(row_alive & torch.isfinite(log_a), log_a, zero_m)
    log_b = torch.where(col_alive & torch.isfinite(log_b), log_b, zero_n)
    tiny = torch.finfo(cost.dtype).tiny
    # Kernel entries below exp(floor) are 0 until the next rebuild; absorbing before
    # |log u| + |log v| nears |floor| keeps what they would have grown to negligible.
    floor = KERNEL_LOG_FLOOR[cost.dtype]
    absorb_at, log_clamp = -floor / ABSORB_FRACTION, -floor / CLAMP_FRACTION
    rows_side = _Side.make(log_a, row_alive, tau1, error_mass)
    cols_side = _Side.make(log_b, col_alive, tau2, error_mass)
    finite1, finite2 = 0 < tau1 < math.inf, 0 < tau2 < math.inf  # targets move with f, g

    stages = eps_schedule(row_min, col_min, eps)
    f, g = warm_start(
        cost,
        row_min,
        col_min,
        row_alive,
        col_alive,
        damping(tau1, stages[0]),
        damping(tau2, stages[0]),
        tau1,
        tau2,
    )

    translate = 0 < tau1 and 0 < tau2 and not (math.isinf(tau1) and math.isinf(tau2))
    compactable = (
        compact is not False
        and math.isinf(tau2)
        and not translate
        and N > M
        and (compact or B * M * N >= COMPACT_MIN_SIZE)
        and not torch.is_grad_enabled()
    )
    if check_every is not None:
        pass
    elif cost.is_cuda:
        check_every = CHECK_EVERY_CUDA
    else:  # a check is ~30 tiny ops: on small problems that is several mat-vecs' worth
        check_every = 1 if B * M * N >= CHECK_EVERY_CPU_SIZE else CHECK_EVERY_CPU_SMALL
    active = torch.ones(B, 1, dtype=torch.bool, device=cost.device)
    omega = torch.full((B, 1), OMEGA, dtype=cost.dtype, device=cost.device)
    weight = omega.clone()  # omega for active items, 0 for frozen ones: one lerp does both
    err = last_err = torch.full((B,), math.inf, dtype=cost.dtype, device=cost.device)
    iterations = torch.zeros(B, dtype=torch.long, device=cost.device)
    it = 0
    for stage, eps_s in enumerate(stages):
        final = stage == len(stages) - 1
        lam1, lam2 = damping(tau1, eps_s), damping(tau2, eps_s)
        K = kernel(cost, f, g, eps_s)
        # The updates in log-scaling form, on the kernel absorbed at (f, g):
        #   log u = lam1 (log a - log K v) - (1 - lam1) f / eps, likewise log v.
        c_u = lam1 * log_a - (1 - lam1) / eps_s * f
        log_u, u = zero_m, torch.ones_like(f)
        work = _Work.make(K, g, log_b, lam2, eps_s, cols_side, col_alive, False, floor)
        Kv = work.K.sum(-1)  # K @ 1
        budget = max_iter - it if final else min(STAGE_ITERS, max_iter - it - 1)
        for k in range(max(budget, 0)):
            new_u = torch.add(c_u, Kv.clamp_min(tiny).log_(), alpha=-lam1)
            if any_dead:
                new_u = torch.where(row_alive, new_u, zero_m)
            log_u = torch.lerp(log_u, new_u, weight).clamp_(-log_clamp, log_clamp)
            u = log_u.exp()
            KTu = torch.bmm(u.unsqueeze(1), work.K).squeeze(1)  # [B, N] or [B, L]
            new_v = torch.add(work.c_v, KTu.clamp_min(tiny).log_(), alpha=-lam2)
            if any_dead:
                new_v = torch.where(work.alive, new_v, 0.0)
            work.log_v = torch.lerp(work.log_v, new_v, weight).clamp_(-log_clamp, log_clamp)
            v = work.log_v.exp()
            if translate:
                col_mass = v * KTu  # [B, N], unchanged by the translation below
                # Translation-invariant step (Sejourne et al., AISTATS 2022): f + t, g - t leaves
                # the plan unchanged; the dual-optimal t removes Sinkhorn's slow mass mode. It
                # goes into the absorbed potentials, which leaves the kernel as it is.
                fu, gv = f + eps_s * log_u, g + eps_s * work.log_v
                t = _optimal_translation(log_a, log_b, fu, gv, tau1, tau2, row_alive, col_alive)
                t = torch.where(row_alive.any(-1, keepdim=True), t[:, None] * active, 0.0)
                f, g = f + t, g - t
                c_u = c_u - (1 - lam1) / eps_s * t
                work.c_v = work.c_v + (1 - lam2) / eps_s * t
            Kv = work.Kv(v, u)  # [B, M]
            it += 1
            if final and compactable and work.compact is None and k + 1 == COMPACT_AFTER:
                # Still not converged: iterate on the multi-entry columns only from here on.
                work = _Work.make(
                    K, g, log_b, lam2, eps_s, cols_side, col_alive, True, floor, work.log_v
                )
                if work.compact is not None:
                    v = work.log_v.exp()
                    Kv = work.Kv(v, u)
                    KTu = torch.bmm(u.unsqueeze(1), work.K).squeeze(1)
            if not final or ((k + 1) % check_every and k + 1 < budget):
                continue
            # The short side first (cheap); the long side only once some item meets tol on the
            # short one, and always at the last iteration, so the final error is complete.
            fu = f + eps_s * log_u if finite1 else f
            gv = work.gather(g) + eps_s * work.log_v if finite2 else work.gather(g)
            sides = [
                (rows_side, u * Kv, fu),
                (work.cols, col_mass if translate else v * KTu, gv),
            ]
            if M > N:
                sides.reverse()
            short_err = _side_error(*sides[0])
            # The clamp bounds |log u|, |log v| at all times (so floored kernel entries stay
            # negligible); absorbing only restores full-length steps, so look every few checks.
            if it % ABSORB_CHECK_EVERY < check_every:
                big = torch.maximum(log_u.abs().max(), work.log_v.abs().max()) > absorb_at
            else:
                big = torch.zeros((), dtype=torch.bool, device=cost.device)
            near, absorb = torch.stack([((short_err <= tol) & active[:, 0]).any(), big]).tolist()
            if near or k + 1 == budget:
                err = torch.maximum(short_err, _side_error(*sides[1]))
                done = active[:, 0] & (err <= tol)
                iterations.masked_fill_(done, it)
                active = active & ~done[:, None]
                if not bool(active.any()):
                    break
            # Over-relaxation is not monotone far from the optimum: an item whose error grew
            # falls back to plain Sinkhorn for good.
            omega.masked_fill_((short_err > last_err)[:, None], 1.0)
            last_err = short_err
            weight = omega * active
            if absorb:
                # Only the active items fold their scalings in: a frozen item's kernel is then
                # rebuilt from the same potentials, bit for bit, so its plan (and the error it
                # converged with) stays as it was rather than re-rounded at large potentials.
                full_v = work.full_log_v(log_b, log_u)
                fold_u, fold_v = log_u * active, full_v * active
                f, g = f + eps_s * fold_u, g + eps_s * fold_v
                K = kernel(cost, f, g, eps_s, out=K)
                c_u = lam1 * log_a - (1 - lam1) / eps_s * f
                log_u = log_u - fold_u
                u = log_u.exp()
                keep_compact = work.compact is not None
                work = _Work.make(
                    K, g, log_b, lam2, eps_s, cols_side, col_alive, keep_compact, floor,
                    full_v - fold_v,
                )  # fmt: skip
                Kv = work.Kv(work.log_v.exp(), u)
        log_v = work.full_log_v(log_b, log_u)
        row_sums = u * Kv  # [B, M]: the row sums of diag(u) K diag(v), the plan below
        if final and not torch.is_grad_enabled():
            # diag(u) K diag(v), in place: the plan whose marginals the last check measured.
            plan = K.mul_(u.unsqueeze(-1)).mul_(log_v.exp().unsqueeze(-2))
        f, g = f + eps_s * log_u, g + eps_s * log_v

    if torch.is_grad_enabled():
        plan = kernel(cost, f, g, eps)
        row_sums = plan.sum(-1)
        err = marginal_error(row_sums, plan.sum(-2), rows_side, cols_side, f, g)
    iterations.masked_fill_(active[:, 0], it)
    # Non-negative entries: the plan is finite iff its row sums are (NaN propagates too).
    finite = torch.isfinite(row_sums).all(-1)
    return SinkhornOutput(
        plan=plan,
        f=torch.where(row_alive, f, zero_m),
        g=torch.where(col_alive, g, zero_n),
        error=err,
        iterations=iterations,
        converged=(err <= tol) & finite & ~imprecise,
        imprecise=imprecise,
        finite=finite,
    )


def _scales(
    row_min: Tensor,
    col_min: Tensor,
    row_alive: Tensor,
    col_alive: Tensor,
    rows: Marginal,
    cols: Marginal,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Per item, ``[B]`` each: the magnitude of the costs that matter (their lines' minima: an
    absorbed potential is of that size, and the kernel's exponents are rounded at it), and an
    upper bound on the log of the plan's largest entry.

    The bound: a row with ``tau1 = inf`` carries exactly ``a_i``, a column with ``tau2 = inf``
    ``b_j``; with both finite, an entry ``P_ij`` above ``max(a_i, b_j)`` makes ``f_i <= -tau1
    log(P_ij / a_i)`` and ``g_j <= -tau2 log(P_ij / b_j)`` (the first-order conditions), so
    ``(eps + tau1 + tau2) log P_ij <= tau1 log a_i + tau2 log b_j - C_ij``.
    """
    dt = row_min.dtype
    ninf = torch.tensor(-math.inf, dtype=dt, device=row_min.device)
    zero = torch.zeros((), dtype=dt, device=row_min.device)
    size_r = torch.where(row_alive, row_min.abs(), zero).amax(-1) if row_min.shape[1] else None
    size_c = torch.where(col_alive, col_min.abs(), zero).amax(-1) if col_min.shape[1] else None
    magnitude = torch.zeros(row_min.shape[0], dtype=dt, device=row_min.device)
    for size in (size_r, size_c):
        if size is not None:
            magnitude = torch.maximum(magnitude, size)
    tau1, tau2 = rows.tau, cols.tau
    if 0 < tau1 < math.inf and 0 < tau2 < math.inf:
        # Unequal total masses put the potentials near tau1 tau2 / (tau1 + tau2) log(A / B).
        total_a = torch.where(row_alive, rows.mass, zero).sum(-1)
        total_b = torch.where(col_alive, cols.mass, zero).sum(-1)
        ratio = (total_a.log() - total_b.log()).nan_to_num(0.0, 0.0, 0.0).abs()
        magnitude = magnitude + tau1 * tau2 / (tau1 + tau2) * ratio
    log_a = torch.where(row_alive, rows.mass, zero).amax(-1).log() if row_min.shape[1] else ninf
    log_b = torch.where(col_alive, cols.mass, zero).amax(-1).log() if col_min.shape[1] else ninf
    log_a, log_b = torch.as_tensor(log_a, dtype=dt), torch.as_tensor(log_b, dtype=dt)
    if math.isinf(tau1) or math.isinf(tau2):
        bound = log_a if math.isinf(tau1) else log_b
        if math.isinf(tau1) and math.isinf(tau2):
            bound = torch.minimum(log_a, log_b)
    else:
        c_min = torch.where(row_alive, row_min, math.inf).amin(-1) if row_min.shape[1] else None
        if c_min is None:
            return magnitude, torch.full_like(magnitude, -math.inf)
        num = -c_min
        if tau1 > 0:
            num = num + tau1 * log_a
        if tau2 > 0:
            num = num + tau2 * log_b
        bound = torch.maximum(torch.maximum(log_a, log_b), num / (eps + tau1 + tau2))
    bound = torch.where(torch.isnan(bound), -math.inf, bound)
    return magnitude, bound.expand_as(magnitude)
