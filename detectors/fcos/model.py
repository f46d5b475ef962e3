"""FCOS (Tian et al., 2019) with the OTA code's head: classification, ltrb box and IoU branches."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, batched_nms
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detectors.common.backbone import ResNet
from uotmatch.detection import STRIDES, anchor_points
from uotmatch.detection.boxes import ltrb_to_boxes

__all__ = ["FCOS", "FCOSHead"]

#: P3-P7.
#: Initial foreground probability of the classification branch (focal-loss prior).
PRIOR_PROB = 0.01
GROUP_NORM_GROUPS = 32


def _tower(channels: int, depth: int) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(min(GROUP_NORM_GROUPS, channels), channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Two towers of ``depth`` x (conv 3x3 + GroupNorm + ReLU); classification on one,
    box (ltrb, ``ReLU(scale_l * x) * stride``) and IoU on the other, shared across levels."""

    def __init__(
        self, channels: int, num_classes: int, depth: int = 4, strides: tuple[int, ...] = STRIDES
    ):
        super().__init__()
        self.strides = strides
        self.cls_tower, self.box_tower = _tower(channels, depth), _tower(channels, depth)
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box = nn.Conv2d(channels, 4, 3, padding=1)
        self.iou = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, A, K]`` class logits, ``[B, A, 4]`` ltrb distances (pixels), ``[B, A]`` IoU
        logits, levels concatenated in order."""
        cls, box, iou = [], [], []
        for level, x in enumerate(features):
            c, r = self.cls_tower(x), self.box_tower(x)
            cls.append(self.cls(c).flatten(2).mT)
            ltrb = torch.relu(self.scales[level] * self.box(r)) * self.strides[level]
            box.append(ltrb.flatten(2).mT)
            iou.append(self.iou(r).flatten(1))
        return torch.cat(cls, 1), torch.cat(box, 1), torch.cat(iou, 1)


#: Key prefixes of checkpoints written before the FPN was torchvision's (our own FPN module):
#: old -> new. Such checkpoints load unchanged (see :meth:`FCOS._load_from_state_dict`).
LEGACY_FPN_KEYS = (
    ("fpn.lateral.{i}.", "fpn.inner_blocks.{i}.0."),
    ("fpn.output.{i}.", "fpn.layer_blocks.{i}.0."),
    ("fpn.p6.", "fpn.extra_blocks.p6."),
    ("fpn.p7.", "fpn.extra_blocks.p7."),
)


class FCOS(nn.Module):
    """Backbone + FPN (torchvision's, P3-P5 from C3-C5, P6 and P7 from P5 as FCOS) + head.
    ``forward(images)`` returns the raw outputs and the points."""

    def __init__(
        self, num_classes: int, backbone: ResNet, channels: int = 256, head_depth: int = 4
    ):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(
            list(backbone.out_channels), channels, extra_blocks=LastLevelP6P7(channels, channels)
        )
        self.head = FCOSHead(channels, num_classes, head_depth)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints from before the torchvision FPN (keys ``fpn.lateral.0.weight``, ...) are
        renamed to torchvision's layout: same tensors, same parameter order."""
        for old, new in LEGACY_FPN_KEYS:
            for i in range(len(self.backbone.out_channels)) if "{i}" in old else [None]:
                o, n = prefix + old.format(i=i), prefix + new.format(i=i)
                for suffix in ("weight", "bias"):
                    if o + suffix in state_dict:
                        state_dict[n + suffix] = state_dict.pop(o + suffix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        c = self.backbone(images)
        features = list(self.fpn(OrderedDict((str(i), x) for i, x in enumerate(c))).values())
        cls, ltrb, iou = self.head(features)
        sizes = [tuple(f.shape[-2:]) for f in features]
        points, strides = anchor_points(sizes, self.head.strides, device=images.device)
        return {
            "cls_logits": cls,
            "ltrb": ltrb,
            "iou_logits": iou,
            "points": points,
            "strides": strides,
            "boxes": ltrb_to_boxes(points[None], ltrb),
        }

    @torch.no_grad()
    def detect(
        self,
        outputs: dict[str, Tensor],
        score_threshold: float = 0.05,
        top_per_level: int = 1000,
        nms_threshold: float = 0.6,
        max_per_image: int = 100,
    ) -> list[dict[str, Tensor]]:
        """Post-processing: score ``sqrt(p_cls * p_iou)``, the top ``top_per_level`` of each
        level above ``score_threshold``, class-aware NMS, the best ``max_per_image``."""
        scores = (
            outputs["cls_logits"].float().sigmoid()
            * outputs["iou_logits"].float().sigmoid()[..., None]
        ).sqrt()  # [B, A, K]
        strides = outputs["strides"]
        results = []
        for b in range(scores.shape[0]):
            keep_boxes, keep_scores, keep_labels = [], [], []
            for s in strides.unique():
                level = torch.nonzero(strides == s).flatten()
                sc = scores[b, level].flatten()
                sc, idx = sc.topk(min(top_per_level, sc.numel()))
                ok = sc > score_threshold
                sc, idx = sc[ok], idx[ok]
                anchor, label = level[idx // self.num_classes], idx % self.num_classes
                keep_boxes.append(outputs["boxes"][b, anchor].float())
                keep_scores.append(sc)
                keep_labels.append(label)
            boxes, sc, labels = (
                torch.cat(keep_boxes),
                torch.cat(keep_scores),
                torch.cat(keep_labels),
            )
            keep = batched_nms(boxes, sc, labels, nms_threshold)[:max_per_image]
            results.append({"boxes": boxes[keep], "scores": sc[keep], "labels": labels[keep]})
        return results
