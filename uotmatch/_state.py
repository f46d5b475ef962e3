"""The solver's state and what every stage reads.

The two sides of the problem (:class:`Marginal`), the prepared problem (:class:`Solve`), the
iterate (:class:`State`), the errors and convergence bookkeeping, and the output. Pure tensor
code: no validation and no container handling (that is :mod:`uotmatch._match`).

The problem, per batch item (see the docs' conventions page)::

    min_{P >= 0} <C, P> + eps * sum P (log P - 1) + tau1 * KL(P 1 | a) + tau2 * KL(P^T 1 | b)

Its solution is ``P_ij = exp((f_i + g_j - C_ij) / eps)`` for the potentials fixed by

    f = lam1 * eps * (log a - LSE_j((g_j - C_ij) / eps)),   lam1 = tau1 / (tau1 + eps)
    g = lam2 * eps * (log b - LSE_i((f_i - C_ij) / eps)),   lam2 = tau2 / (tau2 + eps)

(``lam = 1`` for ``tau = inf``, ``lam = 0`` for ``tau = 0``). The state holds potentials
``f``, ``g``, a kernel ``K`` built at them and scalings ``u = exp(log_u)``, ``v = exp(log_v)``
on top: the plan is ``diag(u) K diag(v)`` and the potentials ``f + eps log u``, ``g + eps log
v``. The scaling sweeps (:mod:`uotmatch._sinkhorn`) and the Newton stages
(:mod:`uotmatch._newton`) both move it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor

from uotmatch import _precision
from uotmatch._precision import KERNEL_LOG_FLOOR
from uotmatch._schedule import warm_start

__all__ = [
    "Marginal",
    "SolveOutput",
    "Solve",
    "State",
    "damping",
    "errors",
    "freeze",
    "kernel",
    "marginal_error",
    "optimal_translation",
    "output",
    "plan_error",
    "side_error",
    "start",
]


def damping(tau: float, eps: float) -> float:
    """``tau / (tau + eps)``: the exponent of the scaling update (OTT's ``tau_a``)."""
    if math.isinf(tau):
        return 1.0
    return tau / (tau + eps)


@dataclass
class Marginal:
    """One side of the problem.

    The masses ``[B, L]`` of its lines (0 for an absent line, e.g. a masked column), its penalty
    ``tau`` in ``[0, inf]`` and, when the caller has them, the minima of its lines' costs ``[B,
    L]`` (``+inf`` where a line allows nothing).

    The solver fills in ``alive`` (``[B, L]`` bool: the lines that carry mass; the others get an
    exactly zero plan and potential 0) and ``total`` (``[B]``: the mass a hard side's error is
    relative to; default the side's own).
    """

    mass: Tensor
    tau: float
    cost_min: Tensor | None = None
    # Filled in by live() before the solver reads them (the State's convention below).
    alive: Tensor = field(default=None)  # type: ignore[assignment]
    total: Tensor = field(default=None)  # type: ignore[assignment]

    @property
    def hard(self) -> bool:
        return math.isinf(self.tau)

    @property
    def free(self) -> bool:
        return self.tau == 0

    def lam(self, eps: float) -> float:
        return damping(self.tau, eps)

    def live(self, alive: Tensor, total: Tensor | None = None) -> Marginal:
        """This side with its alive lines (masses 0 elsewhere) and its error's total.

        The total ``[B]`` its hard error is relative to: default its own, 1 where that is 0."""
        mass = torch.where(alive, self.mass, 0.0)
        total = mass.sum(-1) if total is None else total
        total = torch.where(total > 0, total, 1.0)
        return Marginal(mass, self.tau, self.cost_min, alive, total)

    @cached_property
    def dead(self) -> Tensor:
        """``[B, L]`` bool, the lines that carry nothing (``~alive``)."""
        return ~self.alive

    @cached_property
    def alive_weight(self) -> Tensor:
        """``[B, L]`` 1 on alive lines, 0 elsewhere, in the masses' dtype."""
        return self.alive.to(self.mass.dtype)

    @cached_property
    def count(self) -> Tensor:
        """``[B]`` the number of alive lines (at least 1)."""
        return self.alive.sum(-1).clamp_min(1)

    @cached_property
    def inverse_mass(self) -> Tensor:
        """``[B, L]`` ``1 / mass`` on the lines with mass, 1 elsewhere."""
        return torch.where(self.mass > 0, self.mass, 1.0).reciprocal_()

    @cached_property
    def mean_mass(self) -> Tensor:
        """``[B]`` the mass per alive line (above 0)."""
        return (self.mass.sum(-1) / self.count).clamp_min_(1e-300)

    @cached_property
    def pin(self) -> Tensor:
        """``[B, L, 1]`` ``alive_weight`` times ``mean_mass / count``.

        With ``alive_weight``, the rank-one term (over eps) that pins a Newton system's
        translation direction."""
        return (self.alive_weight * (self.mean_mass / self.count)[:, None]).unsqueeze(-1)

    @cached_property
    def log_mass(self) -> Tensor:
        """``[B, L]`` log masses, 0 on dead lines (finite everywhere: ``0 * log`` is never NaN)."""
        return torch.where(self.alive & (self.mass > 0), self.mass, 1.0).log_()

    def target(self, potential: Tensor) -> Tensor:
        """``[B, L]`` the marginal the optimality conditions ask for at ``potential``.

        The masses for a hard side, ``mass * exp(-potential / tau)`` for a finite one."""
        if self.hard:
            return self.mass
        return torch.where(self.alive, (self.log_mass - potential / self.tau).exp(), 0.0)

    def error(
        self, actual: Tensor, potential: Tensor, dtype: torch.dtype | None = None
    ) -> Tensor | None:
        """The fraction of mass misplaced on this side, ``[B]``.

        ``None`` for a free side (``tau = 0``: no condition to violate).

        Hard side: ``||actual - mass||_1 / total``. Finite tau: ``||actual - target||_1 /
        max(||actual||_1, ||target||_1)``, relative to the plan's own mass, so that a plan
        moving far less (or far more) mass than the masses prescribe is accurate to ``tol`` of
        itself before it is called converged (down to the mass ``dtype`` resolves, default
        ``actual``'s: :func:`uotmatch._precision.mass_resolution` of ``total``; below it, a
        plan is 0).
        """
        if self.free:
            return None
        return self.miss(actual, self.target(potential), dtype)

    def miss(self, actual: Tensor, target: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """:meth:`error` for a side that is not free, from its ``target`` ``[B, L]``."""
        miss = (actual - target).abs().sum(-1)
        if self.hard:
            return miss / self.total
        scale = torch.maximum(actual.abs().sum(-1), target.sum(-1))
        resolution = self.total * _precision.mass_resolution(dtype or scale.dtype)
        return miss / torch.maximum(scale, resolution).clamp_min(torch.finfo(scale.dtype).tiny)


def side_error(
    side: Marginal, actual: Tensor, potential: Tensor, dtype: torch.dtype | None = None
) -> Tensor:
    """:meth:`Marginal.error`, or 0 for a free side or an empty dimension, ``[B]``."""
    e = side.error(actual, potential, dtype) if actual.shape[1] else None
    return actual.new_zeros(actual.shape[0]) if e is None else e


def marginal_error(
    row_mass: Tensor,
    col_mass: Tensor,
    rows: Marginal,
    cols: Marginal,
    f: Tensor,
    g: Tensor,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Relative L1 violation of the optimality conditions on both marginals, ``[B]``.

    The larger of the two sides' :meth:`Marginal.error` (rows: ``P 1`` against ``a`` or ``a
    exp(-f / tau1)``; columns likewise)."""
    return torch.maximum(side_error(rows, row_mass, f, dtype), side_error(cols, col_mass, g, dtype))


def plan_error(
    plan: Tensor,
    f: Tensor,
    g: Tensor,
    a: Tensor,
    b: Tensor,
    tau1: float,
    tau2: float,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """:func:`marginal_error` of any plan ``[B, M, N]`` and potentials.

    For example another solver's, for masses ``a [B, M]``, ``b [B, N]``; lines of zero mass count
    as absent. ``dtype``: the dtype whose resolution of small masses applies (default the plan's;
    pass the dtype a plan was solved in when it is recomputed in a wider one)."""
    rows = Marginal(a, tau1).live(a > 0)
    cols = Marginal(b, tau2).live(b > 0)
    return marginal_error(plan.sum(-1), plan.sum(-2), rows, cols, f, g, dtype)


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
    return _precision.threshold_(x.clamp_min_(floor).exp_(), cutoff, 0.0)


@dataclass
class SolveOutput:
    """Raw solver output; shapes use B items, M rows (predictions), N columns."""

    plan: Tensor  # [B, M, N]
    f: Tensor  # [B, M]
    g: Tensor  # [B, N]
    error: Tensor  # [B]
    iterations: Tensor  # [B] int64
    converged: Tensor  # [B] bool: error <= tol and a finite plan
    imprecise: Tensor  # [B] bool: eps below what the working dtype resolves at these costs
    finite: Tensor  # [B] bool: every plan entry finite


# -- the prepared problem and the iterate ---------------------------------------------------------


@dataclass
class Solve:
    """What the steps read and never change.

    The cost in its working dtype (``+inf`` on dead lines), both sides with their alive lines,
    the schedule and the budget."""

    cost: Tensor  # [B, M, N]
    rows: Marginal
    cols: Marginal
    eps: float
    stages: list[float]
    max_iter: int
    tol: float
    check_every: int
    newton: bool  # the stages run Newton steps (_newton.first)
    rescue: bool  # items the sweeps converge too slowly for finish by Newton (_newton.applies)
    translate: bool  # translation-invariant sweeps (finite taus)
    any_dead: bool
    imprecise: Tensor  # [B] bool
    floor: float
    absorb_at: float
    log_clamp: float
    tiny: float

    @property
    def finite1(self) -> bool:
        return 0 < self.rows.tau < math.inf

    def subset(self, idx: Tensor, dtype: torch.dtype) -> Solve:
        """The same problem for the items ``idx`` only, in ``dtype``."""

        def side(m: Marginal) -> Marginal:
            assert m.cost_min is not None  # the solver's sides carry their minima
            return Marginal(
                m.mass[idx].to(dtype),
                m.tau,
                m.cost_min[idx].to(dtype),
                m.alive[idx],
                m.total[idx].to(dtype),
            )

        return replace(
            self,
            cost=self.cost[idx].to(dtype),
            rows=side(self.rows),
            cols=side(self.cols),
            imprecise=self.imprecise[idx],
            tiny=torch.finfo(dtype).tiny,
        )

    @property
    def finite2(self) -> bool:
        return 0 < self.cols.tau < math.inf


@dataclass
class State:
    """The iterate: absorbed potentials, the kernel built at them, the scalings on top.

    The potentials are ``f [B, M]``, ``g [B, N]``, the kernel ``K`` is built at them for the
    stage's ``eps``, the scalings on top (``u = exp(log_u)``, ``v = exp(log_v)``), the products
    ``Kv = K v`` and ``KTu = K^T u`` of the current scalings, and per item: still iterating
    (``active``), the over-relaxation weight, the last errors, the iterations used."""

    eps: float
    f: Tensor
    g: Tensor
    K: Tensor = field(default=None)  # type: ignore[assignment]
    log_u: Tensor = field(default=None)  # type: ignore[assignment]
    log_v: Tensor = field(default=None)  # type: ignore[assignment]
    u: Tensor = field(default=None)  # type: ignore[assignment]
    v: Tensor = field(default=None)  # type: ignore[assignment]
    Kv: Tensor = field(default=None)  # type: ignore[assignment]
    KTu: Tensor = field(default=None)  # type: ignore[assignment]
    c_u: Tensor = field(default=None)  # type: ignore[assignment]
    c_v: Tensor = field(default=None)  # type: ignore[assignment]
    active: Tensor = field(default=None)  # type: ignore[assignment]
    omega: Tensor = field(default=None)  # type: ignore[assignment]
    err: Tensor = field(default=None)  # type: ignore[assignment]
    last_err: Tensor = field(default=None)  # type: ignore[assignment]
    iterations: Tensor = field(default=None)  # type: ignore[assignment]
    it: int = 0
    #: Newton's stages (:mod:`uotmatch._newton`): the exponents ``(f + g - C) / eps`` fixed at
    #: the stage's start; the plan is ``K`` itself (the scalings ``u``, ``v`` stay 1).
    W: Tensor = field(default=None)  # type: ignore[assignment]
    #: Per item, the trust-region radius of the Newton steps, in units of eps (on the host).
    radius: list[float] | None = None

    @property
    def weight(self) -> Tensor:
        """``[B, 1]`` the sweeps' relaxation weight.

        ``omega`` for active items, 0 for frozen ones (one ``lerp`` does both)."""
        return self.omega * self.active[:, None]

    def fu(self, s: Solve) -> Tensor:
        """``[B, M]`` the rows' potentials (where a finite tau1 makes the target move)."""
        return self.f + self.eps * self.log_u if s.finite1 else self.f

    def gv(self, s: Solve) -> Tensor:
        """``[B, N]`` the columns' potentials (where a finite tau2 makes the target move)."""
        return self.g + self.eps * self.log_v if s.finite2 else self.g


def start(s: Solve, omega: float) -> State:
    """The state before the first stage.

    The warm start of :func:`uotmatch._schedule.warm_start` at the first stage's eps, every item
    active, the sweeps' relaxation weight ``omega``."""
    B = s.cost.shape[0]
    assert s.rows.cost_min is not None and s.cols.cost_min is not None
    f, g = warm_start(
        s.cost,
        s.rows.cost_min,
        s.cols.cost_min,
        s.rows.alive,
        s.cols.alive,
        s.rows.lam(s.stages[0]),
        s.cols.lam(s.stages[0]),
        s.rows.tau,
        s.cols.tau,
        # mass levels for the balanced problems Newton's stages solve (small: a short sort)
        masses=(s.rows.mass, s.cols.mass) if s.newton and s.rows.hard and s.cols.hard else None,
    )
    dt, device = s.cost.dtype, s.cost.device
    st = State(
        eps=s.stages[0],
        f=f,
        g=g,
        log_u=torch.zeros_like(f),
        log_v=torch.zeros_like(g),
        active=torch.ones(B, dtype=torch.bool, device=device),
        err=torch.full((B,), math.inf, dtype=dt, device=device),
        iterations=torch.zeros(B, dtype=torch.long, device=device),
    )
    if not s.newton:  # the sweeps' scalings and relaxation (Newton's stages set their own)
        st.u, st.v = torch.ones_like(f), torch.ones_like(g)
        st.omega = torch.full((B, 1), omega, dtype=dt, device=device)
        st.last_err = torch.full((B,), math.inf, dtype=dt, device=device)
    return st


def optimal_translation(s: Solve, st: State) -> Tensor:
    """``[B]`` the dual-optimal ``t`` along ``f + t, g - t`` (which leaves the plan unchanged).

    For finite taus (Sejourne, Vialard and Peyre, AISTATS 2022): ``t = log(<a, e^{-f/tau1}> /
    <b, e^{-g/tau2}>) / (1/tau1 + 1/tau2)``, reading ``e^{-f/inf} = 1`` and ``1/inf = 0``;
    0 for frozen items."""
    tau1, tau2 = s.rows.tau, s.cols.tau
    inv1 = 0.0 if math.isinf(tau1) else 1.0 / tau1
    inv2 = 0.0 if math.isinf(tau2) else 1.0 / tau2
    fu, gv = st.f + st.eps * st.log_u, st.g + st.eps * st.log_v
    lhs = torch.where(s.rows.alive, s.rows.log_mass - fu * inv1, -math.inf).logsumexp(-1)
    rhs = torch.where(s.cols.alive, s.cols.log_mass - gv * inv2, -math.inf).logsumexp(-1)
    t = (lhs - rhs) / (inv1 + inv2)
    return torch.where(torch.isfinite(t) & s.rows.alive.any(-1), t, 0.0) * st.active


def errors(s: Solve, st: State, rows_only: bool = False) -> tuple[Tensor, Tensor | None]:
    """``([B] rows' error, [B] columns' error)`` of the current plan ``diag(u) K diag(v)``.

    The columns' is skipped (None) with ``rows_only``."""
    rows = side_error(s.rows, st.u * st.Kv, st.fu(s))
    if rows_only:
        return rows, None
    cols = side_error(s.cols, st.v * st.KTu, st.gv(s))
    return rows, cols


def freeze(st: State, err: Tensor, tol: float) -> bool:
    """Record ``err`` and stop the items within ``tol``; True once no item is left.

    The stopped items' iterations are recorded."""
    st.err = torch.where(st.active, err, st.err)
    done = st.active & (err <= tol)
    st.iterations.masked_fill_(done, st.it)
    st.active = st.active & ~done
    return not bool(st.active.any())


def output(s: Solve, st: State) -> SolveOutput:
    """The solve's output: the plan, the potentials, and per item the error, iterations, flags.

    The plan is ``diag(u) K diag(v)``, the one the last check measured."""
    f, g = st.f + st.eps * st.log_u, st.g + st.eps * st.log_v
    if torch.is_grad_enabled():
        plan = kernel(s.cost, f, g, st.eps)  # differentiable in f, g
        row_sums = plan.sum(-1)
        err = marginal_error(row_sums, plan.sum(-2), s.rows, s.cols, f, g)
    elif s.newton:  # Newton's stages keep the plan itself in K (unit scalings)
        row_sums, plan, err = st.Kv, st.K, st.err
    else:
        row_sums = st.u * st.Kv
        plan = st.K.mul_(st.u.unsqueeze(-1)).mul_(st.v.unsqueeze(-2))  # in place: K is spent
        err = st.err
    st.iterations.masked_fill_(st.active, st.it)
    # Non-negative entries: the plan is finite iff its row sums are (NaN propagates too).
    finite = torch.isfinite(row_sums).all(-1)
    return SolveOutput(
        plan=plan,
        f=torch.where(s.rows.alive, f, 0.0),
        g=torch.where(s.cols.alive, g, 0.0),
        error=err,
        iterations=st.iterations,
        converged=(err <= s.tol) & finite & ~s.imprecise,
        imprecise=s.imprecise,
        finite=finite,
    )
