"""A validated :func:`uotmatch.match` problem.

The batch as tensors on one device and dtype, the regime, the budget, and the checks that reject
what no plan can satisfy."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from uotmatch import _checks
from uotmatch._options import SolverOptions, regime
from uotmatch._precision import working_dtype

__all__ = ["MASS_BALANCE_RTOL", "Problem", "full_cost"]

INF = math.inf
#: Relative tolerance on ``|sum a - sum b|`` for the balanced (tau1 = tau2 = inf) problem.
MASS_BALANCE_RTOL = 1e-6


@dataclass
class Problem:
    """Every argument of :func:`uotmatch.match`, validated, as ``[B, ...]`` tensors.

    ``cost`` holds the real columns only (``+inf`` on masked ones); the background column, when
    there is one, is ``background`` with mass ``bg_mass``. ``real_min`` are the row minima over
    the real columns, ``row_min`` those over every column.
    """

    cost: Tensor  # [B, M, N], float32 or float64
    a: Tensor  # [B, M]
    b: Tensor  # [B, N], 0 on masked columns
    gt_mask: Tensor  # [B, N] bool, True on the real columns
    background: Tensor | None  # [B, M]
    eps: float
    tau1: float
    tau2: float
    max_iter: int
    tol: float
    screen: bool | None
    method: str  # SolverOptions.method
    kind: str  # the caller's container: torch, numpy or list
    batched: bool
    out_dtype: torch.dtype
    real_min: Tensor  # [B, M]
    grad: bool

    @classmethod
    def build(
        cls,
        cost: Any,
        eps: Any,
        tau1: Any,
        tau2: Any,
        *,
        a: Any,
        b: Any,
        gt_mask: Any,
        background_cost: Any,
        solver: SolverOptions,
    ) -> Problem:
        kind, C = as_tensor(cost, "cost")
        if C.dim() not in (2, 3):
            raise ValueError(f"cost must be [M, N] or [B, M, N], got shape {tuple(C.shape)}")
        if not C.is_floating_point():
            raise ValueError(f"cost must have a floating dtype, got {C.dtype}")
        out_dtype = C.dtype
        batched = C.dim() == 3
        C = C if batched else C.unsqueeze(0)
        C = C.to(working_dtype(C.dtype))
        B, M, N = C.shape
        eps, tau1, tau2 = regime(eps, tau1, tau2)
        max_iter, tol, screen, method = solver.max_iter, solver.tol, solver.screen, solver.method
        a = _mass("a", a, B, M, batched, C)
        b = _mass("b", b, B, N, batched, C)
        given = gt_mask is not None
        gt_mask = _gt_mask(gt_mask, B, N, batched, C.device)  # [B, N] bool
        if given:  # padding is ignored whatever it holds
            C = C.masked_fill(~gt_mask[:, None, :], INF)
            b = torch.where(gt_mask, b, torch.zeros_like(b))
        bg = None
        if background_cost is not None:
            bg = _background(background_cost, B, M, batched, C)
        # Row minima over the real columns: +inf where a row allows nothing; NaN and -inf
        # propagate, so the cost is validated on this small tensor, not another pass.
        real_min = _row_min(C) if N else C.new_full((B, M), INF)  # [B, M]
        if not bool((real_min > -INF).all()):
            if bool(torch.isnan(real_min).any()):
                raise ValueError("cost must not contain NaN (use +inf for forbidden pairs)")
            raise ValueError("cost must not contain -inf (an unboundedly attractive pair)")
        grad = C.requires_grad or a.requires_grad or b.requires_grad
        grad = grad or (bg is not None and bg.requires_grad)
        p = cls(
            C, a, b, gt_mask, bg, eps, tau1, tau2, max_iter, tol, screen, method, kind, batched,
            out_dtype, real_min, grad,
        )  # fmt: skip
        p._check_options()
        p._check_feasible()
        return p

    # -- what is derived -------------------------------------------------------------------------

    @property
    def has_background(self) -> bool:
        return self.background is not None

    @property
    def balanced(self) -> bool:
        return math.isinf(self.tau1) and math.isinf(self.tau2)

    @cached_property
    def row_min(self) -> Tensor:
        """``[B, M]`` row minima over every column, the background's included."""
        if self.background is None:
            return self.real_min
        return torch.minimum(self.real_min, self.background)

    @property
    def bg_mass(self) -> Tensor:
        """``[B]`` the background column's mass: ``max(sum a - sum b, 0)``."""
        return (self.a.sum(-1) - self.b.sum(-1)).clamp_min(0)

    @cached_property
    def col_mass(self) -> Tensor:
        """``[B, N(+1)]``: the ground truths' masses, then the background's."""
        if self.background is None:
            return self.b
        return torch.cat([self.b, self.bg_mass.unsqueeze(-1)], dim=-1)

    @cached_property
    def col_real(self) -> Tensor:
        """``[B, N(+1)]`` bool: the real columns, then the background (always real)."""
        if self.background is None:
            return self.gt_mask
        return torch.cat([self.gt_mask, self.gt_mask.new_ones(self.gt_mask.shape[0], 1)], dim=-1)

    def full_cost(self, transpose: bool) -> Tensor:
        """:func:`full_cost` of this problem."""
        return full_cost(self.cost, self.background, transpose)

    def as_balanced_limit(self, precision: float) -> tuple[Problem, Tensor] | None:
        """The balanced problem this one is to within ``tol / 100``, if there is one.

        With the translation ``t [B]`` of its potentials (``f + t``, ``g - t``), when both taus are
        so large that the potentials, about ``tau1 tau2 / (tau1 + tau2) * log(sum a / sum b)``,
        cannot be rounded finely enough against eps (``precision``: the largest relative error
        allowed).

        As ``tau1, tau2 -> inf`` the plan's marginals become ``a m / A`` and ``b m / B`` with
        ``A = sum a``, ``B = sum b`` and ``m = A^(tau1 / (tau1 + tau2)) B^(tau2 / (tau1 +
        tau2))`` (the KL terms' compromise): balanced OT between those, exact up to a relative
        ``|C| (1 / tau1 + 1 / tau2)`` on the marginals. Used only where that is below
        ``tol / 100``; otherwise the finite taus are solved as they are.
        """
        tau1, tau2 = self.tau1, self.tau2
        if not (0 < tau1 < INF and 0 < tau2 < INF):
            return None
        A, B = self.a.double().sum(-1), self.col_mass.double().sum(-1)
        tau = tau1 * tau2 / (tau1 + tau2)
        spread = tau * (A.log() - B.log()).nan_to_num(0.0, 0.0, 0.0).abs()
        if not bool((spread * torch.finfo(torch.float64).eps > precision * self.eps).any()):
            return None
        full = self.full_cost(False)
        finite = full[torch.isfinite(full)]
        magnitude = float(finite.abs().max()) if finite.numel() else 0.0
        if magnitude * (1 / tau1 + 1 / tau2) > self.tol / 100:
            return None
        # Lines that allow nothing carry nothing at any tau: they leave the masses. The
        # background's mass counts in the columns' total: the limit's background, re-derived as
        # max(sum a - sum b, 0) from the scaled masses, then gets its share m / B as the rest.
        a = torch.where(self.row_min < INF, self.a, 0.0)
        b = torch.where(self.cost.amin(-2) < INF, self.b, 0.0) if self.b.numel() else self.b
        A, B = a.double().sum(-1), b.double().sum(-1)
        if self.background is not None:
            usable = (self.background < INF).any(-1)  # [B]
            B = B + torch.where(usable, self.bg_mass.double(), 0.0)
        ok = (A > 0) & (B > 0)
        w1 = tau1 / (tau1 + tau2)
        log_m = w1 * A.log() + (1 - w1) * B.log()
        a = a * torch.where(ok, (log_m - A.log()).exp(), 1.0).to(a.dtype)[:, None]
        b = b * torch.where(ok, (log_m - B.log()).exp(), 1.0).to(b.dtype)[:, None]
        limit = dataclasses.replace(self, a=a, b=b, tau1=INF, tau2=INF)
        shift = torch.where(ok, tau * (A.log() - B.log()), 0.0)
        if bool((shift.abs() > torch.finfo(self.cost.dtype).max).any()):
            raise ValueError(
                f"tau1 = {tau1:g} and tau2 = {tau2:g} put the optimal potentials near "
                f"{float(shift.abs().max()):.3g} (tau * log(sum a / sum b)), beyond the range of "
                f"{self.cost.dtype}: use a float64 cost, smaller taus, or tau = inf with equal "
                "masses"
            )
        return limit, shift.to(self.cost.dtype)

    # -- checks ------------------------------------------------------------------------------------

    def _check_options(self) -> None:
        """``screen=True`` is refused where it cannot apply."""
        why = None
        if self.eps == 0:
            why = "eps = 0 is solved exactly, without iterations"
        elif self.grad:
            why = "gradients are needed (the differentiable solve is the dense one)"
        if self.screen and why is None:
            if not self.balanced:
                why = "it needs tau1 = tau2 = inf"
            elif self.background is None:
                why = "it needs a background column (background_cost)"
        if self.screen and why is not None:
            raise ValueError(f"screen=True cannot apply: {why}; pass screen=None or False")

    def _check_feasible(self) -> None:
        """Reject problems no plan can satisfy.

        A prediction with mass but nowhere to go under a hard row marginal (no finite-cost column
        that may receive mass), and unequal total masses under two hard marginals. The columns'
        side is :meth:`check_columns`."""
        if math.isinf(self.tau1):
            col_mass, col_real = self.col_mass, self.col_real
            receives = col_real & ((col_mass > 0) | (self.tau2 == 0))  # [B, N(+1)]
            # Padding (not real) is +inf in the cost already: it is no way out in row_min.
            if bool((receives | ~col_real).all()):
                reach = self.row_min
            else:  # a column that may receive nothing does not count (rare: a pass over C)
                reach = self.full_cost(False).masked_fill(~receives[:, None, :], INF).amin(-1)
            stuck = (self.a > 0) & (reach == INF)
            if bool(stuck.any()):
                item, row = (int(i) for i in torch.nonzero(stuck)[0])
                raise ValueError(
                    f"cost: item {item}, prediction {row} has mass but no finite-cost column that "
                    "may receive mass (only +inf, forbidden, columns of zero mass, or none), "
                    "which tau1 = inf cannot allow; give it a finite cost, a background column "
                    "or a finite tau1"
                )
        if self.balanced:
            sa, sb = self.a.sum(-1), self.col_mass.sum(-1)
            scale = torch.maximum(sa.abs(), sb.abs()).clamp_min(1)
            bad = (sa - sb).abs() > MASS_BALANCE_RTOL * scale
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                hint = (
                    "The background column absorbs only extra predictions: give the ground "
                    "truths less mass than the predictions, or use a finite tau2."
                    if self.has_background
                    else "Add a background column (background_cost=...) to absorb the "
                    "difference, or use a finite tau."
                )
                raise ValueError(
                    f"tau1 = tau2 = inf needs equal total masses, but item {i} has sum(a) = "
                    f"{float(sa[i]):g} and sum(b) = {float(self.b[i].sum()):g}: infeasible. {hint}"
                )

    def check_columns(self, cost: Tensor, col_min: Tensor, a: Tensor | None = None) -> None:
        """Reject a ground truth with mass that no prediction may serve (hard columns).

        That is a ground truth with no finite-cost prediction that may send mass, under a hard
        column marginal. ``cost`` is the full ``[B, M, N(+1)]`` (a view), and
        ``col_min`` its column minima; ``a`` its rows' masses (default: the problem's)."""
        if not math.isinf(self.tau2):
            return
        a = self.a if a is None else a
        sends = (a > 0) | (self.tau1 == 0)  # [B, M]
        if not bool(sends.all()):  # a row that may send nothing does not count (rare)
            col_min = cost.masked_fill(~sends[..., None], INF).amin(-2)
        stuck = (self.col_mass > 0) & self.col_real & (col_min == INF)
        if bool(stuck.any()):
            item, col = (int(i) for i in torch.nonzero(stuck)[0])
            if self.has_background and col == stuck.shape[1] - 1:
                raise ValueError(
                    f"background_cost: item {item}'s background column has mass (the "
                    "predictions the ground truths cannot take) but every prediction's "
                    "background cost is +inf, which tau2 = inf cannot allow; give the "
                    "background a finite cost, or use a finite tau2"
                )
            raise ValueError(
                f"cost: item {item}, column {col} has mass but no finite-cost prediction that may "
                "send mass (only +inf, forbidden, predictions of zero mass, or none), which "
                "tau2 = inf cannot allow; give it a finite cost or use a finite tau2"
            )


def full_cost(cost: Tensor, background: Tensor | None, transpose: bool) -> Tensor:
    """``cost [B, M, N]`` with the background column appended, or its transpose.

    ``[B, M, N(+1)]`` or ``[B, N(+1), M]``: one pass writes the copy and the background line."""
    if background is None:
        return cost.mT.contiguous() if transpose else cost
    if transpose:
        return torch.cat([cost.mT, background.unsqueeze(1)], dim=1)
    return torch.cat([cost, background.unsqueeze(-1)], dim=-1)


# -- conversions and per-argument checks ----------------------------------------------------------


def as_tensor(x: Any, name: str) -> tuple[str, Tensor]:
    if isinstance(x, Tensor):
        return "torch", x
    if isinstance(x, np.ndarray):
        arr = x if x.dtype.kind in "fb" else x.astype(np.float64)  # float, or a bool mask
        return "numpy", torch.from_numpy(np.ascontiguousarray(arr))
    if isinstance(x, list | tuple):
        try:
            arr = np.asarray(x)
            arr = arr if arr.dtype.kind == "b" else arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{name} must be a rectangular nested list of numbers: {exc}"
            ) from None
        return "list", torch.from_numpy(arr)
    raise ValueError(
        f"{name} must be a torch tensor, numpy array or nested list, got {type(x).__name__}"
    )


def _per_item(name: str, x: Any, B: int, n: int, batched: bool, like: Tensor, what: str) -> Tensor:
    """Convert ``x`` to a ``[B, n]`` tensor on ``like``'s device and dtype."""
    _, t = as_tensor(x, name)
    if t.dim() == 1 and t.shape[0] == n:
        t = t.expand(B, n)
    elif not (batched and t.dim() == 2 and tuple(t.shape) == (B, n)):
        shapes = f"[{n}] or [{B}, {n}]" if batched else f"[{n}]"
        raise ValueError(f"{name} must be {shapes} ({what}), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        return t.to(like.device)
    return t.to(device=like.device, dtype=like.dtype)


def _mass(name: str, x: Any, B: int, n: int, batched: bool, C: Tensor) -> Tensor:
    what = "one mass per prediction" if name == "a" else "one mass per ground truth"
    if x is None:
        return C.new_ones(B, n)
    t = _per_item(name, x, B, n, batched, C, what)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(
            f"{name} must be finite and >= 0, got min {float(t.min()) if t.numel() else 0}"
        )
    return t


def _gt_mask(mask: Any, B: int, N: int, batched: bool, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    _, t = as_tensor(mask, "gt_mask")
    if t.dtype != torch.bool:
        raise ValueError(f"gt_mask must be a bool tensor/array (True = real column), got {t.dtype}")
    like = torch.empty(0, device=device)
    return _per_item("gt_mask", t, B, N, batched, like, "one flag per ground truth")


def _background(x: Any, B: int, M: int, batched: bool, C: Tensor) -> Tensor:
    x = _checks._scalar(x)  # a 0-d tensor or array is a scalar cost
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        fine = float(x) > -INF  # False for NaN and -inf
        t = C.new_full((B, M), float(x))
    else:
        t = _per_item("background_cost", x, B, M, batched, C, "one cost per prediction")
        fine = bool((t > -INF).all())
    if not fine:
        raise ValueError("background_cost must not contain NaN or -inf")
    return t


def _row_min(x: Tensor) -> Tensor:
    """``x.amin(-1)`` for ``x [B, M, N]``, ``N >= 1`` (NaN propagates).

    On CPU, ``amin`` over a short float32 last dimension runs a slow path (~7 ms for the
    ``[16, 22212, 20]`` OTA batch); pairwise minima of halves take ~4 ms.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] > 32 or x.numel() < 2**20:
        return x.amin(-1)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        y = torch.minimum(x[..., :half], x[..., half : 2 * half])  # a new tensor
        if x.shape[-1] % 2:
            y[..., :1] = torch.minimum(y[..., :1], x[..., -1:])
        x = y
    return x.squeeze(-1)
