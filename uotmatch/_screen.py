"""Background screening: the predictions that can only go to the background.

They are found before any kernel is built, so a balanced solve with a background column iterates on
the rest only.

In a detection batch most predictions (anchors) are far from every ground truth: their cost to
each ground truth is far above their background cost. For the balanced problem
(``tau1 = tau2 = inf``) with a background column ∅ of positive mass, any plan row satisfies,
with ``D_ij = C_ij - C_i∅`` and the column prices ``Delta_j = g_j - g_∅``::

    P_ij = P_i∅ exp((Delta_j - D_ij) / eps)

so row i sends at most ``a_i exp((max_j Delta_j - min_j D_ij) / eps)`` to the ground truths. An
a-priori bound on ``max_j Delta_j`` (:func:`price_bound`) thus tells, from the row minima alone,
which rows go to ∅ entirely *to the precision of the dtype*: their real entries are below
``exp(-MARGIN)`` of an ulp of their mass. Those rows leave the problem (their mass comes off the
background column's); the solve runs on the kept rows, and the full plan, potentials and marginal
error are put back together exactly (:meth:`Screen.expand_plan`, :meth:`Screen.expand_f`).

The bound. At the optimum, ``Delta_j <= Delta* = max_j Delta_j`` for every real j gives
``P_i∅ >= a_i / (1 + e^{Delta*/eps} W_i)`` with ``W_i = sum_j e^{-D_ij/eps}``, so the column
``j*`` attaining the maximum receives ``b_j* >= F_j*(Delta*)``, where

    F_j(Delta) = sum_i cap_ij sigmoid(Delta / eps + log W_i),   cap_ij = a_i e^{-D_ij/eps} / W_i

is increasing. Hence ``Delta* <= max_j F_j^{-1}(b_j)``. Summing over a sample of rows only lowers
``F_j``, so the bound computed on the rows with the smallest ``min_j D_ij`` stays valid; and with
the rows sorted by ``-log W_i``, ``F_j(Delta) >= sigmoid(t) * (capacity of the rows with
-log W_i <= Delta / eps - t)``, which gives ``F_j^{-1}(b_j)`` from one cumulative sum, for a few
``t``. In our tests it is within a few eps of the true largest price, at worst about 12.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from uotmatch._precision import threshold_
from uotmatch._rows import candidate_rows, gather_rows

#: Screening is tried from this many rows (predictions) on; below, building the kernel is cheap.
MIN_ROWS = 1024
#: ... and used when at most this fraction of the rows are kept.
MAX_KEPT_FRACTION = 0.5
#: Rows sampled for the price bound: this many times the rows needed to hold the ground truths'
#: mass (at least ``MIN_SAMPLE``); doubled while some ground truth's bound is infinite.
SAMPLE_FACTOR = 4
MIN_SAMPLE = 256
#: The sample's cut-off is a quantile of ``min_j D_ij`` estimated on about this many rows.
SUBSAMPLE = 2048
#: Offsets ``t`` (in units of eps) at which the bound is evaluated; the smallest result is used.
OFFSETS = (0.0, 1.0, 2.0, 4.0, 8.0)
#: Extra margin, in units of eps, beyond the dtype's precision and ``log(N + 1)``.
MARGIN = 4.0
#: Exponents below this are taken as 0 in the bound's float64 arithmetic (exact enough: they
#: only make the capacities, hence the bound, more conservative).
LOG_FLOOR = -700.0


def margin(dtype: torch.dtype, n_cols: int) -> float:
    """Excluded rows send less than ``exp(-margin)`` of their mass to each of ``n_cols`` columns.

    In total below ``exp(-MARGIN)`` of one ulp (relative) of the dtype."""
    return -math.log(torch.finfo(dtype).eps) + math.log(n_cols + 1) + MARGIN


def price_bound(D: Tensor, a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Upper bound, ``[B]``, on ``max_j (g_j - g_∅)`` at the optimum, in float64.

    Args:
        D: ``[B, R, N]`` ``C_ij - C_i∅`` on a sample of R rows (``+inf`` where forbidden).
        a: ``[B, R]`` their masses.
        b: ``[B, N]`` the ground-truth masses (0 on masked columns, which then do not count).
        eps: > 0.

    Returns ``+inf`` for an item where the sample cannot hold some ground truth's mass.
    """
    B, R, N = D.shape
    x = D.double().div(-eps)  # log e^{-D/eps}
    top = x.amax(-1, keepdim=True)  # [B, R, 1]; -inf for a row forbidden everywhere
    x = torch.maximum(x, top + LOG_FLOOR)  # exp is slow on CPU for huge negative arguments
    log_w = x.logsumexp(-1, keepdim=True)  # log W_i
    cap = (x - torch.where(top > -math.inf, log_w, math.inf)).exp_()  # softmax; 0 if forbidden
    cap = threshold_(cap, math.exp(LOG_FLOOR + 10), 0.0)  # floored entries are 0
    mid, order = log_w.squeeze(-1).neg().sort(-1)  # sigmoid midpoints -log W_i, ascending
    cap = gather_rows(cap.mul_(a.double().unsqueeze(-1)), order)
    cum = cap.cumsum(1).mT.contiguous()  # [B, N, R]
    t = torch.tensor(OFFSETS, dtype=torch.float64, device=D.device)
    need = b.double().unsqueeze(-1) * (1 + torch.exp(-t))  # b_j / sigmoid(t), [B, N, T]
    pos = torch.searchsorted(cum, need)  # first sorted row whose capacity reaches it
    found = pos < R
    s = mid.unsqueeze(1).expand(B, N, R).gather(2, pos.clamp_max(R - 1)) + t
    s = torch.where(found, s, math.inf).amin(-1)  # [B, N]: F_j^{-1}(b_j) / eps bound
    s = torch.where(b > 0, s, -math.inf)  # massless columns set no price
    return eps * s.amax(-1)


#: CPU plans from this many bytes on are allocated zeroed by calloc (:func:`background_plan`):
#: glibc's largest mmap threshold, above which every allocation is fresh pages anyway.
CALLOC_BYTES = 2**25


def background_plan(a: Tensor, n_cols: int) -> Tensor:
    """``[B, M, n_cols]``, every row ``[0, ..., 0, a_i]``, written in one pass.

    A CPU plan from ``CALLOC_BYTES`` on comes zeroed from calloc (through numpy): its fresh pages
    are zeroed by the kernel on first touch, which saves a memset pass over them (a 60 MB
    float64 plan takes ~7 ms instead of ~15 ms on 2 cores); smaller ones are ``a * e_last``.
    """
    B, M = a.shape
    nbytes = B * M * n_cols * a.element_size()
    if a.device.type == "cpu" and nbytes >= CALLOC_BYTES and a.dtype in _NUMPY:
        full = torch.from_numpy(np.zeros((B, M, n_cols), dtype=_NUMPY[a.dtype]))
        full[..., -1] = a
        return full
    last = torch.zeros(n_cols, dtype=a.dtype, device=a.device)
    last[-1] = 1
    return a.unsqueeze(-1) * last


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass
class Screen:
    """The rows kept by screening and how to put the full solution back together."""

    idx: Tensor  # [B, L] kept rows first (padding: the item's other rows)
    valid: Tensor  # [B, L] bool, False on padding
    threshold: Tensor  # [B]: rows with min_j D_ij >= this were excluded

    def gather(self, x: Tensor) -> Tensor:
        """Rows ``[B, M, ...]`` -> ``[B, L, ...]`` (padding holds rows that were not kept)."""
        return gather_rows(x, self.idx)

    def kept_mass(self, a: Tensor) -> Tensor:
        """``[B, L]`` masses of the kept rows, 0 on padding."""
        return torch.where(self.valid, self.gather(a), 0.0)

    def _rows(self, M: int) -> Tensor:
        """Flat indices ``b * M + i`` of the kept rows, padding left out."""
        B = self.idx.shape[0]
        return (self.idx + M * torch.arange(B, device=self.idx.device).unsqueeze(1))[self.valid]

    def expand_plan(self, plan: Tensor, a: Tensor) -> Tensor:
        """The full ``[B, M, N + 1]`` plan from the kept rows' ``[B, L, N + 1]``.

        An excluded row sends its whole mass ``a_i`` to ∅."""
        B, M = a.shape
        full = background_plan(a, plan.shape[-1])
        full.view(B * M, -1).index_copy_(0, self._rows(M), plan[self.valid])
        return full

    def expand_f(self, f: Tensor, g: Tensor, bg: Tensor, a: Tensor, eps: float) -> Tensor:
        """The full ``[B, M]`` row potentials.

        An excluded row's is what the row update gives with only its background entry, ``eps log
        a_i + C_i∅ - g_∅`` (0 without mass)."""
        M = a.shape[1]
        full = torch.where(a > 0, eps * a.log() + bg - g[:, -1:], torch.zeros_like(a))
        full.view(-1).index_copy_(0, self._rows(M), f[self.valid])
        return full


def _declines(
    sub: Tensor,
    needed: float,
    eps: float,
    dtype: torch.dtype,
    n_cols: int,
    max_kept_fraction: float,
) -> bool:
    """Screening would keep more than ``max_kept_fraction`` of the rows.

    Estimated on the strided subsample ``sub`` of ``d_min`` alone, at a small fraction of a
    solve's cost (random costs, where every row may matter, would otherwise pay for the full
    screening passes and keep everything).

    The largest price serves the ground truths' mass from the rows that hold it, so it is about
    at least the ``needed`` quantile of ``d_min`` (``needed``: the fraction of the rows whose
    mass the ground truths take); screening keeps every row below that price plus its margin.
    Where the subsample's fraction below ``quantile + margin`` already exceeds
    ``max_kept_fraction``, screening cannot pay. An estimate, not a bound: it only decides when
    to step aside, which is never wrong (the dense solve is the reference)."""
    k = min(sub.shape[1], max(1, math.ceil(needed * sub.shape[1])))
    low = sub.kthvalue(k, dim=1).values + eps * margin(dtype, n_cols)  # [B]
    kept = (sub < low.unsqueeze(-1)).float().mean(1)
    return bool((kept > max_kept_fraction).any())


def screen(
    C: Tensor,
    row_min: Tensor,
    bg: Tensor,
    a: Tensor,
    b: Tensor,
    eps: float,
    max_kept_fraction: float = MAX_KEPT_FRACTION,
) -> Screen | None:
    """Find the rows of a balanced problem that go to the background to the dtype's precision.

    Args:
        C: ``[B, M, N]`` real-column costs (``+inf`` on masked columns).
        row_min: ``C.amin(-1)``.
        bg: ``[B, M]`` background costs.
        a: ``[B, M]`` row masses.
        b: ``[B, N]`` column masses (0 where masked).
        eps: > 0.
        max_kept_fraction: decline when more than this fraction of the rows would be kept.

    Returns ``None`` when screening does not apply (no background mass, no ground-truth mass) or
    would keep more than ``max_kept_fraction`` of the rows.
    """
    B, M, N = C.shape
    sum_a, sum_b = a.sum(-1), b.sum(-1)
    if B == 0 or N == 0 or not bool(((sum_a > sum_b) & (sum_b > 0)).all()):
        return None  # no background mass (bound undefined) or nothing to screen for
    # d_min in the cost's dtype; the cut-offs below are raised by its rounding error (at most
    # |d_min| * finfo.eps), so a row is excluded only if its exact d_min clears them. Rows
    # without mass may be kept or sampled: they add nothing to the bound and solve to zero.
    d_min = row_min - bg  # -inf where C_i0 = +inf; NaN (never kept) if all are
    # The sample: the rows below a quantile of d_min, estimated on a strided subsample (a full
    # top-k over M rows costs more than the whole bound). The rows below a 4x larger quantile
    # are gathered once: the kept rows are usually among them.
    rows_needed = float((sum_b / sum_a).max()) * M  # at the mean row mass
    target = max(MIN_SAMPLE, SAMPLE_FACTOR * rows_needed)
    step = max(1, M // SUBSAMPLE)
    sub = d_min[:, ::step]
    if _declines(sub, rows_needed / M, eps, C.dtype, N, max_kept_fraction):
        return None
    inf = torch.full((B,), math.inf, dtype=d_min.dtype, device=d_min.device)

    def quantile(rows: float) -> Tensor:  # [B], +inf past half the rows
        if rows >= M / 2:
            return inf
        k = min(sub.shape[1], math.ceil(rows / M * sub.shape[1]))
        return sub.kthvalue(k, dim=1).values

    while True:
        cut, cut_wide = quantile(target), quantile(4 * target)
        wide, wide_valid = candidate_rows(d_min <= cut_wide.unsqueeze(-1))  # [B, W]
        d_wide = torch.where(wide_valid, gather_rows(d_min, wide), math.inf)
        local, valid = candidate_rows(wide_valid & (d_wide <= cut.unsqueeze(-1)))  # not padding
        idx = wide.gather(1, local)  # [B, R], R <= W
        bg_s = gather_rows(bg, idx).double().unsqueeze(-1)
        # A row that cannot use the background (C_i0 = +inf) is kept whatever the bound and
        # left out of it (it only adds to the columns' supply): as if forbidden everywhere.
        D = torch.where(bg_s < math.inf, gather_rows(C, idx).double() - bg_s, math.inf)
        bound = price_bound(D, torch.where(valid, gather_rows(a, idx), 0.0), b, eps)
        if bool(torch.isfinite(bound).all()) or target >= M / 2:
            break
        target *= 2
    threshold = bound + eps * margin(C.dtype, N)  # float64
    # In d_min's dtype, raised by its rounding error and rounded up: d_min >= cut_keep implies
    # that the exact difference is >= threshold.
    cut_keep = (threshold + threshold.abs() * 4 * torch.finfo(d_min.dtype).eps).to(d_min.dtype)
    up = cut_keep.nextafter(cut_keep.new_tensor(math.inf))
    cut_keep = torch.where(cut_keep.double() < threshold, up, cut_keep)
    if bool((cut_keep <= cut_wide).all()):  # every kept row is among the gathered ones
        local, valid = candidate_rows(d_wide < cut_keep.unsqueeze(-1))
        idx = wide.gather(1, local)
    else:
        idx, valid = candidate_rows(d_min < cut_keep.unsqueeze(-1))  # +inf: every row
    if idx.shape[1] > max_kept_fraction * M:
        return None
    screen = Screen(idx, valid, threshold)
    if not bool((screen.kept_mass(a).sum(-1) > sum_b).all()):  # cannot happen at an exact optimum
        return None
    return screen
