"""A DETR-style training step with the UOT matcher and the UOT paper's plan-weighted loss."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # detectors/ from the clone
from detectors.detr.criterion import SetCriterion  # noqa: E402
from uotmatch.detection import UOTMatcher  # noqa: E402

num_classes, num_queries = 20, 100
# The UOT paper's DETR setting: balanced OT on the cost divided by its maximum.
matcher = UOTMatcher(
    eps=0.12 / (math.log(2 * num_queries) + 1),
    normalize_cost=True,
    cost_class=2.0,
    cost_bbox=5.0,
    cost_giou=2.0,
)
weight_dict = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
criterion = SetCriterion(
    num_classes,
    matcher=matcher,
    weight_dict=weight_dict,
    eos_coef=0.1,
    losses=["labels", "boxes", "cardinality"],
    loss_weighting="plan",  # every (query, target) loss weighted by the plan
)

# DETR's outputs and targets, as its model and data loader give them
outputs = {
    "pred_logits": torch.randn(2, num_queries, num_classes + 1, requires_grad=True),
    "pred_boxes": torch.rand(2, num_queries, 4, requires_grad=True),
}
targets = [
    {
        "labels": torch.tensor([3, 7]),
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]),
    },
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
]
losses = criterion(outputs, targets)
losses["loss"].backward()
print({k: round(v.item(), 4) for k, v in losses.items() if k.startswith("loss")})
# The pairs for a hard loss (decode="hungarian", the default): every target gets a query
pairs = matcher(outputs, targets)
print("matched pairs of image 0:", pairs[0])
paired = [len(gt.unique()) for _, gt in pairs]
print("targets paired:", paired, "of", [len(t["labels"]) for t in targets])
