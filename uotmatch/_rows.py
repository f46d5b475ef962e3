"""Selecting and gathering rows of a batch.

What background screening and the candidate-only detection assigners share."""

from __future__ import annotations

import torch
from torch import Tensor


def candidate_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the rows to keep, ``rows [B, A]`` True first (stable).

    Padded to the batch's largest count (at least 1): ``idx [B, L]`` and ``real [B, L]`` (False on
    padding).

    Padding slots hold the item's other rows, in order, so scattering ``[B, L]`` values back to
    ``idx`` never overwrites a kept row.
    """
    B, A = rows.shape
    n = rows.sum(1)  # [B]
    L = max(int(n.max()), 1) if B else 1
    position = torch.where(rows, rows.cumsum(1) - 1, n[:, None] + (~rows).cumsum(1) - 1)
    arange = torch.arange(A, device=rows.device).expand(B, A)
    idx = torch.empty_like(position).scatter_(1, position, arange)[:, :L]
    return idx, torch.arange(L, device=rows.device)[None] < n[:, None]


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, k]]``: rows ``[B, M, ...]`` -> ``[B, L, ...]`` for ``idx [B, L]``."""
    B, M = x.shape[:2]
    flat = (idx + M * torch.arange(B, device=idx.device).unsqueeze(1)).view(-1)
    return x.reshape(B * M, *x.shape[2:]).index_select(0, flat).view(*idx.shape, *x.shape[2:])
