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
#: The warm start reduces a large cost in chunks of items of about this many entries.
CHUNK = 2**20


def eps_schedule(
    ranges: Tensor, eps: float, decay: float, dtype: torch.dtype, min_ratio: float = MIN_EPS_RATIO
) -> list[float]:
    """Decreasing eps values ending at ``eps``, each ``decay`` times the previous one.

    Only when the estimated dual range exceeds ``min_ratio`` times eps (else just ``[eps]``).

    Starts at the spread of the alive rows' and columns' cost minima over the batch (``ranges``:
    :func:`uotmatch._precision.line_ranges`), a cheap estimate of the range of the dual
    potentials that, unlike the raw cost range, ignores large penalty constants. The whole range
    is covered, up to the precision of ``dtype``: a spread above ``eps / finfo.eps`` cannot be
    resolved anyway.
    """
    lo_rows, hi_rows, lo_cols, hi_cols = ranges.detach().tolist()  # one host sync
    spread = 0.0
    for lo, hi in ((lo_rows, hi_rows), (lo_cols, hi_cols)):
        gap = max(hi, default=-math.inf) - min(lo, default=math.inf)
        spread += gap if math.isfinite(gap) else 0.0
    stages = []
    e = min(spread, eps / torch.finfo(dtype).eps) if spread > eps * min_ratio else eps
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
    masses: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Initial potentials ``f [B, M]``, ``g [B, N]``: a (damped) c-transform of both sides.

    The longer side takes its lines' minima, the other side the c-transform against it
    (``f_i = min_j C_ij - g_j``; one pass over the cost, along its fast dimension when the
    columns are the longer side), each damped by ``lam = tau / (tau + eps)`` of the first
    stage (a ``tau = 0`` side stays at 0). Every line then has a kernel entry of about 1: none
    starts below the kernel's floor, whatever its offset (a column whose costs are all 1e6),
    which the iterations could otherwise only reach by steps of a few eps.

    With ``masses`` (the rows' and columns' ``[B, M]``, ``[B, N]``, for a balanced problem), the
    shorter side's heavy lines start at their *mass level* instead of the minimum: the reduced
    cost at which their cheapest lines of the other side, alone, hold their mass
    (:func:`_levels`; a line no heavier than every line of the other side keeps its minimum). A
    background line of mass ``Q - G``, or a ground truth that takes ``k`` anchors, then starts
    where its optimum is near rather than at its single cheapest entry. The heavy lines' reduced
    costs are sorted: the solver asks for it on small problems (Newton's stages)."""
    zero_m, zero_n = row_min.new_zeros(row_min.shape), col_min.new_zeros(col_min.shape)
    f, g = zero_m, zero_n
    if cost.numel() == 0:
        return f, g
    # ``cost`` is +inf on dead lines (the potentials there are 0), so they never win a minimum.
    if cost.shape[2] >= cost.shape[1]:  # columns the longer side: g first, then f along dim 2
        if tau2 > 0:
            g = torch.where(col_alive, lam2 * col_min, zero_n)
        if tau1 > 0:
            if masses is None:
                level = _shifted_min(cost, g[:, None, :], -1)
            else:
                level = _levels(cost - g[:, None, :], masses[0], masses[1], col_alive)
            f = torch.where(row_alive & (level < math.inf), lam1 * level, zero_m)
    else:
        if tau1 > 0:
            f = torch.where(row_alive, lam1 * row_min, zero_m)
        if tau2 > 0:
            if masses is None:
                level = _shifted_min(cost, f[..., None], 1)
            else:
                level = _levels((cost - f[..., None]).mT, masses[1], masses[0], row_alive)
            g = torch.where(col_alive & (level < math.inf), lam2 * level, zero_n)
    return f, g


def _shifted_min(cost: Tensor, shift: Tensor, dim: int) -> Tensor:
    """``(cost - shift).amin(dim)`` for ``cost [B, M, N]``, a few items at a time.

    ``shift`` broadcasts against ``cost``. A temporary the size of a large cost is a fresh
    allocation (every page faults on first touch) and a pass through memory: on the dense
    ``[16, 21, 20000]`` float64 benchmark 15 ms, against 3 ms in chunks of ``CHUNK`` entries."""
    per = max(1, CHUNK // max(1, cost[0].numel()))
    if per >= cost.shape[0]:
        return (cost - shift).amin(dim)
    chunks = range(0, cost.shape[0], per)
    return torch.cat([(cost[i : i + per] - shift[i : i + per]).amin(dim) for i in chunks])


def _levels(reduced: Tensor, mass: Tensor, other: Tensor, other_alive: Tensor):
    """``[B, L]`` the mass level of each line of ``reduced [B, L, K]``.

    Its reduced costs to the other side's ``K`` lines, of masses ``other [B, K]``: the smallest
    reduced cost at which its cheapest lines hold its ``mass [B, L]`` (its minimum where its
    finite ones cannot). Only the lines heavier than every line of the other side (a background
    line, a ground truth that takes several anchors) are sorted; the others start at their
    minimum."""
    other = torch.where(other_alive, other, 0.0)
    low = reduced.amin(-1)  # [B, L]
    need = mass * (1 - 1e-9)
    heavy = torch.nonzero(need > other.amax(-1, keepdim=True))  # [n, 2]: (item, line)
    if not len(heavy):
        return low
    b, i = heavy.unbind(1)
    values, order = reduced[b, i].sort(-1)  # [n, K]
    short = other[b].gather(1, order).cumsum(-1) < need[b, i, None]  # not yet holding it
    at = short.sum(-1, keepdim=True)  # the first position that holds it (K: none does)
    level = values.gather(-1, at.clamp_max(reduced.shape[-1] - 1)).squeeze(-1)
    return low.index_put((b, i), torch.where(at.squeeze(-1) < reduced.shape[-1], level, low[b, i]))
