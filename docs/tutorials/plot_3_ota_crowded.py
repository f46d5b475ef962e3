"""
OTA on a crowded Color Boxes image
==================================

The OTA paper's argument (its Figure 3 and Table 2) is about *ambiguous anchors*: anchor points
that qualify as positives for several ground truths at once, where boxes overlap. Fixed rules
resolve them by hand (smallest area for FCOS, largest IoU for ATSS, cheapest cost for SimOTA);
OTA resolves them by the global optimal transport plan. Here the four assigners label the same
crowded image, and we count the ambiguous anchors as the OTA paper does.
"""

import matplotlib.patches as patches
import matplotlib.pyplot as plt
import numpy as np
import torch

import uotmatch
from detectors.data import colorboxes
from uotmatch.detection import (
    ATSSAssigner,
    FCOSAssigner,
    OTAAssigner,
    SimOTAAssigner,
    anchor_points,
)

# %%
# The scene and the predictions
# -----------------------------
# A crowded Color Boxes image (clusters of overlapping, occluding boxes) of 256 x 256 pixels,
# and FCOS's anchor points over strides 8-128. The predictions imitate a detector part-way
# through training: a point inside one or more boxes predicts the box whose centre is nearest
# (relative to the box's size), with an error that grows with that distance, and scores its
# class at 0.9; every other point predicts a box of four strides around itself at FCOS's prior
# score 0.01. OTA and SimOTA use these predictions in their costs; FCOS and ATSS look at
# geometry alone.
SIZE = 256
rng = np.random.default_rng(3)
image, boxes = colorboxes.render_image(rng, SIZE, crowded=True)
gt_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in boxes], dtype=torch.float)
gt_labels = torch.tensor([label for *_, label in boxes])
G = len(boxes)
points, strides = anchor_points((SIZE, SIZE))
A = len(points)

g = torch.Generator().manual_seed(0)
centres, sizes = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2, gt_boxes[:, 2:] - gt_boxes[:, :2]
inside = (points[:, None] > gt_boxes[None, :, :2]) & (points[:, None] < gt_boxes[None, :, 2:])
inside = inside.all(-1)  # [A, G]
distance = ((points[:, None] - centres[None]) / sizes[None]).norm(dim=-1)  # [A, G]
distance = distance.masked_fill(~inside, float("inf"))
nearest, covered = distance.argmin(1), inside.any(1)
error = strides[:, None] * distance.gather(1, nearest[:, None]).clamp(max=1.0)
guess = gt_boxes[nearest] + error * torch.randn(A, 4, generator=g)
half = 2 * strides[:, None]
pred_boxes = torch.where(covered[:, None], guess, torch.cat([points - half, points + half], 1))[
    None
]
cls_logits = torch.full((1, A, len(colorboxes.COLORS)), -4.595)  # log(0.01 / 0.99)
cls_logits[0, covered, gt_labels[nearest[covered]]] = 2.197  # log(0.9 / 0.1)
inputs = dict(  # the keyword arguments every dense assigner takes
    points=points,
    strides=strides,
    cls_logits=cls_logits,
    pred_boxes=pred_boxes,
    gt_boxes=gt_boxes[None],
    gt_labels=gt_labels[None],
    gt_mask=torch.ones(1, G, dtype=torch.bool),
)
print(f"{G} ground truths, {A} anchor points, {int(covered.sum())} inside a box")

# %%
# Four assignments
# ----------------
# Every assigner takes the same call (FCOS and ATSS read the geometry alone).
results = {
    "FCOS (centre sampling)": FCOSAssigner()(**inputs),
    "ATSS": ATSSAssigner()(**inputs),
    "SimOTA": SimOTAAssigner()(**inputs),
    "OTA": OTAAssigner()(**inputs),
}

# %%
# Ambiguous anchors
# -----------------
# An anchor is a *candidate* of a ground truth when it lies inside the box and within 2.5
# strides of its centre (OTA's centre prior); a candidate of two or more ground truths is
# *contested*. Every assigner below has to decide the contested anchors: we count how many it
# makes foreground. OTA's plan is continuous, and the OTA paper (Table 2) calls an anchor
# ambiguous when its largest plan share is below 0.9 (its unit of mass split between ground
# truths and background); we count those too, on the plan that
# :class:`~uotmatch.detection.OTAAssigner` solves, rebuilt from its costs and supplies.
ota = OTAAssigner()
cost, background, ious, candidate = ota.costs(**inputs)
k = ota.supplies(ious, candidate, inputs["gt_mask"])
m = uotmatch.match(cost, ota.eps, b=k, background_cost=background)
plan = m.plan[0]  # [A, G + 1]
print(f"converged: {m.status[0]} after {int(m.iterations[0])} iterations")
contested = candidate[0].sum(-1) >= 2
split = plan.amax(-1) < 0.9
print(f"contested anchors: {int(contested.sum())}\n")
print(f"{'assigner':24s} {'foreground':>10s} {'contested -> fg':>16s}")
for name, r in results.items():
    fg = r.fg_mask[0]
    print(f"{name:24s} {int(fg.sum()):10d} {int((contested & fg).sum()):16d}")
print(
    f"\nOTA plan rows with max share < 0.9: {int(split.sum())}, of which contested: "
    f"{int((split & contested).sum())}"
)

# %%
# The picture
# -----------
# Each foreground anchor point is drawn in the colour of its ground truth; background points are
# small grey dots. Where boxes overlap, each rule hands every contested point to one box by its
# own criterion (smallest area, largest IoU, cheapest cost). OTA labels more points foreground
# here (each box supplies its dynamic k, the sum of its top IoUs, and these predictions are
# good), and it decides the contested ones by the global cost of all boxes together; those with
# no clear owner keep a split plan. Train a detector (``python -m detectors.fcos.train
# --assigner ota``) and run this with its predictions to see the assignment it learns from.
fig, axes = plt.subplots(2, 2, figsize=(9, 9.4))  # readable at the page's width
for ax, (name, r) in zip(axes.flat, results.items(), strict=True):
    ax.imshow(image, alpha=0.45)  # dimmed, so the points stand out
    for (x1, y1, x2, y2), label in zip(gt_boxes.tolist(), gt_labels.tolist(), strict=True):
        rgb = np.array(colorboxes.COLORS[label][1]) / 255
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=rgb, lw=1))
    index = r.gt_index[0]
    bg = index < 0
    ax.scatter(*points[bg].T, s=3, c="0.6")
    colours = np.array([colorboxes.COLORS[int(gt_labels[j])][1] for j in index[~bg]]) / 255
    ax.scatter(*points[~bg].T, s=22, c=colours.reshape(-1, 3), edgecolors="black", linewidths=0.5)
    n_contested = int((contested & r.fg_mask[0]).sum())
    ax.set_title(f"{name}: {int(r.num_fg[0])} foreground, {n_contested} contested", fontsize=12)
    ax.set_axis_off()
fig.tight_layout()
plt.show()
