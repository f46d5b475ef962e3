"""The UOT paper's Figure 1: one cost matrix, six matching regimes.

Costs are ``1 - GIoU`` between 5 predictions (rows 1-5) and ground truths A, B, from Figure 1b of
De Plaen et al., "Unbalanced Optimal Transport: A Unified Framework for Object Detection",
CVPR 2023; the background cost is ``c∅ = 0.8``. Run ``python docs/examples/figure1.py`` (or
``make figure1``) to print the plan and the hard matches of the regimes (c)-(h). A docs example,
not part of the library: the tutorial and the tests import it from here.
"""

from __future__ import annotations

import argparse
import math

import torch

from uotmatch import match

__all__ = ["BACKGROUND_COST", "COST", "GROUND_TRUTHS", "REGIMES", "hard_matches", "main"]

#: ``[5, 2]`` costs (1 - GIoU), predictions 1..5 by ground truths A, B (Figure 1b).
COST = torch.tensor(
    [
        [0.61, 0.96],
        [1.34, 0.88],
        [0.88, 0.89],
        [0.40, 0.65],
        [1.11, 0.73],
    ],
    dtype=torch.float64,
)
#: Background cost c∅ of Figure 1b.
BACKGROUND_COST = 0.8
GROUND_TRUTHS = ("A", "B")
#: Panel -> (title, eps, tau1, tau2), as captioned in Figure 1.
REGIMES = {
    "c": ("prediction to best ground truth", 0.0, math.inf, 0.0),
    "d": ("Hungarian matching", 0.0, math.inf, math.inf),
    "e": ("ground truth to best prediction", 0.0, 0.0, math.inf),
    "f": ("unbalanced OT", 0.05, 100.0, 0.01),
    "g": ("balanced OT", 0.05, math.inf, math.inf),
    "h": ("unbalanced OT", 0.05, 0.01, 100.0),
}
#: A prediction and a ground truth count as matched when the pair carries at least this mass
#: (a majority of the prediction's unit mass).
HARD_MATCH_MASS = 0.5


def hard_matches(plan: torch.Tensor) -> list[tuple[int, str]]:
    """``(prediction number, ground truth name)`` pairs with plan mass >= ``HARD_MATCH_MASS``."""
    pairs = torch.nonzero(plan[:, : len(GROUND_TRUTHS)] >= HARD_MATCH_MASS).tolist()
    return [(i + 1, GROUND_TRUTHS[j]) for i, j in pairs]


#: What ``main`` prints first: the figure's setting, as plain text.
HEADER = (
    "The UOT paper's Figure 1 (De Plaen et al., CVPR 2023): costs 1 - GIoU between 5\n"
    "predictions (rows 1-5) and ground truths A, B (Figure 1b), background cost 0.8 (column\n"
    "∅). For each regime (c)-(h): the plan, and its hard matches (plan mass >= 0.5)."
)


def main(argv: list[str] | None = None) -> None:
    """Print the plan and hard matches of every regime of Figure 1."""
    argparse.ArgumentParser(
        prog="python docs/examples/figure1.py",
        description="The UOT paper's Figure 1: one cost matrix, the plans of six matching regimes.",
    ).parse_args(argv)
    print(HEADER + "\n")
    for panel, (title, eps, tau1, tau2) in REGIMES.items():
        m = match(COST, eps, tau1, tau2, background_cost=BACKGROUND_COST)
        print(f"({panel}) {title}: eps={eps:g}, tau1={tau1:g}, tau2={tau2:g}")
        print("        " + "".join(f"{h:>7}" for h in (*GROUND_TRUTHS, "∅")))
        for i, row in enumerate(m.plan.tolist()):
            print(f"    {i + 1:>3} " + "".join(f"{p:7.3f}" for p in row))
        matches = ", ".join(f"{p}->{g}" for p, g in hard_matches(m.plan)) or "none"
        print(f"    hard matches: {matches}\n")


if __name__ == "__main__":
    main()
