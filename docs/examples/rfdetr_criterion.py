"""RF-DETR Nano's criterion with the UOT matcher: its 13 query groups in one batched solve."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rfdetr.config import RFDETRNanoConfig, TrainConfig  # noqa: E402
from rfdetr.models.lwdetr import build_criterion_from_config, build_model_from_config  # noqa: E402

from uotmatch.integrations.rfdetr import use_matcher  # noqa: E402

model_config = RFDETRNanoConfig(pretrain_weights=None, num_classes=3, resolution=128)
train_config = TrainConfig(dataset_dir=".", output_dir=".")
torch.manual_seed(0)
model = build_model_from_config(model_config, train_config)  # random weights, no download
criterion, postprocess = build_criterion_from_config(model_config, train_config)

use_matcher(criterion, "uot", eps=0.05)  # RF-DETR's costs, solved as balanced entropic OT

images = torch.rand(2, 3, 128, 128)
targets = [  # RF-DETR's targets: labels and normalised cxcywh boxes
    {
        "labels": torch.tensor([0, 2]),
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
    },
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
losses = criterion(model.train()(images), targets)
loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
optimizer.zero_grad()
loss.backward()
optimizer.step()
print(f"loss {loss.item():.4f}; matchings made: {criterion.matcher.calls}")
