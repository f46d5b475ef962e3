"""The one result type of :func:`uotmatch.match` (and of the DETR matchers' ``solve``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from uotmatch._decode import decode_pairs, decode_rows

__all__ = ["STATUSES", "Array", "Matching"]

#: What ``Matching.status`` says of an item.
STATUSES = {
    "converged": "the marginal error reached tol",
    "max_iter": "max_iter iterations ran out before the marginal error reached tol",
    "precision": "eps is below what the dtype resolves at these costs (or taus this large put "
    "the potentials beyond it): the plan is the dtype's rounding of the eps-optimal one, not "
    "that plan to tol, even where its marginal_error is small (the last exact update meets the "
    "marginals; optimality at this eps is what cannot be resolved). Scale the costs down, raise "
    "eps, or use smaller or infinite taus",
}

#: An array in the caller's container: a torch tensor, a numpy array or nested lists.
Array = Tensor | np.ndarray | list

Potentials = Callable[[], tuple[Tensor, Tensor]]


def to_container(x: Tensor, kind: str, dtype: torch.dtype | None = None) -> Array:
    """Convert a result tensor back to the caller's container (``torch``, ``numpy``, ``list``)."""
    if dtype is not None:
        x = x.to(dtype)
    if kind == "torch":
        return x
    x = x.detach().cpu()
    if kind == "numpy":
        return x.numpy()
    return x.tolist()


class Matching:
    """Solution of one (batched) entropic unbalanced OT matching problem.

    Shapes below are for a batched call ``cost [B, M, N]``; an unbatched ``[M, N]`` call drops
    the leading ``B``. With ``background_cost`` the plan has ``N + 1`` columns, the last being ∅.
    Array fields come back in the caller's container (torch tensor on the cost's device, numpy
    array, or nested lists); ``plan`` also in the cost's dtype.

    The marginal error is the fraction of the mass misplaced: ``||P 1 - a exp(-f / tau1)||_1 /
    max(||a||_1, ||a exp(-f / tau1)||_1)`` and the same for the columns, whichever is larger
    (with ``tau = inf`` the plain ``||P 1 - a||_1 / sum a``, OTT's default error for probability
    masses; a ``tau = 0`` side has no condition); 0 for the exact eps = 0 limits. ``status`` is
    a list of B strings, or one string for an unbatched call.
    """

    def __init__(
        self,
        *,
        plan: Tensor,
        converged: Tensor,
        error: Tensor,
        iterations: Tensor,
        status: list[str],
        has_background: bool,
        potentials: Potentials,
        kind: str = "torch",
        batched: bool = True,
        out_dtype: torch.dtype | None = None,
        gt_mask: Tensor | None = None,
    ):
        # Built by match() and the matchers from batched tensors ([B, ...]); ``gt_mask [B, N]``
        # is True on the real (unmasked) ground-truth columns (default: all).
        self._plan, self._converged, self._error = plan, converged, error
        self._iterations, self._status, self._potentials = iterations, list(status), potentials
        self._kind, self._batched = kind, batched
        self._out_dtype = plan.dtype if out_dtype is None else out_dtype
        self._has_background = has_background
        n = plan.shape[-1] - int(has_background)
        if gt_mask is None:
            gt_mask = torch.ones(plan.shape[0], n, dtype=torch.bool, device=plan.device)
        self._gt_mask = gt_mask

    @property
    def has_background(self) -> bool:
        """Whether the last column of ``plan`` is the background ∅."""
        return self._has_background

    def _item(self, x: Tensor, dtype: torch.dtype | None = None) -> Array:
        return to_container(x if self._batched else x[0], self._kind, dtype)

    @cached_property
    def plan(self) -> Array:
        """``[B, M, N(+1)]`` transport plan; row i is how prediction i's mass is split."""
        return self._item(self._plan, self._out_dtype)

    @cached_property
    def converged(self) -> Array:
        """``[B]`` bool: the item's marginal error is at most ``tol`` (and its plan finite)."""
        return self._item(self._converged)

    @cached_property
    def marginal_error(self) -> Array:
        """``[B]`` the relative L1 violation of the marginal optimality conditions (above)."""
        return self._item(self._error)

    @cached_property
    def iterations(self) -> Array:
        """``[B]`` int64 scaling iterations each item used (0 at eps = 0)."""
        return self._item(self._iterations)

    @property
    def status(self) -> list[str] | str:
        """Per item ``"converged"``, ``"max_iter"`` or ``"precision"`` (:data:`STATUSES`)."""
        return list(self._status) if self._batched else self._status[0]

    @cached_property
    def _fg(self) -> tuple[Array, Array]:
        f, g = self._potentials()
        return self._item(f), self._item(g)

    @property
    def f(self) -> Array:
        """``[B, M]`` row (prediction) dual potentials: ``P = exp((f_i + g_j - C_ij) / eps)``.

        At eps = 0 these are the exact duals of the limit problem (``ot.emd``'s for balanced).
        Rows that carry no mass have potential 0.
        """
        return self._fg[0]

    @property
    def g(self) -> Array:
        """``[B, N(+1)]`` column (ground truth, then ∅) dual potentials; 0 for masked columns."""
        return self._fg[1]

    def gt_index(self, decode: str = "argmax") -> Array:
        """Per prediction, its ground truth (``[B, M]`` int64), or -1 for none.

        -1 is the background, or no mass; the assigners' ``AssignResult.gt_index`` holds the
        same. By ``decode``:
        ``"argmax"`` (the ground truth holding the largest share of its row), ``"hungarian"``
        (the one-to-one matching carrying the most plan mass: every ground truth gets a
        prediction when there are enough) or ``"official"`` (OTA's: each column divided by its
        largest entry first). See :mod:`uotmatch._decode` and the docs' conventions page."""
        return self._item(decode_rows(self._plan, self._gt_mask, self.has_background, decode))

    def pairs(self, decode: str = "argmax") -> list[tuple[Array, Array]] | tuple[Array, Array]:
        """DETR-style matches: per item a pair ``(pred_idx, gt_idx)``.

        The pairs are int64 index arrays (CPU tensors for torch input, as DETR's matcher), sorted
        by prediction. ``decode``: one
        of :meth:`gt_index`'s, or ``"per_target"`` (each ground truth to the prediction
        holding the largest share of its column; a prediction may serve several ground truths,
        as in the ``tau1 = 0`` regime). A list of B pairs for a batched call, one pair
        otherwise."""
        pairs = decode_pairs(self._plan, self._gt_mask, self.has_background, decode)
        out = [(to_container(p, self._kind), to_container(g, self._kind)) for p, g in pairs]
        return out if self._batched else out[0]

    def first_rows(self, n: int) -> Matching:
        """The same solution restricted to the first ``n`` rows (predictions).

        What a matcher returns after solving with extra rows of its own (a background row)."""
        potentials = self._potentials

        def first(fn=potentials) -> tuple[Tensor, Tensor]:
            f, g = fn()
            return f[:, :n], g

        return Matching(
            plan=self._plan[:, :n],
            converged=self._converged,
            error=self._error,
            iterations=self._iterations,
            status=self._status,
            has_background=self.has_background,
            potentials=first,
            kind=self._kind,
            batched=self._batched,
            out_dtype=self._out_dtype,
            gt_mask=self._gt_mask,
        )

    def __repr__(self) -> str:
        shape = tuple(self._plan.shape if self._batched else self._plan.shape[1:])
        return (
            f"Matching(plan shape={shape}, background={self.has_background}, "
            f"converged={int(self._converged.sum())}/{self._converged.numel()})"
        )
