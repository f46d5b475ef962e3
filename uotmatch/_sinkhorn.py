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
a geometric schedule of decreasing eps, each stage warm-started from the previous potentials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: On CUDA, convergence is measured (one host sync) every this many iterations; on CPU, where a
#: check costs no sync, every iteration.
CHECK_EVERY_CUDA = 10
#: ``|log u|`` or ``|log v|`` above this folds the scalings into the potentials.
ABSORB_THRESHOLD = 30.0
#: Between checks, ``log u`` and ``log v`` are clamped to this (no overflow before the next
#: absorption; a clamped step is only a shorter step of the same fixed-point iteration).
LOG_CLAMP = 50.0
#: Kernel entries ``exp(x)`` with ``x`` below this are set to 0 (far from subnormal numbers).
KERNEL_LOG_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
#: Ratio between consecutive eps-scaling stages.
EPS_DECAY = 0.5
#: The first eps-scaling stage starts at most this many times above the target eps.
MAX_EPS_RATIO = 2.0**12
#: No eps-scaling unless the estimated dual range exceeds this many times eps.
MIN_EPS_RATIO = 64.0
#: Scaling iterations spent at each intermediate eps-scaling stage.
STAGE_ITERS = 10
#: Over-relaxation weight (1 = plain Sinkhorn); items whose error grows fall back to 1.
OMEGA = 1.5


@dataclass
class SinkhornOutput:
    """Raw solver output; shapes use B items, M rows (predictions), N columns."""

    plan: Tensor  # [B, M, N]
    f: Tensor  # [B, M]
    g: Tensor  # [B, N]
    error: Tensor  # [B]
    iterations: Tensor  # [B] int64
    converged: Tensor  # [B] bool


def damping(tau: float, eps: float) -> float:
    """``tau / (tau + eps)``: the exponent of the scaling update (OTT's ``tau_a``)."""
    if math.isinf(tau):
        return 1.0
    return tau / (tau + eps)


def kernel(cost: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """``exp((f_i + g_j - C_ij) / eps)`` as ``[B, M, N]``.

    Entries below ``exp(KERNEL_LOG_FLOOR)`` are exactly 0 (forbidden pairs included): on CPU,
    ``exp`` is ~20x slower when its result is subnormal or its argument is huge or -inf.
    """
    left = torch.stack([f, torch.ones_like(f)], dim=-1)  # [B, M, 2]
    right = torch.stack([torch.ones_like(g), g], dim=-2)  # [B, 2, N]
    x = torch.baddbmm(cost, left, right, beta=-1.0 / eps, alpha=1.0 / eps)  # (f + g - C) / eps
    floor = KERNEL_LOG_FLOOR[cost.dtype]
    cutoff = math.exp(floor) * (1 + 1e-4)
    if torch.is_grad_enabled() and x.requires_grad:  # autograd needs exp's output intact
        return torch.nn.functional.threshold(x.clamp_min(floor).exp(), cutoff, 0.0)
    return torch.nn.functional.threshold_(x.clamp_min_(floor).exp_(), cutoff, 0.0)


def _relative_l1(actual: Tensor, log_target: Tensor, log_mass: Tensor, alive: Tensor) -> Tensor:
    """``sum |actual - target| / sum mass`` over the alive entries of each item, ``[B]``.

    Normalised by the prescribed masses, not by the target: where the optimum moves almost no
    mass (tau small against the costs) the error stays a fraction of the problem's mass.
    """
    zero = torch.zeros_like(actual)
    target = torch.where(alive, log_target.exp(), zero)
    num = (torch.where(alive, actual, zero) - target).abs().sum(-1)
    den = torch.where(alive, log_mass.exp(), zero).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), num)


def _log_target(log_mass: Tensor, potential: Tensor, tau: float) -> Tensor | None:
    """Log of the marginal the optimum must have: ``mass * exp(-potential / tau)``.

    ``None`` when ``tau = 0``: that marginal is free, so it has no condition to violate.
    """
    if tau == 0:
        return None
    if math.isinf(tau):
        return log_mass
    return log_mass - potential / tau


def marginal_error(
    row_mass: Tensor,
    col_mass: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    f: Tensor,
    g: Tensor,
    tau1: float,
    tau2: float,
    row_alive: Tensor,
    col_alive: Tensor,
) -> Tensor:
    """Relative L1 violation of the optimality conditions on both marginals, ``[B]``.

    For the rows, ``||P 1 - a exp(-f / tau1)||_1 / ||a||_1`` (the fraction of mass misplaced;
    the target is ``a`` itself when ``tau1 = inf``; a ``tau1 = 0`` side has no condition), and
    likewise for the columns; the larger side wins.
    """
    err = (
        torch.zeros_like(row_mass[:, 0]) if row_mass.shape[1] else row_mass.new_zeros(len(row_mass))
    )
    rows = _log_target(log_a, f, tau1)
    if rows is not None and row_mass.shape[1]:
        err = torch.maximum(err, _relative_l1(row_mass, rows, log_a, row_alive))
    cols = _log_target(log_b, g, tau2)
    if cols is not None and col_mass.shape[1]:
        err = torch.maximum(err, _relative_l1(col_mass, cols, log_b, col_alive))
    return err


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
    ignores large penalty constants, and at most ``MAX_EPS_RATIO`` times ``eps``.
    """
    spread = 0.0
    for mins in (row_min, col_min):
        alive = mins[torch.isfinite(mins)]
        if alive.numel():
            spread += float((alive.max() - alive.min()).detach())
    stages = []
    e = min(spread, eps * MAX_EPS_RATIO) if spread > eps * MIN_EPS_RATIO else eps
    while e > eps:
        stages.append(e)
        e *= EPS_DECAY
    return stages + [eps]


def sinkhorn(
    cost: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    eps: float,
    tau1: float,
    tau2: float,
    max_iter: int,
    tol: float,
    row_min: Tensor | None = None,
    col_min: Tensor | None = None,
) -> SinkhornOutput:
    """Solve a batch of entropic UOT problems.

    Args:
        cost: ``[B, M, N]`` finite or ``+inf`` (forbidden pair) costs.
        log_a: ``[B, M]`` log row masses (``-inf`` for zero mass).
        log_b: ``[B, N]`` log column masses (``-inf`` for zero mass or a masked column).
        eps: entropic regularisation, ``> 0``.
        tau1, tau2: marginal penalties in ``[0, inf]``.
        max_iter: total scaling iterations (eps-scaling stages included).
        tol: stop an item once its relative marginal error is at most this.
        row_min, col_min: ``cost.amin(-1)`` and ``cost.amin(-2)`` if the caller has them.
    """
    B, M, N = cost.shape
    row_min = cost.amin(-1) if row_min is None else row_min  # [B, M]
    col_min = cost.amin(-2) if col_min is None else col_min  # [B, N]
    # A line with only forbidden entries, or zero mass under a tau > 0 (KL to 0 forces it
    # empty), carries nothing: exactly zero plan, potential pinned to 0, excluded from the error.
    row_alive = (row_min < math.inf) & (torch.isfinite(log_a) | (tau1 == 0))  # [B, M]
    col_alive = (col_min < math.inf) & (torch.isfinite(log_b) | (tau2 == 0))  # [B, N]
    if not bool(row_alive.all() and col_alive.all()):
        dead = ~row_alive[..., None] | ~col_alive[:, None, :]
        cost = cost.masked_fill(dead, math.inf)
        row_min = torch.where(row_alive, row_min, math.inf)
        col_min = torch.where(col_alive, col_min, math.inf)
    # With tau = 0 the masses play no part; keep the logs finite so 0 * log never is NaN.
    zero_m, zero_n = torch.zeros_like(log_a), torch.zeros_like(log_b)
    log_a = torch.where(row_alive & torch.isfinite(log_a), log_a, zero_m)
    log_b = torch.where(col_alive & torch.isfinite(log_b), log_b, zero_n)
    tiny = torch.finfo(cost.dtype).tiny

    # Warm start so each row has a kernel entry of 1 (no underflow at the first stage).
    f, g = zero_m, zero_n
    if tau1 > 0:
        f = torch.where(row_alive, row_min, zero_m)
    elif tau2 > 0:
        g = torch.where(col_alive, col_min, zero_n)

    translate = 0 < tau1 and 0 < tau2 and not (math.isinf(tau1) and math.isinf(tau2))
    check_every = CHECK_EVERY_CUDA if cost.is_cuda else 1
    stages = eps_schedule(row_min, col_min, eps)
    active = torch.ones(B, dtype=torch.bool, device=cost.device)
    omega = torch.full((B, 1), OMEGA, dtype=cost.dtype, device=cost.device)
    last_err = torch.full((B,), math.inf, dtype=cost.dtype, device=cost.device)
    iterations = torch.zeros(B, dtype=torch.long, device=cost.device)
    it = 0
    for stage, eps_s in enumerate(stages):
        final = stage == len(stages) - 1
        lam1, lam2 = damping(tau1, eps_s), damping(tau2, eps_s)
        K = kernel(cost, f, g, eps_s)
        log_u, log_v = zero_m, zero_n
        Kv = K.sum(-1)  # K @ 1
        budget = max_iter - it if final else min(STAGE_ITERS, max_iter - it - 1)
        for k in range(max(budget, 0)):
            # u-step, over-relaxed: log u <- (1 - w) log u + w * update.
            new_u = lam1 * (log_a - Kv.clamp_min(tiny).log()) - (1 - lam1) * f / eps_s
            new_u = torch.where(row_alive, (1 - omega) * log_u + omega * new_u, zero_m)
            log_u = torch.where(active[:, None], new_u.clamp(-LOG_CLAMP, LOG_CLAMP), log_u)
            KTu = torch.bmm(log_u.exp().unsqueeze(1), K).squeeze(1)  # [B, N]
            new_v = lam2 * (log_b - KTu.clamp_min(tiny).log()) - (1 - lam2) * g / eps_s
            new_v = torch.where(col_alive, (1 - omega) * log_v + omega * new_v, zero_n)
            log_v = torch.where(active[:, None], new_v.clamp(-LOG_CLAMP, LOG_CLAMP), log_v)
            col_mass = log_v.exp() * KTu  # [B, N], unchanged by the translation below
            if translate:
                # Translation-invariant step (Sejourne et al., AISTATS 2022): f + t, g - t leaves
                # the plan unchanged; the dual-optimal t removes Sinkhorn's slow mass mode.
                fu, gv = f + eps_s * log_u, g + eps_s * log_v
                t = _optimal_translation(log_a, log_b, fu, gv, tau1, tau2, row_alive, col_alive)
                t = torch.where(active, t, torch.zeros_like(t))[:, None] / eps_s
                log_u = (log_u + t).clamp(-LOG_CLAMP, LOG_CLAMP)
                log_v = (log_v - t).clamp(-LOG_CLAMP, LOG_CLAMP)
            # v^T K^T rather than K v: a row-vector times the transposed view is ~8x faster on
            # CPU for the tall, thin kernels of detection (M >> N).
            Kv = torch.bmm(log_v.exp().unsqueeze(1), K.mT).squeeze(1)  # [B, M]
            it += 1
            if not final or ((k + 1) % check_every and k + 1 < budget):
                continue
            err = marginal_error(
                log_u.exp() * Kv,
                col_mass,
                log_a,
                log_b,
                f + eps_s * log_u,
                g + eps_s * log_v,
                tau1,
                tau2,
                row_alive,
                col_alive,
            )
            done = active & (err <= tol)
            iterations = torch.where(done, torch.full_like(iterations, it), iterations)
            active = active & ~done
            # Over-relaxation is not monotone far from the optimum: an item whose error grew
            # falls back to plain Sinkhorn for good.
            omega = torch.where((err > last_err)[:, None], torch.ones_like(omega), omega)
            last_err = err
            if not bool(active.any()):
                break
            if (
                float(torch.maximum(log_u.abs().max(), log_v.abs().max()).detach())
                > ABSORB_THRESHOLD
            ):
                f, g = f + eps_s * log_u, g + eps_s * log_v
                K = kernel(cost, f, g, eps_s)
                log_u, log_v = zero_m, zero_n
                Kv = K.sum(-1)
        if final and not torch.is_grad_enabled():
            # diag(u) K diag(v), in place: the plan at the final potentials without a new exp.
            plan = K.mul_(log_u.exp().unsqueeze(-1)).mul_(log_v.exp().unsqueeze(-2))
        f, g = f + eps_s * log_u, g + eps_s * log_v

    if torch.is_grad_enabled():
        plan = kernel(cost, f, g, eps)
    iterations = torch.where(active, torch.full_like(iterations, it), iterations)
    error = marginal_error(
        plan.sum(-1), plan.sum(-2), log_a, log_b, f, g, tau1, tau2, row_alive, col_alive
    )
    return SinkhornOutput(
        plan=plan,
        f=torch.where(row_alive, f, zero_m),
        g=torch.where(col_alive, g, zero_n),
        error=error,
        iterations=iterations,
        converged=error <= tol,
    )
