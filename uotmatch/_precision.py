"""The floating-point policy of the solver, in one place.

Which dtype a problem is solved in, when an item cannot be resolved at all, the kernel's floor
and the scalings' bounds, and the cast of the plan back to the caller's dtype.

* Half precision (float16, bfloat16) is computed in float32; float32 and float64 as given.
* A float32 problem is solved in float64 when float32 cannot resolve eps at its costs (rounding
  the kernel's exponents ``(f + g - C) / eps`` errs by more than ``PRECISION``: ``|C| / eps``
  above about 8e3), or when its plan could hold entries above ``exp(LOG_SAFE[float32])``.
* An item is *imprecise* when even its working dtype errs by more than ``PRECISION`` there (its
  iterations cannot settle): its status says ``"precision"``.
* The plan comes back in the caller's dtype; entries beyond that dtype's range are an error.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ABSORB_FRACTION",
    "CLAMP_FRACTION",
    "KERNEL_LOG_FLOOR",
    "LOG_SAFE",
    "PRECISION",
    "cast_plan",
    "imprecise",
    "line_ranges",
    "mass_resolution",
    "needs_float64",
    "overflow_error",
    "plan_log_bound",
    "potential_magnitude",
    "working_dtype",
]

#: The largest relative rounding error of the kernel's exponents a solve accepts.
PRECISION = 1e-3
#: A plan entry may reach ``exp(LOG_SAFE[dtype])`` without overflowing the iterations' products.
LOG_SAFE = {torch.float32: 60.0, torch.float64: 650.0}
#: Kernel entries ``exp(x)`` with ``x`` below this are set to 0 (far from subnormal numbers).
KERNEL_LOG_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}
#: ``|log u|`` or ``|log v|`` above ``|KERNEL_LOG_FLOOR| / ABSORB_FRACTION`` folds the scalings
#: into the potentials and rebuilds the kernel (22.9 in float32, 200 in float64); it must stay
#: below the clamp, which bounds each side by ``|KERNEL_LOG_FLOOR| / CLAMP_FRACTION`` (26.7,
#: 233). Entries floored at build time then stay below exp(floor / 3) (1e-12 in float32).
ABSORB_FRACTION = 3.5
CLAMP_FRACTION = 3.0


def mass_resolution(dtype: torch.dtype) -> float:
    """The smallest relative mass whose plan a solve in ``dtype`` resolves to ``tol`` of itself.

    Relative to the masses prescribed: ``exp(KERNEL_LOG_FLOOR / 2)`` (4e-18 in float32, 1e-152 in
    float64), far above the kernel's floor, where the entries of such a plan are cut to 0."""
    floor = KERNEL_LOG_FLOOR.get(dtype, math.log(torch.finfo(dtype).tiny))
    return math.exp(floor / 2)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a cost of ``dtype`` is validated and solved in, before the precision checks.

    Float64 stays, everything else (half precision included) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def imprecise(magnitude: Tensor, dtype: torch.dtype, eps: float) -> Tensor:
    """``[B]``: the item's potentials are rounded in ``dtype`` by more than ``PRECISION * eps``.

    The potentials are of size ``magnitude``."""
    return magnitude * torch.finfo(dtype).eps > PRECISION * eps


def needs_float64(magnitude: Tensor, log_bound: Tensor, dtype: torch.dtype, eps: float) -> bool:
    """A float32 problem that float32 cannot resolve or iterate on.

    Some item cannot be resolved, or its plan could overflow float32's iterations."""
    if dtype != torch.float32:
        return False
    return bool((imprecise(magnitude, dtype, eps) | (log_bound > LOG_SAFE[dtype])).any())


def line_ranges(row_min: Tensor, col_min: Tensor, row_alive: Tensor, col_alive: Tensor) -> Tensor:
    """``[4, B]`` per item, the lowest and highest cost minimum of the alive rows, then columns.

    ``+inf`` and ``-inf`` where a side has no alive line. What the precision policy
    (:func:`potential_magnitude`) and the eps schedule (:func:`uotmatch._schedule.eps_schedule`)
    read of the lines."""
    B = row_min.shape[0]
    out = []
    for mins, alive in ((row_min, row_alive), (col_min, col_alive)):
        if mins.shape[1]:
            out += [
                torch.where(alive, mins, math.inf).amin(-1),
                torch.where(alive, mins, -math.inf).amax(-1),
            ]
        else:
            out += [mins.new_full((B,), math.inf), mins.new_full((B,), -math.inf)]
    return torch.stack(out)


def potential_magnitude(
    ranges: Tensor,
    row_alive: Tensor,
    col_alive: Tensor,
    row_mass: Tensor,
    col_mass: Tensor,
    tau1: float,
    tau2: float,
) -> Tensor:
    """``[B]`` the size of the potentials.

    The largest line minimum of the costs (``ranges``: :func:`line_ranges`; an absorbed potential
    is of that size, and the kernel's exponents are rounded at it), plus, with two finite taus,
    the shift ``tau1 tau2 / (tau1 + tau2) |log(sum a / sum b)|`` that unequal total masses give
    them (``tau |log(sum a / sum b)|`` when only one tau is finite: that side's potentials absorb
    the whole ratio)."""
    magnitude = torch.where(torch.isfinite(ranges), ranges.abs(), 0.0).amax(0)
    finite1, finite2 = 0 < tau1 < math.inf, 0 < tau2 < math.inf
    if finite1 or finite2:
        total_a = torch.where(row_alive, row_mass, 0.0).sum(-1)
        total_b = torch.where(col_alive, col_mass, 0.0).sum(-1)
        ratio = (total_a.log() - total_b.log()).nan_to_num(0.0, 0.0, 0.0).abs()
        if finite1 and finite2:
            tau = tau1 * tau2 / (tau1 + tau2)
        elif math.isinf(tau1) or math.isinf(tau2):  # the finite side absorbs the whole ratio
            tau = tau2 if finite2 else tau1
        else:  # a free side (tau = 0) takes any mass: no shift
            tau = 0.0
        magnitude = magnitude + tau * ratio
    return magnitude


def plan_log_bound(
    row_min: Tensor,
    row_alive: Tensor,
    col_alive: Tensor,
    row_mass: Tensor,
    col_mass: Tensor,
    tau1: float,
    tau2: float,
    eps: float,
) -> Tensor:
    """``[B]`` an upper bound on the log of the plan's largest entry.

    A row with ``tau1 = inf`` carries exactly ``a_i``, a column with ``tau2 = inf`` ``b_j``; with
    both finite, an entry ``P_ij`` above ``max(a_i, b_j)`` makes ``f_i <= -tau1 log(P_ij / a_i)``
    and ``g_j <= -tau2 log(P_ij / b_j)`` (the first-order conditions), so ``(eps + tau1 + tau2)
    log P_ij <= tau1 log a_i + tau2 log b_j - C_ij``.
    """
    dt, device = row_min.dtype, row_min.device
    B = row_min.shape[0]
    zero = torch.zeros((), dtype=dt, device=device)
    ninf = torch.full((B,), -math.inf, dtype=dt, device=device)
    log_a = torch.where(row_alive, row_mass, zero).amax(-1).log() if row_min.shape[1] else ninf
    log_b = torch.where(col_alive, col_mass, zero).amax(-1).log() if col_mass.shape[1] else ninf
    if math.isinf(tau1) or math.isinf(tau2):
        bound = log_a if math.isinf(tau1) else log_b
        if math.isinf(tau1) and math.isinf(tau2):
            bound = torch.minimum(log_a, log_b)
    elif not row_min.shape[1]:
        return ninf
    else:
        num = -torch.where(row_alive, row_min, math.inf).amin(-1)
        if tau1 > 0:
            num = num + tau1 * log_a
        if tau2 > 0:
            num = num + tau2 * log_b
        bound = torch.maximum(torch.maximum(log_a, log_b), num / (eps + tau1 + tau2))
    return torch.where(torch.isnan(bound), -math.inf, bound)


def overflow_error(largest: float, dtype: torch.dtype) -> ValueError:
    """The error for a plan whose entries do not fit ``dtype``."""
    return ValueError(
        f"the optimal plan has entries up to {largest:.3g}, beyond the range of {dtype} "
        f"({torch.finfo(dtype).max:.3g}): with small taus its mass grows like "
        "exp(-C / (eps + tau1 + tau2)) for negative costs. Use a float64 cost, a larger eps or "
        "larger taus, or costs that are not so negative."
    )


def cast_plan(plan: Tensor, dtype: torch.dtype, bounded: bool = False) -> Tensor:
    """``plan`` in ``dtype``; entries beyond its range are an error, not an infinite plan.

    ``bounded``: the plan's entries are known to be at most masses of ``dtype`` (a balanced plan:
    each entry at most its line's mass, which one side meets exactly), so none can overflow."""
    if plan.dtype == dtype:
        return plan
    if not bounded and plan.numel() and bool((plan > torch.finfo(dtype).max).any()):
        raise overflow_error(float(plan.amax()), dtype)
    return plan.to(dtype)


def threshold_(x: torch.Tensor, threshold: float, value: float) -> torch.Tensor:
    """In place: the entries of ``x`` at or below ``threshold`` become ``value``.

    torch's ``threshold_``, which exists at run time but not in torch's type stubs."""
    return torch.nn.functional.threshold_(x, threshold, value)  # type: ignore[attr-defined]
