"""Independent references the tests compare against (POT, scipy), on plain numpy inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot


def with_background(C, a, b, background_cost):
    """The full ``[M, N+1]`` problem: background column last, mass ``max(sum a - sum b, 0)``."""
    M = C.shape[0]
    bg = np.broadcast_to(np.asarray(background_cost, dtype=np.float64), (M,))
    C = np.concatenate([C, bg[:, None]], axis=1)
    b = np.concatenate([b, [max(a.sum() - b.sum(), 0.0)]])
    return C, b


def pot_plan(C, a, b, eps, tau1, tau2, background_cost=None):
    """POT's ``sinkhorn_unbalanced(reg_type='entropy')`` run to machine precision."""
    if background_cost is not None:
        C, b = with_background(C, a, b, background_cost)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ot.unbalanced.sinkhorn_unbalanced(
            a,
            b,
            C,
            reg=eps,
            reg_m=(tau1, tau2),
            reg_type="entropy",
            numItermax=200_000,
            stopThr=1e-15,
        )


def uot_objective(P, C, a, b, eps, tau1, tau2):
    """The objective of the issue, evaluated directly (finite taus only on the KL terms)."""

    def kl(x, y):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(x > 0, x * np.log(x / y), 0.0)
        return t.sum() - x.sum() + y.sum()

    ent = np.where(P > 0, P * (np.log(np.where(P > 0, P, 1)) - 1), 0.0).sum()
    val = (C * P).sum() + eps * ent
    if 0 < tau1 < math.inf:  # tau = 0 drops the term (even where KL is infinite)
        val += tau1 * kl(P.sum(1), a)
    if 0 < tau2 < math.inf:
        val += tau2 * kl(P.sum(0), b)
    return val


def uot_log_domain(C, a, b, eps, tau1, tau2, iterations=20_000):
    """The entropic UOT plan by the plain log-domain fixed-point iteration (Chizat et al.,
    2018), in numpy float64: ``f = lam1 * eps * (log a - LSE_j((g_j - C_ij) / eps))`` and the
    same for ``g``, ``lam = tau / (tau + eps)``, alternated ``iterations`` times. A reference
    that, unlike POT's scaling loop, stays accurate however little mass the plan moves."""
    from scipy.special import logsumexp

    lam1, lam2 = tau1 / (tau1 + eps), tau2 / (tau2 + eps)
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for _ in range(iterations):
        f = lam1 * eps * (np.log(a) - logsumexp((g[None, :] - C) / eps, axis=1))
        g = lam2 * eps * (np.log(b) - logsumexp((f[:, None] - C) / eps, axis=0))
    return np.exp((f[:, None] + g[None, :] - C) / eps)


def uot_optimality_residual(P, C, a, b, eps, tau1, tau2):
    """How far a plan is from the optimality conditions of entropic UOT, relative to its mass:
    ``P`` must equal ``exp((f + g - C) / eps)`` for ``f = -tau1 log(P 1 / a)`` and ``g = -tau2
    log(P^T 1 / b)`` (finite taus)."""
    f = -tau1 * np.log(P.sum(1) / a)
    g = -tau2 * np.log(P.sum(0) / b)
    return np.abs(np.exp((f[:, None] + g[None, :] - C) / eps) - P).sum() / P.sum()
