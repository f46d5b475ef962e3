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
