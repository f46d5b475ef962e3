"""The exact eps = 0 limits, computed combinatorially (no iterations).

* ``tau1 = inf, tau2 = 0``: each row sends its mass to its cheapest column(s).
* ``tau1 = 0, tau2 = inf``: each column receives its mass from its cheapest row(s).
* ``tau1 = tau2 = inf``: exact balanced transport (Hungarian / network simplex).

In the first two, ties split the mass evenly, as the eps -> 0+ limit of the entropic plan does.
All functions take ``[B, M, N]`` float64 costs with ``+inf`` on forbidden or masked entries, and
masses ``a [B, M]``, ``b [B, N]`` with the background column (if any) already appended.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

#: ``ot.emd`` network-simplex iteration budget (its default of 1e5 is too low for OTA sizes).
EMD_MAX_ITER = 10_000_000

Potentials = tuple[Tensor, Tensor]


def nearest_column(cost: Tensor, a: Tensor) -> tuple[Tensor, Potentials]:
    """``tau1 = inf, tau2 = 0``: the mass of row i goes to ``argmin_j C_ij`` (ties split evenly)."""
    best = cost.amin(-1, keepdim=True)  # [B, M, 1]
    ties = (cost == best) & torch.isfinite(best)
    plan = ties * (a / ties.sum(-1).clamp_min(1))[..., None]
    f = torch.where(torch.isfinite(best[..., 0]), best[..., 0], torch.zeros_like(a))
    return plan.to(cost.dtype), (f, cost.new_zeros(cost.shape[0], cost.shape[2]))


def nearest_row(cost: Tensor, b: Tensor) -> tuple[Tensor, Potentials]:
    """``tau1 = 0, tau2 = inf``: column j receives its mass from ``argmin_i C_ij`` (ties split)."""
    plan_t, (g, f) = nearest_column(cost.transpose(-1, -2), b)
    return plan_t.transpose(-1, -2), (f, g)


def _infeasible(item: int) -> ValueError:
    return ValueError(
        f"cost: item {item} has no feasible plan with tau1 = tau2 = inf: its allowed (finite) "
        "entries cannot carry the prescribed masses. Allow more pairs, add a background column, "
        "or use a finite tau."
    )


def _emd(cost: np.ndarray, a: np.ndarray, b: np.ndarray, item: int):
    """Network simplex on one item; forbidden entries are priced out, then checked unused."""
    finite = np.isfinite(cost)
    span = float(np.abs(cost[finite]).max()) + 1.0 if finite.any() else 1.0
    # Any plan through a priced-out entry costs more than every plan avoiding them.
    priced = np.where(finite, cost, span * (a.sum() + b.sum() + 1.0) * 4.0)
    plan, log = ot.emd(a, b, priced, numItermax=EMD_MAX_ITER, log=True)
    if log.get("warning"):
        raise RuntimeError(f"ot.emd did not solve item {item}: {log['warning']}")
    if plan[~finite].sum() > 1e-9 * max(a.sum(), 1.0):
        raise _infeasible(item)
    return plan, log["u"], log["v"]


def balanced(
    cost: Tensor, a: Tensor, b: Tensor, has_background: bool
) -> tuple[Tensor, Callable[[], Potentials]]:
    """``tau1 = tau2 = inf``: an optimal vertex of the exact transport polytope.

    With unit masses (every row and every real column 1) and a finite background cost it is a
    rectangular Hungarian problem on ``C_ij - C_i,bg`` (rows left unmatched pay the background);
    otherwise POT's network simplex ``ot.emd``. The dual potentials are computed on first access.
    """
    C = cost.detach().cpu().numpy()
    A = a.detach().cpu().numpy()
    Bm = b.detach().cpu().numpy()
    plan = np.zeros_like(C)
    fast = _unit_hungarian_with_background(C, A, Bm, has_background, plan)
    for i in range(C.shape[0]):
        if fast:
            break
        rows = np.flatnonzero(A[i] > 0)
        cols = np.flatnonzero(Bm[i] > 0)
        if rows.size == 0 or cols.size == 0:
            continue
        c = C[i][np.ix_(rows, cols)]
        ai, bi = A[i][rows], Bm[i][cols]
        bg_last = has_background and cols[-1] == C.shape[2] - 1
        n_real = cols.size - 1 if bg_last else cols.size
        unit = np.all(ai == 1.0) and np.all(bi[:n_real] == 1.0)
        if unit and not bg_last:
            plan[i][np.ix_(rows, cols)] = _hungarian(c, item=i)
        elif unit and np.all(np.isfinite(c[:, -1])):
            sub = np.zeros_like(c)
            sub[:, :n_real] = _hungarian(c[:, :n_real] - c[:, -1:], item=i)
            sub[:, -1] = 1.0 - sub[:, :n_real].sum(1)
            plan[i][np.ix_(rows, cols)] = sub
        else:
            plan[i][np.ix_(rows, cols)] = _emd(c, ai, bi, item=i)[0]

    def potentials() -> Potentials:
        f, g = np.zeros(C.shape[:2]), np.zeros((C.shape[0], C.shape[2]))
        for i in range(C.shape[0]):
            rows = np.flatnonzero(A[i] > 0)
            cols = np.flatnonzero(Bm[i] > 0)
            if rows.size and cols.size:
                c = C[i][np.ix_(rows, cols)]
                _, f[i, rows], g[i, cols] = _emd(c, A[i][rows], Bm[i][cols], item=i)
        return (torch.from_numpy(f).to(cost), torch.from_numpy(g).to(cost))

    return torch.from_numpy(plan).to(cost), potentials


def _unit_hungarian_with_background(C, A, Bm, has_background, plan) -> bool:
    """The DETR case for the whole batch at once, when it applies.

    Unit masses, every real column present, a finite background with positive mass. Fills
    ``plan``; False if not applicable."""
    n_real = C.shape[2] - 1
    if not has_background or n_real < 1 or not np.all(A == 1.0):
        return False
    if not (np.all(Bm[:, :n_real] == 1.0) and np.all(Bm[:, -1] > 0)):
        return False
    if not np.all(np.isfinite(C[:, :, -1])):
        return False
    sub = C[:, :, :n_real] - C[:, :, -1:]  # [B, M, N]: cost relative to staying background
    plan[:, :, -1] = 1.0
    for i in range(C.shape[0]):
        r, c = linear_sum_assignment_or_raise(sub[i], item=i)
        plan[i, r, c] = 1.0
        plan[i, r, -1] = 0.0
    return True


def linear_sum_assignment_or_raise(cost: np.ndarray, item: int):
    try:
        return linear_sum_assignment(cost)
    except ValueError as exc:  # scipy: "cost matrix is infeasible"
        raise _infeasible(item) from exc


def _hungarian(cost: np.ndarray, item: int) -> np.ndarray:
    """0/1 plan of ``linear_sum_assignment`` (every column matched when ``N <= M``)."""
    r, c = linear_sum_assignment_or_raise(cost, item)
    out = np.zeros_like(cost)
    out[r, c] = 1.0
    return out
