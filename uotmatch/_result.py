"""The one result type of :func:`uotmatch.match`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

__all__ = ["Matching"]


def to_container(x: Tensor, kind: str, dtype: torch.dtype | None = None) -> Any:
    """Convert a result tensor back to the caller's container (``torch``, ``numpy``, ``list``)."""
    if dtype is not None:
        x = x.to(dtype)
    if kind == "torch":
        return x
    x = x.detach().cpu()
    if kind == "numpy":
        return x.numpy()
    return x.tolist()


@dataclass(frozen=True, eq=False)
class Matching:
    """Solution of one (batched) entropic unbalanced OT matching problem.

    Shapes below are for a batched call ``cost [B, M, N]``; an unbatched ``[M, N]`` call drops
    the leading ``B``. With ``background_cost`` the plan has ``N + 1`` columns, the last being ∅.
    Array fields come back in the caller's container (torch tensor on the cost's device, numpy
    array, or nested lists); ``plan`` also in the cost's dtype.

    Attributes:
        plan: ``[B, M, N(+1)]`` transport plan; row i is how prediction i's mass is split.
        converged: ``[B]`` bool, whether ``marginal_error <= tol`` for that item.
        marginal_error: ``[B]`` relative L1 violation of the marginal optimality conditions,
            the fraction of the prescribed mass misplaced: ``||P 1 - a exp(-f / tau1)||_1 /
            ||a||_1`` and the same for the columns, whichever is larger (with ``tau = inf`` the
            plain ``||P 1 - a||_1 / sum a``; a ``tau = 0`` side has no condition). This is OTT's
            default error for probability masses. 0 for the exact eps = 0 limits.
        iterations: ``[B]`` scaling iterations used by that item (0 at eps = 0).
        has_background: whether the last column of ``plan`` is the background ∅.
    """

    plan: Any
    converged: Any
    marginal_error: Any
    iterations: Any
    has_background: bool
    _plan: Tensor = field(repr=False)  # [B, M, N(+1)] float, on the cost's device
    _converged: Tensor = field(repr=False)  # [B] bool
    _potentials: Callable[[], tuple[Tensor, Tensor]] = field(repr=False)
    _kind: str = field(repr=False)
    _batched: bool = field(repr=False)

    @cached_property
    def _fg(self) -> tuple[Any, Any]:
        f, g = self._potentials()
        if not self._batched:
            f, g = f[0], g[0]
        return to_container(f, self._kind), to_container(g, self._kind)

    @property
    def f(self) -> Any:
        """``[B, M]`` row (prediction) dual potentials: ``P = exp((f_i + g_j - C_ij) / eps)``.

        At eps = 0 these are the exact duals of the limit problem (``ot.emd``'s for balanced).
        Rows that carry no mass have potential 0.
        """
        return self._fg[0]

    @property
    def g(self) -> Any:
        """``[B, N(+1)]`` column (ground truth, then ∅) dual potentials; 0 for masked columns."""
        return self._fg[1]

    def _assignment(self) -> Tensor:
        plan = self._plan  # [B, M, N(+1)]
        if plan.shape[-1] == 0:
            return torch.full(plan.shape[:-1], -1, dtype=torch.long, device=plan.device)
        idx = plan.argmax(-1)
        n_real = plan.shape[-1] - int(self.has_background)
        empty = plan.sum(-1) <= 0
        return torch.where((idx >= n_real) | empty, torch.full_like(idx, -1), idx)

    def assignment(self) -> Any:
        """``[B, M]`` int64: per prediction, the ground truth holding the largest share of its row,
        or -1 when that is the background or the row carries no mass."""
        out = self._assignment()
        return to_container(out if self._batched else out[0], self._kind)

    def pairs(self) -> Any:
        """DETR-style matches: per item a pair ``(pred_idx, gt_idx)`` of int64 index arrays (CPU
        tensors for torch input, as DETR's matcher), from :meth:`assignment` (predictions on the
        background are left out), sorted by prediction. A list of B pairs for a batched call,
        one pair otherwise."""
        assign = self._assignment().cpu()
        out = []
        for row in assign:
            pred = torch.nonzero(row >= 0).flatten()
            gt = row[pred]
            out.append((to_container(pred, self._kind), to_container(gt, self._kind)))
        return out if self._batched else out[0]

    def __repr__(self) -> str:
        shape = tuple(self._plan.shape if self._batched else self._plan.shape[1:])
        return (
            f"Matching(plan shape={shape}, background={self.has_background}, "
            f"converged={int(self._converged.sum())}/{self._converged.numel()})"
        )
