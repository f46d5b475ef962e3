"""A Hugging Face Deformable DETR trained with the UOT paper's plan-weighted loss, offline."""

import os

# Nothing is downloaded: the model is built from its config, with random weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    ResNetConfig,
)

from uotmatch.integrations.transformers import use_matcher  # noqa: E402

backbone = ResNetConfig(  # a tiny ResNet with random weights, three feature levels
    embedding_size=8,
    hidden_sizes=[8, 16, 16, 16],
    depths=[1, 1, 1, 1],
    layer_type="basic",
    out_features=["stage2", "stage3", "stage4"],
)
config = DeformableDetrConfig(
    backbone_config=backbone,
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    num_queries=20,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    num_labels=3,
    auxiliary_loss=True,
)
torch.manual_seed(0)
model = DeformableDetrForObjectDetection(config)  # or .from_pretrained(...): then call use_matcher

use_matcher(model, "uot", loss="plan", eps=0.05)  # the config's costs, the family's focal cost

images = torch.rand(2, 3, 64, 64)
labels = [  # HF's targets: class_labels and normalised cxcywh boxes
    {
        "class_labels": torch.tensor([0, 2]),
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
    },
    {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
for step in range(3):
    out = model(pixel_values=images, labels=labels)  # HF's loss with the UOT plan
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    box = out.loss_dict["loss_bbox"].item()
    print(f"step {step}: loss {out.loss.item():.4f}, loss_bbox {box:.4f}")
print("matchings made:", model.loss_function.matcher.calls)
