"""Assigner speed and agreement: our batched OTA against the official OTA procedure, SimOTA, DETR
matchers.

    python benchmarks/bench_assigners.py                 # the workloads below, CPU (minutes)
    python benchmarks/bench_assigners.py --quick         # smoke run
    python benchmarks/bench_assigners.py --device cuda   # on a GPU (CUDA-event timings)

The reference is the official OTA code's procedure (Megvii-BaseDetection/OTA,
``playground/detection/coco/ota.res50.fpn.coco.800size.1x/fcos.py``, ``get_ground_truth``), run
per image as that code does: the focal loss materialised over ``[G, A, K]``, ``-log max(IoU,
float32 eps)`` weighted 1.5, the 1e6 centre-prior penalty on every other anchor, dynamic k
(``clamp(int(sum of the top-20 IoUs), min=1)``), ``SinkhornDistance`` (50 log-domain
iterations, eps 0.1) over all anchors, each supplier's plan row divided by its maximum, then
each anchor to the argmax. Ours is ``OTAAssigner(tol=1e-5)``: batched, over the candidate
anchors only, iterated to the tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_solver import STRIDES, device_timer  # noqa: E402

from uotmatch._options import MAX_ITER  # noqa: E402
from uotmatch.detection import (  # noqa: E402
    CENTER_PRIOR_PENALTY,
    HungarianMatcher,
    OTAAssigner,
    SimOTAAssigner,
    UOTMatcher,
    anchor_points,
)
from uotmatch.detection.boxes import box_iou, ltrb_to_boxes, points_to_ltrb  # noqa: E402

NUM_CLASSES = 80
TOL = 1e-5


def dense_batch(B: int, G: int, height: int = 800, width: int = 1333, seed: int = 0, device="cpu"):
    """A COCO-like batch: detector outputs part-way through training (boxes near the objects),
    as the assigners' keyword arguments."""
    g = torch.Generator().manual_seed(seed)
    points, strides = anchor_points((height, width), STRIDES)
    A = len(points)
    size = torch.exp(torch.rand(B, G, 2, generator=g) * 3.2 + 2.8)  # ~16 to ~400 px
    ctr = torch.rand(B, G, 2, generator=g) * torch.tensor([width, height])
    gt_boxes = torch.cat([ctr - size / 2, ctr + size / 2], -1)
    gt_labels = torch.randint(NUM_CLASSES, (B, G), generator=g)
    ltrb = torch.rand(B, A, 4, generator=g) * 4 * strides[None, :, None] + 2
    pred_boxes = ltrb_to_boxes(points[None], ltrb)
    logits = torch.randn(B, A, NUM_CLASSES, generator=g) - 4.0
    batch = dict(
        points=points,
        strides=strides,
        cls_logits=logits,
        pred_boxes=pred_boxes,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
    )
    return {k: v.to(device) for k, v in batch.items()}


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0):
    """fvcore's sigmoid_focal_loss (what the official OTA code calls)."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def sinkhorn_distance(mu, nu, C, eps=0.1, max_iter=50):
    """The official OTA code's SinkhornDistance.forward: C is [suppliers, demanders]."""
    u, v = torch.ones_like(mu), torch.ones_like(nu)

    def M(u, v):
        return (-C + u.unsqueeze(-1) + v.unsqueeze(-2)) / eps

    for _ in range(max_iter):
        v = eps * (torch.log(nu + 1e-8) - torch.logsumexp(M(u, v).transpose(-2, -1), dim=-1)) + v
        u = eps * (torch.log(mu + 1e-8) - torch.logsumexp(M(u, v), dim=-1)) + u
    return torch.exp(M(u, v))


@torch.no_grad()
def official_ota(points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, q=20, reg=1.5):
    """The official OTA code's ``get_ground_truth``, one image at a time: ``[B, A]`` indices."""
    out = []
    float_eps = torch.finfo(torch.float32).eps
    for img in range(cls_logits.shape[0]):
        boxes, labels, A = gt_boxes[img], gt_labels[img], cls_logits.shape[1]
        G = len(boxes)
        deltas = points_to_ltrb(points, boxes)  # [A, G, 4]
        is_in_boxes = deltas.amin(-1) > 0.01
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2
        radius = (2.5 * strides)[:, None, None]  # [A, 1, 1]
        lo = torch.maximum(centers[None] - radius, boxes[None, :, :2])
        hi = torch.minimum(centers[None] + radius, boxes[None, :, 2:])
        p = points[:, None, :]
        is_in_centers = torch.cat([p - lo, hi - p], -1).amin(-1) > 0
        cand = (is_in_boxes & is_in_centers).T  # [G, A]
        shape = (G, A, -1)
        gt_cls = F.one_hot(labels, NUM_CLASSES).float()
        logits = cls_logits[img]
        loss_cls = sigmoid_focal_loss(
            logits.unsqueeze(0).expand(shape), gt_cls.unsqueeze(1).expand(shape)
        ).sum(-1)
        loss_cls_bg = sigmoid_focal_loss(logits, torch.zeros_like(logits)).sum(-1)
        ious = box_iou(boxes, pred_boxes[img])  # [G, A]: the IoU of the ltrb boxes
        loss_delta = -ious.clamp(min=float_eps).log()
        loss = loss_cls + reg * loss_delta + CENTER_PRIOR_PENALTY * (1 - cand.float())
        topk_ious, _ = torch.topk(ious * cand.float(), q, dim=1)
        mu = ious.new_ones(G + 1)
        mu[:-1] = torch.clamp(topk_ious.sum(1).int(), min=1).float()
        mu[-1] = A - mu[:-1].sum()
        nu = ious.new_ones(A)
        loss = torch.cat([loss, loss_cls_bg.unsqueeze(0)], dim=0)
        pi = sinkhorn_distance(mu, nu, loss)
        pi = pi / pi.max(dim=1).values.unsqueeze(1)  # each supplier's best anchor scores 1
        best = pi.argmax(0)
        out.append(torch.where(best == G, -1, best))
    return torch.stack(out)


def time_call(repeats, fn, device, **kwargs):
    """Best time of ``fn(**kwargs)`` over ``repeats`` runs after one warm-up (CUDA events on a
    GPU), and its output."""
    timer = device_timer(device)
    out = fn(**kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        with timer() as t:
            out = fn(**kwargs)
        times.append(t.seconds)
    return min(times), out


def detr_batch(B: int, Q: int, G: int, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(B, Q, 92, generator=g).to(device),
        "pred_boxes": (torch.rand(B, Q, 4, generator=g) * 0.5 + 0.2).to(device),
    }
    sizes = torch.randint(1, G + 1, (B,), generator=g).tolist()
    targets = [
        {
            "labels": torch.randint(91, (n,), generator=g).to(device),
            "boxes": (torch.rand(n, 4, generator=g) * 0.5 + 0.2).to(device),
        }
        for n in sizes
    ]
    return outputs, targets


def agreement(ours: torch.Tensor, ref: torch.Tensor, G: int) -> dict:
    """Anchors assigned differently, positives, and ground truths left without a positive."""

    def unserved(index):
        served = torch.zeros(index.shape[0], G, dtype=torch.bool, device=index.device)
        fg = index >= 0
        served[torch.nonzero(fg)[:, 0], index[fg]] = True
        return int((~served).sum())

    return {
        "differ": int((ours != ref).sum()),
        "fg": (int((ours >= 0).sum()), int((ref >= 0).sum())),
        "unserved": (unserved(ours), unserved(ref)),
    }


def _detr_hungarian():
    """DETR's own ``HungarianMatcher`` (the copy in Hugging Face transformers, DETR's default
    weights), or None without transformers: the peer a DETR user swaps out."""
    try:
        from transformers.loss.loss_for_object_detection import HungarianMatcher as DETRs
    except ImportError:
        return None
    return DETRs(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    B, (H, W) = (2, (128, 160)) if args.quick else (16, (800, 1333))
    rows, lines = [], []

    def say(text=""):
        print(text)
        lines.append(text)

    say(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads")
    for name, G in [("COCO-like, 7 gts/image", 7), ("crowded, 50 gts/image", 50)]:
        G = min(G, 4) if args.quick else G
        batch = dense_batch(B, G, H, W, device=device)
        A = batch["points"].shape[0]
        t_ours, ours = time_call(repeats, OTAAssigner(tol=TOL), device, **batch)
        t_ref, ref = time_call(1, official_ota, device, **batch)
        t_dense, dense = time_call(1, OTAAssigner(tol=TOL, candidates_only=False), device, **batch)
        argmax = OTAAssigner(tol=TOL, decode="argmax")(**batch)
        t_sim, _ = time_call(repeats, SimOTAAssigner(), device, **batch)
        rows.append(
            {
                "batch": name,
                "B": B,
                "A": A,
                "ours_s": t_ours,
                "official_s": t_ref,
                "dense_s": t_dense,
                "simota_s": t_sim,
                "vs_official": agreement(ours.gt_index, ref, G),
                "vs_dense": agreement(ours.gt_index, dense.gt_index, G),
                "argmax_vs_official": agreement(argmax.gt_index, ref, G),
            }
        )
    say(
        "\n| batch | images x anchors | OTA (ours) ms | official OTA ms | speed-up | anchors "
        "assigned differently from official | positives ours / official | ground truths "
        "without a positive, ours / official | raw-argmax decoding: differently / positives / "
        "unserved | our dense solve ms | differently from our dense | SimOTA ms |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, a, d = r["vs_official"], r["argmax_vs_official"], r["vs_dense"]
        say(
            f"| {r['batch']} | {r['B']} x {r['A']} | {r['ours_s'] * 1e3:.0f} "
            f"| {r['official_s'] * 1e3:.0f} | **{r['official_s'] / r['ours_s']:.1f}x** "
            f"| {o['differ']} of {r['B'] * r['A']} | {o['fg'][0]} / {o['fg'][1]} "
            f"| {o['unserved'][0]} / {o['unserved'][1]} "
            f"| {a['differ']} / {a['fg'][0]} / {a['unserved'][0]} "
            f"| {r['dense_s'] * 1e3:.0f} | {d['differ']} | {r['simota_s'] * 1e3:.0f} |"
        )

    detr_own = _detr_hungarian()
    say(
        "\n| DETR matcher | batch x queries | HungarianMatcher ms | UOTMatcher() ms (defaults: eps "
        "0.05, balanced, cost / max, decode hungarian) | ratio | images at max_iter "
        "| UOTMatcher(eps=0) ms (Hungarian limit) | DETR's own HungarianMatcher ms (Hugging "
        "Face's copy, flattened batch) | UOTMatcher() / DETR's |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    sizes = [(4, 20)] if args.quick else [(4, 100), (16, 100), (16, 300)]
    for B, Q in sizes:
        outputs, targets = detr_batch(B, Q, 10 if args.quick else 30)
        outputs = {k: v.to(device) for k, v in outputs.items()}
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        matchers = [HungarianMatcher(), UOTMatcher(), UOTMatcher(eps=0.0)]
        t_h, t_u, t_e = (
            statistics.median(
                time_call(1, m, device, outputs=outputs, targets=targets)[0]
                for _ in range(repeats + 2)
            )
            for m in matchers
        )
        at_max = int((matchers[1].solve(outputs, targets).iterations >= MAX_ITER).sum())
        own = "n/a (transformers not installed) | n/a"
        if detr_own is not None:
            hf_outputs = {"logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
            hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
            t_d = statistics.median(
                time_call(1, detr_own, device, outputs=hf_outputs, targets=hf_targets)[0]
                for _ in range(repeats + 2)
            )
            own = f"{t_d * 1e3:.1f} | {t_u / t_d:.1f}x"
        say(
            f"| | {B} x {Q} | {t_h * 1e3:.1f} | {t_u * 1e3:.1f} | {t_u / t_h:.1f}x "
            f"| {at_max} of {B} | {t_e * 1e3:.1f} | {own} |"
        )
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
