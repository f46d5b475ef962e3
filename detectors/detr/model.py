"""DETR (Carion et al., 2020): torchvision's ResNet, 1x1 projection, sine positions, a
transformer encoder-decoder, a class head (K + 1, no-object last) and a box MLP (sigmoid cxcywh).

The attention layers are ``torch.nn.MultiheadAttention`` arranged as DETR's: the positional
encodings are added to the queries and keys of *every* layer (not once to the input, which is
all ``torch.nn.Transformer`` allows), post-norm, and the decoder returns every layer's output for
the auxiliary losses. Defaults are sized for CPU experiments; DETR-R50 is ``depth=50,
hidden_dim=256, enc_layers=6, dec_layers=6, dim_feedforward=2048, num_queries=100,
feature_level=5``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectors.common.backbone import ResNet
from uotmatch.detection.boxes import box_cxcywh_to_xyxy

__all__ = ["DETR", "MLP", "PositionEmbeddingSine", "Transformer"]

#: Backbone feature levels the model can read: C3, C4, C5 (strides 8, 16, 32).
FEATURE_LEVELS = (3, 4, 5)
#: Groups of the GroupNorm after the input projection (``hidden_dim`` must be a multiple).
GROUP_NORM_GROUPS = 32
#: Detections kept per image at inference (COCO's maxDets).
MAX_DETECTIONS = 100


class PositionEmbeddingSine(nn.Module):
    """DETR's sine encoding of normalised (y, x) positions, ``[B, 2 * num_pos_feats, H, W]``;
    padded pixels do not count toward the positions."""

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000.0):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature

    def forward(self, pad_mask: Tensor) -> Tensor:
        not_mask = (~pad_mask).float()  # [B, H, W]
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps, scale = 1e-6, 2 * math.pi
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=pad_mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        px, py = x[..., None] / dim_t, y[..., None] / dim_t  # [B, H, W, F]
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(d, dim_feedforward, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        q = k = src + pos
        attn = self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout(attn))
        return self.norm2(src + self.ffn(src))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, nheads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(d, dim_feedforward, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor, memory_mask: Tensor
    ) -> Tensor:
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn = self.cross_attn(
            tgt + query_pos, memory + pos, memory, key_padding_mask=memory_mask, need_weights=False
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attn))
        return self.norm3(tgt + self.ffn(tgt))


def _ffn(d: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, d),
        nn.Dropout(dropout),
    )


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries; returns every
    decoder layer's (normalised) output, ``[L, B, Q, d]``."""

    def __init__(
        self,
        d: int = 128,
        nheads: int = 8,
        enc_layers: int = 2,
        dec_layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.encoder = nn.ModuleList(
            EncoderLayer(d, nheads, dim_feedforward, dropout) for _ in range(enc_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(d, nheads, dim_feedforward, dropout) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, pad_mask: Tensor, query: Tensor, pos: Tensor) -> Tensor:
        """``src [B, d, H, W]``, ``pad_mask [B, H, W]``, ``query [Q, d]``, ``pos [B, d, H, W]``."""
        memory = src.flatten(2).transpose(1, 2)  # [B, HW, d]
        pos = pos.flatten(2).transpose(1, 2)
        mask = pad_mask.flatten(1)  # [B, HW]
        for layer in self.encoder:
            memory = layer(memory, pos, mask)
        query_pos = query.unsqueeze(0).expand(src.shape[0], -1, -1)  # [B, Q, d]
        tgt = torch.zeros_like(query_pos)
        outs = []
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, query_pos, mask)
            outs.append(self.decoder_norm(tgt))
        return torch.stack(outs)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, d_in: int, hidden: int, d_out: int, num_layers: int):
        super().__init__()
        dims = [d_in] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """``forward(images [B, 3, H, W], pad_mask [B, H, W])`` ->

    * ``pred_logits [B, Q, K + 1]`` (no-object last; ``[B, Q, K]`` sigmoid logits with ``focal``),
    * ``pred_boxes [B, Q, 4]``: cxcywh normalised by each image's unpadded size,
    * ``aux_outputs``: the same two for every decoder layer but the last (with ``aux_loss``),
    * ``image_sizes [B, 2]``: each image's unpadded ``(h, w)``, for :meth:`detect`.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: ResNet,
        hidden_dim: int = 128,
        nheads: int = 8,
        enc_layers: int = 2,
        dec_layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
        num_queries: int = 50,
        feature_level: int = 4,
        aux_loss: bool = True,
        focal: bool = False,
    ):
        super().__init__()
        if feature_level not in FEATURE_LEVELS:
            raise ValueError(f"feature_level must be one of {FEATURE_LEVELS}, got {feature_level}")
        if hidden_dim % GROUP_NORM_GROUPS or hidden_dim % nheads:
            raise ValueError(
                f"hidden_dim must be a multiple of {GROUP_NORM_GROUPS} and of nheads, got "
                f"{hidden_dim} and {nheads}"
            )
        self.num_classes, self.num_queries = num_classes, num_queries
        self.feature_level, self.aux_loss, self.focal = feature_level, aux_loss, focal
        self.backbone = backbone
        in_channels = backbone.out_channels[FEATURE_LEVELS.index(feature_level)]
        # The projection is normalised (as Deformable DETR's): a backbone trained from scratch
        # has no BatchNorm statistics, and its raw features are small next to the positions.
        self.input_proj = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 1), nn.GroupNorm(GROUP_NORM_GROUPS, hidden_dim)
        )
        self.position = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer = Transformer(
            hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes if focal else num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if focal:  # the focal-loss prior, as Deformable DETR
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, images: Tensor, pad_mask: Tensor) -> dict:
        feature = self.backbone(images)[FEATURE_LEVELS.index(self.feature_level)]
        mask = F.interpolate(pad_mask[None].float(), size=feature.shape[-2:])[0].bool()
        pos = self.position(mask).to(feature.dtype)
        hs = self.transformer(self.input_proj(feature), mask, self.query_embed.weight, pos)
        logits = self.class_embed(hs)  # [L, B, Q, K(+1)]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        h = (~pad_mask[:, :, 0]).sum(1)
        w = (~pad_mask[:, 0, :]).sum(1)
        out = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "image_sizes": torch.stack([h, w], dim=1),
        }
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": a, "pred_boxes": b}
                for a, b in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out

    @torch.no_grad()
    def detect(self, outputs: dict) -> list[dict[str, Tensor]]:
        """Per image, up to ``MAX_DETECTIONS`` queries by score: ``boxes`` (xyxy pixels of the
        unpadded input image), ``scores``, ``labels`` (``0..K-1``). No NMS (set prediction)."""
        logits = outputs["pred_logits"].float()
        prob = logits.sigmoid() if self.focal else logits.softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)  # [B, Q]
        h, w = outputs["image_sizes"].unbind(1)
        scale = torch.stack([w, h, w, h], dim=1)[:, None, :].to(logits.dtype)
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"].float()) * scale
        results = []
        for b in range(logits.shape[0]):
            keep = scores[b].argsort(descending=True)[:MAX_DETECTIONS]
            results.append(
                {"boxes": boxes[b, keep], "scores": scores[b, keep], "labels": labels[b, keep]}
            )
        return results
