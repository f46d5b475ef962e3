"""torchvision's FCOS trained with OTA's matching: one step on random data."""

import torch
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from uotmatch.detection import OTAAssigner
from uotmatch.integrations.torchvision import use_assigner

backbone = resnet_fpn_backbone(
    backbone_name="resnet18",
    weights=None,  # nothing is downloaded; pass weights="DEFAULT" where you have them
    trainable_layers=5,
    returned_layers=[2, 3, 4],
    extra_blocks=LastLevelP6P7(256, 256),
)
model = FCOS(backbone, num_classes=20, min_size=128, max_size=128)
model = use_assigner(model, OTAAssigner())  # the one line that changes the matching

images = [torch.rand(3, 128, 128) for _ in range(2)]
targets = [
    {
        "boxes": torch.tensor([[10.0, 20, 60, 70], [40, 40, 100, 90]]),
        "labels": torch.tensor([3, 7]),
    },
    {"boxes": torch.tensor([[5.0, 5, 30, 30]]), "labels": torch.tensor([1])},
]
model.train()
losses = model(images, targets)  # torchvision's losses, OTA's matched_idxs
sum(losses.values()).backward()
print({k: round(v.item(), 3) for k, v in losses.items()})
print("foreground anchors per image:", model.uotmatch_result.num_fg.tolist())
