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

#: Convergence is measured (one host sync) every this many iterations.
CHECK_EVERY = 10
#: ``|log u|`` or ``|log v|`` above this folds the scalings into the potentials.
ABSORB_THRESHOLD = 30.0
#: Between checks, ``log u`` and ``log v`` are clamped to this (no overflow before the next
#: absorption; a clamped step is only a shorter step of the same fixed-point iteration).
LOG_SCALING_CLAMP = 50.0
#: Ratio between consecutive eps-scaling stages.
EPS_DECAY = 0.5
#: The first eps-scaling stage starts at most this many times above the target eps.
MAX_EPS_RATIO = 2.0**12
#: Scaling iterations spent at each intermediate eps-scaling stage.
STAGE_ITERS = 3


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
    """``exp((f_i + g_j - C_ij) / eps)`` as ``[B, M, N]``, fused into one ``baddbmm``."""
    ones_m = torch.ones_like(f)
    ones_n = torch.ones_like(g)
    left = torch.stack([f, ones_m], dim=-1)  # [B, M, 2]
    right = torch.stack([ones_n, g], dim=-2)  # [B, 2, N]
    x = torch.baddbmm(cost, left, right, beta=-1.0)  # f_i + g_j - C_ij
    return x.div_(eps).exp_()


def _relative_l1(actual: Tensor, log_target: Tensor, alive: Tensor) -> Tensor:
    """``sum |actual - target| / sum target`` over the alive entries of each item, ``[B]``."""
    target = torch.where(alive, log_target.exp(), torch.zeros_like(actual))
    actual = torch.where(alive, actual, torch.zeros_like(actual))
    num = (actual - target).abs().sum(-1)
    den = target.sum(-1)
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
    plan: Tensor,
    f: Tensor,
    g: Tensor,
    log_a: Tensor,
    log_b: Tensor,
    tau1: float,
    tau2: float,
    row_alive: Tensor,
    col_alive: Tensor,
) -> Tensor:
    """Relative L1 violation of the optimality conditions on both marginals, ``[B]``.

    For each side, ``||P 1 - a exp(-f / tau1)||_1 / ||a exp(-f / tau1)||_1`` (the fraction of mass
    misplaced; ``a`` itself when ``tau1 = inf``; nothing when ``tau1 = 0``); the larger side wins.
    """
    err = plan.new_zeros(plan.shape[0])
    rows = _log_target(log_a, f, tau1)
    if rows is not None:
        err = torch.maximum(err, _relative_l1(plan.sum(-1), rows, row_alive))
    cols = _log_target(log_b, g, tau2)
    if cols is not None:
        err = torch.maximum(err, _relative_l1(plan.sum(-2), cols, col_alive))
    return err


def eps_schedule(cost: Tensor, alive: Tensor, eps: float) -> list[float]:
    """Decreasing eps values ending at ``eps``, starting near the spread of the finite costs."""
    finite = cost[alive & torch.isfinite(cost)]
    if finite.numel() == 0:
        return [eps]
    span = float(finite.max() - finite.min())
    start = min(span, eps * MAX_EPS_RATIO)
    stages = []
    e = start
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
    """
    B, M, N = cost.shape
    finite = torch.isfinite(cost)
    # A line with only forbidden entries, or zero mass under a tau > 0 (KL to 0 forces it
    # empty), carries nothing: exactly zero plan, potential pinned to 0, excluded from the error.
    row_alive = finite.any(-1) & (torch.isfinite(log_a) | (tau1 == 0))  # [B, M]
    col_alive = finite.any(-2) & (torch.isfinite(log_b) | (tau2 == 0))  # [B, N]
    dead = ~row_alive[..., None] | ~col_alive[:, None, :]
    cost = cost.masked_fill(dead, math.inf)
    # With tau = 0 the masses play no part; keep the logs finite so 0 * log never is NaN.
    log_a = torch.where(row_alive & torch.isfinite(log_a), log_a, torch.zeros_like(log_a))
    log_b = torch.where(col_alive & torch.isfinite(log_b), log_b, torch.zeros_like(log_b))
    tiny = torch.finfo(cost.dtype).tiny

    # Warm start so each row has a kernel entry of 1 (no underflow at the first stage).
    masked = cost.masked_fill(~torch.isfinite(cost), math.inf)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    if tau1 > 0:
        f = torch.where(row_alive, masked.amin(-1), f)
    elif tau2 > 0:
        g = torch.where(col_alive, masked.amin(-2), g)

    stages = eps_schedule(cost, row_alive[..., None] & col_alive[:, None, :], eps)
    active = torch.ones(B, dtype=torch.bool, device=cost.device)
    iterations = torch.zeros(B, dtype=torch.long, device=cost.device)
    it = 0
    for stage, eps_s in enumerate(stages):
        last = stage == len(stages) - 1
        lam1, lam2 = damping(tau1, eps_s), damping(tau2, eps_s)
        K = kernel(cost, f, g, eps_s)
        log_u = torch.zeros_like(f)
        log_v = torch.zeros_like(g)
        Kv = K.sum(-1)  # K @ 1
        budget = max_iter - it if last else min(STAGE_ITERS, max_iter - it - 1)
        for k in range(max(budget, 0)):
            new_u = lam1 * (log_a - Kv.clamp_min(tiny).log()) - (1 - lam1) * f / eps_s
            new_u = torch.where(row_alive, new_u, torch.zeros_like(new_u))
            new_u = new_u.clamp(-LOG_SCALING_CLAMP, LOG_SCALING_CLAMP)
            log_u = torch.where(active[:, None], new_u, log_u)
            KTu = torch.bmm(log_u.exp().unsqueeze(1), K).squeeze(1)  # [B, N]
            new_v = lam2 * (log_b - KTu.clamp_min(tiny).log()) - (1 - lam2) * g / eps_s
            new_v = torch.where(col_alive, new_v, torch.zeros_like(new_v))
            new_v = new_v.clamp(-LOG_SCALING_CLAMP, LOG_SCALING_CLAMP)
            log_v = torch.where(active[:, None], new_v, log_v)
            Kv = torch.bmm(K, log_v.exp().unsqueeze(-1)).squeeze(-1)  # [B, M]
            it += 1
            if not last or ((k + 1) % CHECK_EVERY and k + 1 < budget):
                continue
            # Columns satisfy their condition exactly after the v-step; measure the rows.
            rows = _log_target(log_a, f + eps_s * log_u, tau1)
            err = (
                torch.zeros(B, dtype=cost.dtype, device=cost.device)
                if rows is None
                else _relative_l1(log_u.exp() * Kv, rows, row_alive)
            )
            done = active & (err <= tol)
            iterations = torch.where(done, torch.full_like(iterations, it), iterations)
            active = active & ~done
            if not bool(active.any()):
                break
            if max(float(log_u.abs().max()), float(log_v.abs().max())) > ABSORB_THRESHOLD:
                f, g = f + eps_s * log_u, g + eps_s * log_v
                K = kernel(cost, f, g, eps_s)
                log_u = torch.zeros_like(f)
                log_v = torch.zeros_like(g)
                Kv = K.sum(-1)
        f, g = f + eps_s * log_u, g + eps_s * log_v

    iterations = torch.where(active, torch.full_like(iterations, it), iterations)
    plan = kernel(cost, f, g, eps)
    error = marginal_error(plan, f, g, log_a, log_b, tau1, tau2, row_alive, col_alive)
    return SinkhornOutput(
        plan=plan,
        f=torch.where(row_alive, f, torch.zeros_like(f)),
        g=torch.where(col_alive, g, torch.zeros_like(g)),
        error=error,
        iterations=iterations,
        converged=error <= tol,
    )
