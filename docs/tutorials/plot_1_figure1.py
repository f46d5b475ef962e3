"""
The UOT paper's Figure 1, reproduced
====================================

One cost matrix, six matching strategies. Figure 1b of De Plaen et al. (CVPR 2023) gives the
``1 - GIoU`` costs between five predictions (rows 1-5) and two ground truths A and B, with a
background cost ``c∅ = 0.8``. Each panel below is :func:`uotmatch.match` on that matrix with the
panel's (ε, τ1, τ2): the three limits at ε = 0 are solved exactly, the three regularised ones
by the scaling algorithm.
"""

import math

import matplotlib.pyplot as plt
from figure1 import BACKGROUND_COST, COST, GROUND_TRUTHS, REGIMES, hard_matches

import uotmatch

print(COST)

# %%
# The plans
# ---------
# Rows are predictions, columns A, B and the background ∅. Panels (c)-(e) are the classic
# strategies as limits: every prediction to its nearest ground truth (the background cost acts
# as a threshold: predictions 2 and 3 stay background, 1 and 4 both go to A), Hungarian
# one-to-one matching, and every ground truth to its best prediction (A and B both take
# prediction 4). Panels (f)-(h) add entropic smoothing with unbalanced, balanced and the
# reversed unbalanced marginals.

fig, axes = plt.subplots(2, 3, figsize=(10, 7))
for ax, (panel, (title, eps, tau1, tau2)) in zip(axes.flat, REGIMES.items(), strict=True):
    m = uotmatch.match(COST, eps, tau1, tau2, background_cost=BACKGROUND_COST)
    plan = m.plan.numpy()
    ax.imshow(plan, cmap="Blues", vmin=0, vmax=1)
    for i in range(plan.shape[0]):
        for j in range(plan.shape[1]):
            color = "white" if plan[i, j] > 0.5 else "black"
            ax.text(j, i, f"{plan[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(3), [*GROUND_TRUTHS, "∅"])
    ax.set_yticks(range(5), [str(i + 1) for i in range(5)])

    def fmt(t):
        return "∞" if math.isinf(t) else f"{t:g}"

    ax.set_title(f"({panel}) {title}\nε={eps:g}, τ1={fmt(tau1)}, τ2={fmt(tau2)}", fontsize=9)
    print(f"({panel}) hard matches:", ", ".join(f"{p}->{g}" for p, g in hard_matches(m.plan)))
fig.tight_layout()
plt.show()

# %%
# What the regimes say
# --------------------
# * (c) ``τ2 = 0``: the ground truths' masses are free, so A is matched twice and nothing stops
#   a ground truth from being missed; this is anchor-style "nearest ground truth" matching.
# * (d) both marginals hard at ε = 0: Hungarian matching with a background, 4 -> A and 5 -> B.
# * (e) ``τ1 = 0``: predictions are free, so both ground truths take prediction 4.
# * (g) balanced OT at ε = 0.05 keeps (d)'s matches as the largest entries, but spreads mass to
#   the runner-up pairs: this soft plan is what OTA decodes and what the UOT paper's loss weighs.
# * (f) and (h) interpolate towards (c) and (e): a finite τ is a soft version of the limit.
