"""
The continuum between the limits
================================

The limits of Figure 1 are the ends of continuous families. Here a random scene of boxes is
matched while one knob moves: τ2 from 0 (each prediction to its nearest ground truth) to ∞
(every ground truth served exactly once), and ε from large (everything soft) to small (the
exact matching). We track how many predictions each ground truth gets, the plan's entropy and
its transport cost.
"""

import math

import matplotlib.pyplot as plt
import torch

import uotmatch
from uotmatch.detection import box_cxcywh_to_xyxy, generalized_box_iou

# %%
# A scene: 6 ground-truth boxes and 40 predictions scattered around them (some good, many
# poor), with the ``1 - GIoU`` cost of Figure 1 and a background cost of 0.8.
g = torch.Generator().manual_seed(0)
gt = torch.rand(6, 4, generator=g) * torch.tensor([0.8, 0.8, 0.2, 0.2]) + torch.tensor(
    [0.1, 0.1, 0.05, 0.05]
)
owner = torch.randint(0, 6, (40,), generator=g)
pred = gt[owner] + torch.randn(40, 4, generator=g) * torch.tensor([0.05, 0.05, 0.02, 0.02])
pred[:, 2:] = pred[:, 2:].abs() + 0.01
cost = (1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))).double()
BACKGROUND = 0.8
print(cost.shape)


def summary(m):
    plan = m.plan[:, :-1]  # real columns
    matched = (m.plan.argmax(-1) < plan.shape[1]).float()  # predictions decoded to a gt
    per_gt = torch.bincount(m.plan[matched.bool()].argmax(-1), minlength=plan.shape[1])
    p = m.plan[m.plan > 0]
    entropy = float(-(p * p.log()).sum())
    total = float((plan * cost).sum() + BACKGROUND * m.plan[:, -1].sum())
    return per_gt.tolist(), entropy, total


# %%
# Sweeping τ2 at ε = 0.02, τ1 = ∞
# --------------------------------
# Small τ2: each prediction simply goes to its nearest ground truth (or background), so some
# ground truths collect many predictions. As τ2 grows, the ground-truth marginal is enforced:
# each ground truth receives one unit, the duplicates fall to background. (Every regime takes a
# few Newton steps here; ``iterations`` says how many, and ``converged`` whether they reached
# ``tol``: watch it on your own problems.)
taus = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, math.inf]
rows = []
for tau2 in taus:
    m = uotmatch.match(cost, 0.02, math.inf, tau2, background_cost=BACKGROUND)
    rows.append(summary(m))
    print(f"tau2={tau2:<6g} matched per gt {rows[-1][0]}  iterations {int(m.iterations)}")

fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)  # readable at the page's width
xs = range(len(taus))
labels = [("∞" if math.isinf(t) else f"{t:g}") for t in taus]
counts = torch.tensor([r[0] for r in rows]).T
for j, c in enumerate(counts):
    axes[0].plot(xs, c, marker="o", label=f"gt {j}")
axes[0].set_ylabel("predictions decoded to the gt")
axes[0].legend(fontsize=9, ncol=2)
axes[1].plot(xs, [r[1] for r in rows], marker="o")
axes[1].set_ylabel("plan entropy")
axes[2].plot(xs, [r[2] for r in rows], marker="o")
axes[2].set_ylabel("transport cost <C, P>")
for ax in axes:
    ax.set_xticks(list(xs), labels, fontsize=11)
axes[-1].set_xlabel("τ2", fontsize=12)
fig.tight_layout()
plt.show()

# %%
# Sweeping ε in the balanced regime
# ---------------------------------
# Large ε spreads every prediction's mass over all ground truths (high entropy); as ε shrinks
# the plan concentrates onto the Hungarian matching, which ε = 0 returns exactly.
epss = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.0]
exact = uotmatch.match(cost, 0.0, background_cost=BACKGROUND).gt_index()
rows, agree = [], []
for eps in epss:
    m = uotmatch.match(cost, eps, background_cost=BACKGROUND)
    rows.append(summary(m))
    agree.append(float((m.gt_index() == exact).float().mean()))
    print(f"eps={eps:<6g} entropy {rows[-1][1]:7.2f}  agreement with Hungarian {agree[-1]:.2f}")

fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True)
xs = range(len(epss))
axes[0].plot(xs, [r[1] for r in rows], marker="o")
axes[0].set_ylabel("plan entropy")
axes[1].plot(xs, [r[2] for r in rows], marker="o")
axes[1].set_ylabel("transport cost <C, P>")
axes[2].plot(xs, agree, marker="o")
axes[2].set_ylabel("decoded = Hungarian (fraction)")
for ax in axes:
    ax.set_xticks(list(xs), [f"{e:g}" for e in epss], fontsize=11)
axes[-1].set_xlabel("ε", fontsize=12)
fig.tight_layout()
plt.show()
