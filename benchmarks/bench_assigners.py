"""Assigner speed: our batched OTA against the official OTA procedure, SimOTA, DETR matchers.

    python benchmarks/bench_assigners.py           # the issue's workloads (a few minutes)
    python benchmarks/bench_assigners.py --quick   # smoke run

The dense reference follows the official OTA code (Megvii-BaseDetection/OTA, fcos.py
``get_ground_truth``): per image, focal loss over ``[G, A, K]``, the 1e6 centre-prior penalty on
every anchor, dynamic k, and ``SinkhornDistance`` (50 log-domain iterations, eps 0.1) over all
anchors; each anchor then goes to the argmax of its plan row, the decoding the paper states.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solver import STRIDES  # noqa: E402

from uotmatch.detection import (  # noqa: E402
    HungarianMatcher,
    OTAAssigner,
    SimOTAAssigner,
    UOTMatcher,
    anchor_points,
)
from uotmatch.detection._dense import inside_boxes, inside_centre  # noqa: E402
from uotmatch.detection._ota import CENTER_PRIOR_PENALTY, IOU_LOG_EPS  # noqa: E402
from uotmatch.detection.boxes import box_iou, ltrb_to_boxes  # noqa: E402

NUM_CLASSES = 80
TOL = 1e-5


def dense_batch(B: int, G: int, height: int = 800, width: int = 1333, seed: int = 0):
    """A COCO-like batch: detector outputs part-way through training (boxes near the objects)."""
    g = torch.Generator().manual_seed(seed)
    points, strides = anchor_points(height, width, STRIDES)
    A = len(points)
    size = torch.exp(torch.rand(B, G, 2, generator=g) * 3.2 + 2.8)  # ~16 to ~400 px
    ctr = torch.rand(B, G, 2, generator=g) * torch.tensor([width, height])
    gt_boxes = torch.cat([ctr - size / 2, ctr + size / 2], -1)
    gt_labels = torch.randint(NUM_CLASSES, (B, G), generator=g)
    ltrb = torch.rand(B, A, 4, generator=g) * 4 * strides[None, :, None] + 2
    pred_boxes = ltrb_to_boxes(points[None], ltrb)
    logits = torch.randn(B, A, NUM_CLASSES, generator=g) - 4.0
    return points, strides, logits, pred_boxes, gt_boxes, gt_labels


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0):
    """fvcore's sigmoid_focal_loss (what the official OTA code calls)."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def sinkhorn_distance(mu, nu, C, eps=0.1, max_iter=50):
    """The official OTA repo's SinkhornDistance.forward: C is [suppliers, demanders]."""
    u, v = torch.ones_like(mu), torch.ones_like(nu)

    def M(u, v):
        return (-C + u.unsqueeze(-1) + v.unsqueeze(-2)) / eps

    for _ in range(max_iter):
        v = eps * (torch.log(nu + 1e-8) - torch.logsumexp(M(u, v).transpose(-2, -1), dim=-1)) + v
        u = eps * (torch.log(mu + 1e-8) - torch.logsumexp(M(u, v), dim=-1)) + u
    return torch.exp(M(u, v))


@torch.no_grad()
def official_ota(points, strides, logits, pred_boxes, gt_boxes, gt_labels, q=20, reg_weight=1.5):
    """The dense reference, one image at a time as the official code."""
    out = []
    for img in range(logits.shape[0]):
        boxes, labels, A = gt_boxes[img], gt_labels[img], logits.shape[1]
        G = len(boxes)
        cand = (
            inside_boxes(points, boxes[None])
            & inside_centre(points, strides, boxes[None], 2.5, clip=True)
        )[0].T  # [G, A]
        shape = (G, A, -1)
        gt_cls = F.one_hot(labels, NUM_CLASSES).float()
        loss_cls = sigmoid_focal_loss(
            logits[img].unsqueeze(0).expand(shape), gt_cls.unsqueeze(1).expand(shape)
        ).sum(-1)
        loss_cls_bg = sigmoid_focal_loss(logits[img], torch.zeros_like(logits[img])).sum(-1)
        ious = box_iou(boxes, pred_boxes[img])  # [G, A]
        loss_delta = -torch.log(ious + IOU_LOG_EPS)
        loss = loss_cls + reg_weight * loss_delta + CENTER_PRIOR_PENALTY * (1 - cand.float())
        topk_ious, _ = torch.topk(ious * cand.float(), q, dim=1)
        mu = ious.new_ones(G + 1)
        mu[:-1] = torch.clamp(topk_ious.sum(1).int(), min=1).float()
        mu[-1] = A - mu[:-1].sum()
        nu = ious.new_ones(A)
        loss = torch.cat([loss, loss_cls_bg.unsqueeze(0)], dim=0)
        pi = sinkhorn_distance(mu, nu, loss)
        best = pi.argmax(0)  # each anchor: the supplier sending it the most
        out.append(torch.where(best == G, -1, best))
    return torch.stack(out)


def time_call(repeats, fn, *args):
    """Best wall time of ``fn(*args)`` over ``repeats`` runs, and its last output."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    return min(times), out


def detr_batch(B: int, Q: int, G: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(B, Q, 92, generator=g),
        "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.2,
    }
    sizes = torch.randint(1, G + 1, (B,), generator=g).tolist()
    targets = [
        {
            "labels": torch.randint(91, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2,
        }
        for n in sizes
    ]
    return outputs, targets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    B, (H, W) = (2, (128, 160)) if args.quick else (16, (800, 1333))
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, G in [("COCO-like, 7 gts/image", 7), ("crowded, 50 gts/image", 50)]:
        G = min(G, 4) if args.quick else G
        batch = dense_batch(B, G, H, W)
        A = batch[0].shape[0]
        t_ours, ours = time_call(repeats, OTAAssigner(tol=TOL, max_iter=1000), *batch)
        t_ref, ref = time_call(1, official_ota, *batch)
        t_dense, dense_out = time_call(
            1, OTAAssigner(tol=TOL, max_iter=1000, compact=False), *batch
        )
        same_ref = int((ours.gt_index != ref).sum())
        same_dense = int((ours.gt_index != dense_out.gt_index).sum())
        t_sim, _ = time_call(repeats, SimOTAAssigner(), *batch)
        rows.append(
            (
                name,
                B,
                A,
                G,
                t_ours,
                t_ref,
                same_ref,
                t_dense,
                same_dense,
                t_sim,
                int(ours.num_fg.sum()),
                int((ref >= 0).sum()),
            )
        )
    print(
        "\n| batch | images x anchors | OTA (ours) ms | official OTA ms | speed-up | anchors "
        "assigned differently from official | our dense solve ms | differently from our dense | "
        "SimOTA ms | fg ours / official |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, B_, A, _G, t_o, t_r, s_r, t_d, s_d, t_s, fg_o, fg_r in rows:
        print(
            f"| {name} | {B_} x {A} | {t_o * 1e3:.0f} | {t_r * 1e3:.0f} | **{t_r / t_o:.1f}x** "
            f"| {s_r} of {B_ * A} | {t_d * 1e3:.0f} | {s_d} | {t_s * 1e3:.0f} "
            f"| {fg_o} / {fg_r} |"
        )

    print(
        "\n| DETR matcher, batch 16 | queries | HungarianMatcher ms | UOTMatcher (eps 0.05, "
        "balanced, cost / max) ms | UOTMatcher (eps 0, Hungarian limit) ms |"
    )
    print("|---|---|---|---|---|")
    for Q in [20] if args.quick else [100, 300]:
        outputs, targets = detr_batch(4 if args.quick else 16, Q, 10 if args.quick else 30)
        matchers = [
            HungarianMatcher(),
            UOTMatcher(eps=0.05, normalize=True, tol=1e-4),
            UOTMatcher(eps=0.0),
        ]
        t_h, t_u, t_e = (
            statistics.median(time_call(1, m, outputs, targets)[0] for _ in range(repeats + 2))
            for m in matchers
        )
        print(f"| | {Q} | {t_h * 1e3:.1f} | {t_u * 1e3:.1f} | {t_e * 1e3:.1f} |")
    return rows


if __name__ == "__main__":
    main()
