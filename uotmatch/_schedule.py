"""Where the iterations start: the eps-scaling schedule and the warm start of the potentials.

Small eps is reached by eps-scaling: a geometric schedule of decreasing eps from the estimated
range of the dual potentials, each stage warm-started from the previous one's potentials. The
first stage starts from a (damped) c-transform of both sides, so that every line has a kernel
entry of 1 whatever its cost offset (a column whose costs are all 1e6 is served).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MIN_EPS_RATIO", "eps_schedule", "warm_start"]

#: No eps-scaling unless the estimated dual range exceeds this many times eps.
MIN_EPS_RATIO = 64.0


def eps_schedule(
    row_min: Tensor, col_min: Tensor, eps: float, decay: float, min_ratio: float = MIN_EPS_RATIO
) -> list[float]:
    """Decreasing eps values ending at ``eps``, each ``decay`` times the previous one.

    Only when the estimated dual range exceeds ``min_ratio`` times eps (else just ``[eps]``).

    Starts at the spread of the row and column minima (alive lines only; pass ``+inf`` for dead
    ones), a cheap estimate of the range of the dual potentials that, unlike the raw cost range,
    ignores large penalty constants. The whole range is covered, up to the precision of the
    dtype: a spread above ``eps / finfo.eps`` cannot be resolved anyway.
    """
    gaps = []
    for mins in (row_min, col_min):  # dead lines hold +inf
        if mins.numel():
            lo = mins.amin()
            gaps.append(torch.where(mins < math.inf, mins, lo).amax() - lo)
    finite = torch.stack(gaps).detach().tolist() if gaps else []  # one host sync for both
    spread = sum(g for g in finite if math.isfinite(g))
    stages = []
    e = min(spread, eps / torch.finfo(row_min.dtype).eps) if spread > eps * min_ratio else eps
    while e > eps:
        stages.append(e)
        e *= decay
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
