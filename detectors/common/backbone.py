"""ResNet-18/34/50 backbones from ``torchvision.models`` with frozen batch norm, returning C3-C5.

The layers are torchvision's own (``torchvision.models.resnet*`` built with
``norm_layer=torchvision.ops.FrozenBatchNorm2d``, no classifier), kept under torchvision's key
names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a local torchvision checkpoint loads with
:func:`load_backbone_weights` (``torch.load(..., weights_only=True)``; nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["DEPTHS", "ResNet", "build_resnet", "load_backbone_weights"]

#: The supported depths (``torchvision.models.resnet{depth}``).
DEPTHS = (18, 34, 50)


class ResNet(nn.Module):
    """A torchvision ResNet with frozen batch norm, returning ``[C3, C4, C5]`` (strides 8-32).

    Args:
        depth: 18, 34 or 50.
        freeze_at: 0 trains everything; 1 freezes the stem; ``k > 1`` also stages 1..k-1
            (detectron's convention: 2 freezes stem + layer1).
    """

    def __init__(self, depth: int = 18, freeze_at: int = 2):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {list(DEPTHS)}, got {depth}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in [0, 5], got {freeze_at}")
        self.depth = depth
        net = getattr(torchvision.models, f"resnet{depth}")(
            weights=None, norm_layer=FrozenBatchNorm2d
        )
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        # From scratch, frozen batch norm is the identity (no statistics yet), and torchvision's
        # fan-out Kaiming initialisation lets activations grow through every residual addition:
        # the demo's FCOS lost 14 AP in 6 epochs with it. PyTorch's default conv initialisation
        # keeps them bounded. Loaded weights (--backbone-weights) replace it anyway.
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        width = net.fc.in_features // 8  # 64 (basic blocks) or 256 (bottlenecks)
        self.out_channels = (2 * width, 4 * width, 8 * width)  # C3, C4, C5
        stages = [nn.ModuleList([self.conv1, self.bn1])] + [
            getattr(self, f"layer{i}") for i in range(1, 5)
        ]
        for stage in stages[:freeze_at]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer2(self.layer1(x))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


def build_resnet(depth: int = 18, freeze_at: int = 2, weights: str | Path | None = None) -> ResNet:
    model = ResNet(depth, freeze_at)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def load_backbone_weights(model: ResNet, path: str | Path) -> None:
    """Load a local torchvision ResNet checkpoint (``fc.*`` ignored, ``num_batches_tracked``
    dropped by the frozen batch norm); errors name what is missing or unexpected."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--backbone-weights: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, wrong format, ...
        reason = next((x for x in str(exc).splitlines() if x.strip()), type(exc).__name__)
        raise ValueError(
            f"--backbone-weights: cannot load {path} ({reason.strip()}): give a torchvision "
            "ResNet state dict saved with torch.save"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--backbone-weights: {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(
            f"--backbone-weights: {path} does not fit a ResNet-{model.depth}: "
            f"{str(exc).splitlines()[-1].strip()}"
        ) from exc
    missing = list(result.missing_keys)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"--backbone-weights: {path} does not fit a ResNet-{model.depth}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
