"""Feature pyramid P3-P7 (FCOS's variant: P6 from P5, P7 from ReLU(P6)), and class-aware NMS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uotmatch.detection import box_iou

__all__ = ["FPN", "batched_nms"]


class FPN(nn.Module):
    """``[C3, C4, C5] -> [P3, P4, P5, P6, P7]`` (strides 8 to 128), each ``channels`` wide."""

    def __init__(self, in_channels: tuple[int, int, int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels
        )
        self.p6 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.output, laterals, strict=True)]
        p6 = self.p6(outs[-1])
        return [*outs, p6, self.p7(F.relu(p6))]


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """Greedy class-aware NMS: indices of the kept boxes, by decreasing score.

    A box is dropped when a higher-scoring box of the same class overlaps it with IoU above the
    threshold. Plain torch (torchvision's ``batched_nms`` semantics); the loop runs once per
    kept box.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    boxes, classes = boxes[order], classes[order]
    iou = box_iou(boxes, boxes)
    same = classes[:, None] == classes[None, :]
    suppress = (iou > iou_threshold) & same  # [n, n]
    alive = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    while True:
        remaining = torch.nonzero(alive)
        if remaining.numel() == 0:
            break
        i = int(remaining[0])
        keep.append(i)
        alive &= ~suppress[i]
        alive[i] = False
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]
