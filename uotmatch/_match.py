"""The front door: validate, fill defaults on the cost's device and dtype, solve, wrap."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from uotmatch import _exact, _screen
from uotmatch._result import Matching, to_container
from uotmatch._sinkhorn import sinkhorn

__all__ = ["match"]

INF = math.inf
#: Relative tolerance on ``|sum a - sum b|`` for the balanced (tau1 = tau2 = inf) problem.
MASS_BALANCE_RTOL = 1e-6
_HALF = (torch.float16, torch.bfloat16)


def match(
    cost: Any,
    eps: float,
    tau1: float = INF,
    tau2: float = INF,
    *,
    a: Any = None,
    b: Any = None,
    mask: Any = None,
    background_cost: Any = None,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> Matching:
    r"""Match predictions (rows) to ground truths (columns) by entropic unbalanced OT.

    Per batch item the plan is the minimiser over :math:`P \ge 0` of

    .. math::
        \langle C, P\rangle + \varepsilon \sum_{ij} P_{ij}(\log P_{ij} - 1)
        + \tau_1 \mathrm{KL}(P\mathbf{1} \,|\, a) + \tau_2 \mathrm{KL}(P^\top\mathbf{1} \,|\, b),
        \qquad \mathrm{KL}(x|y) = \textstyle\sum x \log(x/y) - x + y.

    ``tau = inf`` makes that marginal a hard constraint and ``tau = 0`` drops it. For eps > 0 this
    is POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=eps, reg_m=(tau1, tau2),
    reg_type='entropy')`` and OTT's ``tau_a = tau1 / (tau1 + eps)``,
    ``tau_b = tau2 / (tau2 + eps)``.
    The UOT paper's masses ``1 / N_p`` instead of our unit masses give the same plan divided by
    ``N_p``: a uniform cost shift of ``-eps * log N_p``.

    The limits (all with eps = 0, computed exactly):

    ========================  ===============================================================
    ``tau1=inf, tau2=0``      each prediction to its cheapest column (nearest ground truth;
                              with a background column its cost acts as a threshold)
    ``tau1=0, tau2=inf``      each ground truth to its cheapest prediction
    ``tau1=inf, tau2=inf``    balanced OT: Hungarian one-to-one for unit masses (OTA with k>1)
    ========================  ===============================================================

    Args:
        cost: ``[M, N]`` or ``[B, M, N]`` costs; rows are predictions, columns ground truths. A
            torch tensor (any device; float16/bfloat16/float32/float64, half precision computed
            in float32), a numpy array or nested lists. ``+inf`` marks a forbidden pair.
        eps: entropic regularisation, ``>= 0`` (0 only for the three limits above).
        tau1: prediction-marginal penalty in ``[0, inf]``.
        tau2: ground-truth-marginal penalty in ``[0, inf]``.
        a: prediction masses ``[M]`` or ``[B, M]``, default 1 each.
        b: ground-truth masses ``[N]`` or ``[B, N]``, default 1 each.
        mask: bool ``[N]`` or ``[B, N]``, True on the real columns of a padded batch (anywhere,
            not only a prefix). Masked columns get exactly zero plan; each item solves as if
            they were absent.
        background_cost: ``None``, a float, or ``[M]`` / ``[B, M]``. Appends a background column
            ∅ (last) with this cost and mass ``max(sum a - sum b, 0)`` over the real columns.
        max_iter: scaling iterations at most (eps-scaling stages included).
        tol: an item stops once its ``marginal_error`` (relative L1) is at most this.

    Returns:
        A :class:`Matching`: the plan in the caller's container, device and dtype, per-item
        ``converged``, ``marginal_error`` and ``iterations``, potentials ``f``, ``g``, and the
        decoders ``assignment()`` and ``pairs()``.

    Raises:
        ValueError: on malformed input (the message names the argument), on ``tau1 = tau2 = inf``
            with unequal total masses (infeasible), and on eps = 0 outside the three limits.

    Gradients: when ``cost`` (or ``a``, ``b``, ``background_cost``) requires grad, the plan is
    differentiated through the iterations (memory grows with iterations x B x M x N; the eps = 0
    limits are piecewise constant and come back detached). Otherwise no graph is kept.

    Speed: a balanced problem (``tau1 = tau2 = inf``) with a background column and at least
    1024 predictions is *screened* first: predictions whose every ground-truth cost exceeds
    their background cost by more than a bound on the optimal prices (plus a margin of the
    dtype's precision) provably send their whole mass to the background, so they leave the
    solve and their plan rows are written directly. The result is the dense solve's to the
    dtype's precision; for a detection batch (most anchors far from every object) it is several
    times faster. Not used when gradients are needed.

    Troubleshooting: ``converged`` False means ``max_iter`` ran out; tiny eps relative to the
    cost differences or nearly infeasible balanced problems need more iterations (or a finite
    tau, which also converges faster).

    Example:
        >>> import torch, uotmatch
        >>> cost = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.5, 0.6]])
        >>> m = uotmatch.match(cost, eps=0.0, background_cost=0.4)  # Hungarian + background
        >>> m.assignment()
        tensor([ 0,  1, -1])
        >>> m.plan
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 1.]])
    """
    kind, C = _as_tensor(cost, "cost")
    if C.dim() not in (2, 3):
        raise ValueError(f"cost must be [M, N] or [B, M, N], got shape {tuple(C.shape)}")
    if not C.is_floating_point():
        raise ValueError(f"cost must have a floating dtype, got {C.dtype}")
    out_dtype = C.dtype
    batched = C.dim() == 3
    C = C if batched else C.unsqueeze(0)
    work = torch.float64 if C.dtype == torch.float64 else torch.float32
    C = C.to(work)
    B, M, N = C.shape
    eps = _number("eps", eps, low=0.0, allow_inf=False)
    tau1 = _number("tau1", tau1, low=0.0, allow_inf=True)
    tau2 = _number("tau2", tau2, low=0.0, allow_inf=True)
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    tol = _number("tol", tol, low=0.0, allow_inf=False)
    if tol == 0:
        raise ValueError("tol must be > 0, got 0")
    a = _mass("a", a, B, M, batched, C)
    b = _mass("b", b, B, N, batched, C)
    real = _mask(mask, B, N, batched, C.device)  # [B, N] bool
    if mask is not None:  # padding is ignored whatever it holds
        C = C.masked_fill(~real[:, None, :], INF)
        b = torch.where(real, b, torch.zeros_like(b))
    has_bg = background_cost is not None
    bg = _background(background_cost, B, M, batched, C) if has_bg else None
    # Row minima over the real columns: +inf where a row allows nothing; NaN and -inf propagate,
    # so the cost is validated on this small tensor instead of another pass over the batch.
    real_min = _row_min(C) if N else C.new_full((B, M), INF)  # [B, M]
    if not bool((real_min > -INF).all()):
        if bool(torch.isnan(real_min).any()):
            raise ValueError("cost must not contain NaN (use +inf for forbidden pairs)")
        raise ValueError("cost must not contain -inf (an unboundedly attractive pair)")
    row_min = torch.minimum(real_min, bg) if has_bg else real_min
    b_real = b
    if has_bg:
        bg_mass = (a.sum(-1) - b.sum(-1)).clamp_min(0)  # [B]
        b = torch.cat([b, bg_mass.unsqueeze(-1)], dim=-1)
        real = torch.cat([real, real.new_ones(B, 1)], dim=-1)
    grad = C.requires_grad or a.requires_grad or b.requires_grad or (has_bg and bg.requires_grad)

    _check_feasible(row_min, a, b, tau1, tau2)
    screen = None
    if eps > 0 and has_bg and tau1 == tau2 == INF and M >= _screen.MIN_ROWS and not grad:
        # Balanced with a background column: rows that can only go to the background leave the
        # problem before any kernel is built (exact to the dtype's precision; see _screen). Its
        # price bound is finite only if every ground truth with mass has a finite cost.
        screen = _screen.screen(C, real_min, bg, a, b_real, eps)
    if screen is not None:
        plan, potentials, error, iterations, converged = _solve_screened(
            screen, C, bg, a, b_real, eps, max_iter, tol
        )
        return _result(
            plan, converged, error, iterations, potentials, has_bg, kind, batched, out_dtype
        )

    # The solver's fast reductions run along the last dimension: tall problems (M > N, the rule
    # in detection) are solved transposed, [B, N(+1), M]. The objective is symmetric in
    # (rows, a, tau1) <-> (columns, b, tau2), so the plan is the same.
    transpose = M > N + int(has_bg)
    if has_bg:
        if transpose:  # one pass writes the transposed copy and the background row
            work_cost = torch.cat([C.mT, bg.unsqueeze(1)], dim=1)
        else:
            work_cost = torch.cat([C, bg.unsqueeze(-1)], dim=-1)
    else:
        work_cost = C.mT.contiguous() if transpose else C
    # Column minima: +inf where a column allows nothing (a fast reduction when transposed).
    empty = work_cost.numel() == 0
    full_cost = work_cost.mT if transpose else work_cost  # [B, M, N(+1)] view
    n_cols = full_cost.shape[2]
    if empty:
        col_min = C.new_full((B, n_cols), INF)
    else:
        col_min = work_cost.amin(-1) if transpose else work_cost.amin(-2)
    _check_columns(col_min, b, real, tau2)

    if empty:  # nothing to transport: zero plan (feasibility was checked above)
        plan = full_cost.new_zeros(full_cost.shape)
        fg = (C.new_zeros(B, M), C.new_zeros(B, n_cols))
        error, iterations = C.new_zeros(B), torch.zeros(B, dtype=torch.long, device=C.device)
        converged = torch.ones(B, dtype=torch.bool, device=C.device)

        def potentials() -> tuple[Tensor, Tensor]:
            return fg

    elif eps == 0:
        plan, potentials = _solve_exact(full_cost, a, b, tau1, tau2, has_bg)
        zeros = torch.zeros(B, dtype=work, device=C.device)
        error, iterations = zeros, torch.zeros(B, dtype=torch.long, device=C.device)
        converged = torch.ones(B, dtype=torch.bool, device=C.device)
    else:
        with torch.set_grad_enabled(grad):
            if transpose:
                out = sinkhorn(
                    work_cost, b.log(), a.log(), eps, tau2, tau1, max_iter, tol, col_min, row_min
                )
                plan, fg = out.plan.mT, (out.g, out.f)
            else:
                out = sinkhorn(
                    work_cost, a.log(), b.log(), eps, tau1, tau2, max_iter, tol, row_min, col_min
                )
                plan, fg = out.plan, (out.f, out.g)
        error, iterations, converged = out.error, out.iterations, out.converged

        def potentials() -> tuple[Tensor, Tensor]:
            return fg

    return _result(plan, converged, error, iterations, potentials, has_bg, kind, batched, out_dtype)


def _result(
    plan: Tensor,
    converged: Tensor,
    error: Tensor,
    iterations: Tensor,
    potentials: Callable[[], tuple[Tensor, Tensor]],
    has_bg: bool,
    kind: str,
    batched: bool,
    out_dtype: torch.dtype,
) -> Matching:
    """Wrap batched result tensors into a :class:`Matching` in the caller's container."""

    def item(x: Tensor) -> Any:
        return to_container(x if batched else x[0], kind)

    return Matching(
        plan=to_container(plan if batched else plan[0], kind, out_dtype),
        converged=item(converged),
        marginal_error=item(error),
        iterations=item(iterations),
        has_background=has_bg,
        _plan=plan,
        _converged=converged,
        _potentials=potentials,
        _kind=kind,
        _batched=batched,
    )


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


def _solve_screened(
    screen: _screen.Screen,
    C: Tensor,
    bg: Tensor,
    a: Tensor,
    b: Tensor,
    eps: float,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Callable[[], tuple[Tensor, Tensor]], Tensor, Tensor, Tensor]:
    """Solve the kept rows of a screened balanced problem (``b`` the real columns' masses) and
    put the full plan ``[B, M, N + 1]``, potentials and errors back together."""
    N = C.shape[2]
    a_k = screen.kept_mass(a)
    b_k = torch.cat([b, (a_k.sum(-1) - b.sum(-1)).unsqueeze(-1)], dim=-1)  # ∅ less the excluded
    L = a_k.shape[1]
    c_k, bg_k = screen.gather(C), screen.gather(bg)
    # Errors relative to the full problem's mass: the excluded rows add none (exactly a_i to ∅).
    total = a.sum(-1)
    if L > N + 1:
        work_cost = torch.cat([c_k.mT, bg_k.unsqueeze(1)], dim=1)  # [B, N + 1, L]
        out = sinkhorn(
            work_cost, b_k.log(), a_k.log(), eps, INF, INF, max_iter, tol, error_mass=total
        )
        plan_k, f_k, g = out.plan.mT, out.g, out.f
    else:
        work_cost = torch.cat([c_k, bg_k.unsqueeze(-1)], dim=-1)  # [B, L, N + 1]
        out = sinkhorn(
            work_cost, a_k.log(), b_k.log(), eps, INF, INF, max_iter, tol, error_mass=total
        )
        plan_k, f_k, g = out.plan, out.f, out.g
    plan = screen.expand_plan(plan_k, a)

    def potentials() -> tuple[Tensor, Tensor]:
        return screen.expand_f(f_k, g, bg, a, eps), g

    return plan, potentials, out.error, out.iterations, out.converged


def _solve_exact(C: Tensor, a: Tensor, b: Tensor, tau1: float, tau2: float, has_bg: bool):
    C, a, b = C.detach(), a.detach(), b.detach()
    if (tau1, tau2) == (INF, 0.0):
        plan, fg = _exact.nearest_column(C, a)
    elif (tau1, tau2) == (0.0, INF):
        plan, fg = _exact.nearest_row(C, b)
    elif (tau1, tau2) == (INF, INF):
        return _exact.balanced(C, a, b, has_bg)
    else:
        raise ValueError(
            f"eps = 0 is defined only for the limits (tau1, tau2) = (inf, 0), (0, inf) or "
            f"(inf, inf); got ({tau1}, {tau2}). With a finite positive tau the unregularised "
            "problem is a general linear program (not a matching rule): use eps > 0."
        )
    return plan, lambda: fg


def _as_tensor(x: Any, name: str) -> tuple[str, Tensor]:
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


def _number(name: str, x: Any, low: float, allow_inf: bool) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(x) and not (allow_inf and x > 0):
        expected = "in [0, inf]" if allow_inf else "finite"
        raise ValueError(f"{name} must be {expected}, got {x}")
    if x < low:
        raise ValueError(f"{name} must be >= {low:g}, got {x}")
    return x


def _per_item(name: str, x: Any, B: int, n: int, batched: bool, like: Tensor, what: str) -> Tensor:
    """Convert ``x`` to a ``[B, n]`` tensor on ``like``'s device and dtype."""
    _, t = _as_tensor(x, name)
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


def _mask(mask: Any, B: int, N: int, batched: bool, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    _, t = _as_tensor(mask, "mask")
    if t.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor/array (True = real column), got {t.dtype}")
    like = torch.empty(0, device=device)
    return _per_item("mask", t, B, N, batched, like, "one flag per ground truth")


def _background(x: Any, B: int, M: int, batched: bool, C: Tensor) -> Tensor:
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        t = C.new_full((B, M), float(x))
    else:
        t = _per_item("background_cost", x, B, M, batched, C, "one cost per prediction")
    if not bool((t > -INF).all()):  # False for NaN and -inf
        raise ValueError("background_cost must not contain NaN or -inf")
    return t


def _check_feasible(row_min: Tensor, a: Tensor, b: Tensor, tau1: float, tau2: float) -> None:
    """Reject problems no plan can satisfy: a prediction with mass but nowhere to go under a
    hard marginal, or unequal total masses (:func:`_check_columns` does the ground truths)."""
    if tau1 == INF and not bool((row_min < INF).all()):
        stuck = (a > 0) & (row_min == INF)
        if bool(stuck.any()):
            item, row = (int(i) for i in torch.nonzero(stuck)[0])
            raise ValueError(
                f"cost: item {item}, prediction {row} has mass but no finite-cost column (only "
                "+inf, forbidden, or none), which tau1 = inf cannot allow; give it a finite cost, "
                "a background column or a finite tau1"
            )
    if tau1 == INF and tau2 == INF:
        sa, sb = a.sum(-1), b.sum(-1)
        bad = (sa - sb).abs() > MASS_BALANCE_RTOL * torch.maximum(sa.abs(), sb.abs()).clamp_min(1)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"tau1 = tau2 = inf needs equal total masses, but item {i} has sum(a) = "
                f"{float(sa[i]):g} and sum(b) = {float(sb[i]):g}: infeasible. Add a background "
                "column (background_cost=...) to absorb the difference, or use a finite tau."
            )


def _check_columns(col_min: Tensor, b: Tensor, real: Tensor, tau2: float) -> None:
    """Reject a ground truth with mass but no finite-cost prediction under a hard marginal."""
    if tau2 == INF:
        stuck = (b > 0) & real & (col_min == INF)
        if bool(stuck.any()):
            item, col = (int(i) for i in torch.nonzero(stuck)[0])
            raise ValueError(
                f"cost: item {item}, column {col} has mass but no finite-cost prediction (only "
                "+inf, forbidden, or none), which tau2 = inf cannot allow; give it a finite "
                "cost or use a finite tau2"
            )
