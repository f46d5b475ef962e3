"""How a transport plan becomes a matching.

The decodings of :meth:`uotmatch.Matching.pairs` and :meth:`uotmatch.Matching.gt_index`, and of
the assigners and matchers.

A plan ``[B, M, N(+1)]`` (predictions by ground truths, the background last when there is one)
says how each prediction's mass splits; a loss that wants pairs needs a decision. The decodings:

* ``"argmax"``: each prediction to the ground truth holding the largest share of its row (the
  background, or no mass, gives none). One ground truth per prediction. Where the plan is spread
  thin, as at the start of a DETR's training (near-identical queries), every query's largest
  share is the background's and *no* target gets a query.
* ``"hungarian"``: the one-to-one matching that carries the most plan mass
  (``scipy.optimize.linear_sum_assignment`` on ``-P`` over the real ground truths, per item):
  every ground truth with plan mass gets a prediction whenever there are at least as many
  predictions. DETR's matchers' default.
* ``"official"``: the OTA code's: each column divided by its largest entry (every ground truth's
  best prediction scores 1), then each prediction to its best column. One ground truth per
  prediction; a ground truth spread thin keeps its best prediction unless another takes it.
* ``"per_target"``: each ground truth to the prediction holding the largest share of its column;
  a prediction may serve several ground truths (the regime ``tau1 = 0`` of the UOT paper's
  Figure 1 (e): 4 -> A and 4 -> B). Pairs only (no per-prediction index).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["DECODINGS", "ROW_DECODINGS", "decode_pairs", "decode_rows"]

#: Every decoding, and those that give one ground truth per prediction.
DECODINGS = ("argmax", "hungarian", "official", "per_target")
ROW_DECODINGS = ("argmax", "hungarian", "official")


def _check(decode: str, allowed: tuple[str, ...]) -> None:
    if decode not in allowed:
        raise ValueError(f"decode must be one of {list(allowed)}, got {decode!r}")


def _real_part(plan: Tensor, gt_mask: Tensor, has_background: bool) -> Tensor:
    """``[B, M, N]``: the plan on the real ground truths (masked columns zeroed)."""
    n = plan.shape[-1] - int(has_background)
    return plan[..., :n] * gt_mask[:, None, :n]


def decode_rows(
    plan: Tensor,
    gt_mask: Tensor,
    has_background: bool,
    decode: str = "argmax",
    background_scale: Tensor | None = None,
) -> Tensor:
    """Per prediction, its ground truth (``[B, M]`` int64) or -1, by a row decoding.

    -1 is the background or none; the decoding is one of :data:`ROW_DECODINGS`, from ``plan [B, M,
    N(+1)]`` and ``gt_mask [B, N]`` (True on the real columns).

    ``background_scale [B]`` (``"official"`` only) overrides the background column's largest
    entry: predictions solved elsewhere and known to be background (the OTA assigners' anchors
    outside every centre prior).
    """
    _check(decode, ROW_DECODINGS)
    B, M, _ = plan.shape
    n = plan.shape[-1] - int(has_background)
    if n == 0 or M == 0:
        return torch.full((B, M), -1, dtype=torch.long, device=plan.device)
    if decode == "hungarian":
        return _hungarian_rows(_real_part(plan, gt_mask, has_background))
    plan = torch.cat([_real_part(plan, gt_mask, has_background), plan[..., n:]], -1)
    if decode == "official":
        scale = plan.amax(1, keepdim=True)  # [B, 1, N(+1)]
        if background_scale is not None and has_background:
            scale = scale.clone()
            scale[:, 0, -1] = torch.maximum(scale[:, 0, -1], background_scale)
        plan = torch.where(scale > 0, plan / scale.clamp_min(torch.finfo(plan.dtype).tiny), 0.0)
    best = plan.argmax(-1)
    return torch.where((best >= n) | (plan.amax(-1) <= 0), -1, best)


def _hungarian(plan: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item ``(rows, cols)`` int64: the one-to-one matching of most plan mass.

    Pairs of zero mass dropped, sorted by row; ``plan [B, M, N]`` with ``M, N > 0``."""
    P = plan.detach().double().cpu().numpy()
    out = []
    for Pi in P:
        cols = np.flatnonzero(Pi.max(0) > 0)  # ground truths with plan mass
        if cols.size == 0:
            out.append((cols, cols))
            continue
        r, c = linear_sum_assignment(-Pi[:, cols])
        keep = Pi[r, cols[c]] > 0
        rows, gts = r[keep], cols[c[keep]]
        out.append((rows.astype(np.int64, copy=False), gts.astype(np.int64, copy=False)))
    return out


def _hungarian_rows(plan: Tensor) -> Tensor:
    """The one-to-one matching of most plan mass, per item, as ``[B, M]`` (-1: none)."""
    B, M, _ = plan.shape
    out = np.full((B, M), -1, dtype=np.int64)
    for i, (r, c) in enumerate(_hungarian(plan)):
        out[i, r] = c
    return torch.from_numpy(out).to(plan.device)


def decode_pairs(
    plan: Tensor, gt_mask: Tensor, has_background: bool, decode: str = "argmax"
) -> list[tuple[Tensor, Tensor]]:
    """Per item a pair ``(pred_idx, gt_idx)``, by one of :data:`DECODINGS`.

    Int64 CPU tensors, sorted by prediction (then ground truth)."""
    _check(decode, DECODINGS)
    n = plan.shape[-1] - int(has_background)
    if decode == "hungarian" and n > 0 and plan.shape[1] > 0:
        pairs = _hungarian(_real_part(plan, gt_mask, has_background))
        return [(torch.from_numpy(r), torch.from_numpy(c)) for r, c in pairs]
    if decode != "per_target":
        out = []
        for row in decode_rows(plan, gt_mask, has_background, decode).cpu().numpy():
            served = np.flatnonzero(row >= 0)
            out.append((torch.from_numpy(served), torch.from_numpy(row[served])))
        return out
    real_plan = _real_part(plan, gt_mask, has_background).detach().cpu()  # [B, M, N]
    B, M, N = real_plan.shape
    out = []
    for i in range(B):
        if M == 0 or N == 0:
            empty = torch.zeros(0, dtype=torch.long)
            out.append((empty, empty))
            continue
        best = real_plan[i].argmax(0)  # [N]
        gt = torch.nonzero(real_plan[i].amax(0) > 0).flatten()
        pred = best[gt]
        order = torch.argsort(pred * N + gt)
        out.append((pred[order], gt[order]))
    return out
