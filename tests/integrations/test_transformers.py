"""uotmatch's matchers inside Hugging Face transformers' DETR-family losses (the real library,
offline, tiny models from configs with random weights)."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers.loss import loss_for_object_detection  # noqa: E402
from transformers.loss.loss_utils import LOSS_MAPPING  # noqa: E402

from uotmatch.detection import HungarianMatcher, UOTMatcher  # noqa: E402
from uotmatch.integrations.transformers import matcher_from_config, use_matcher  # noqa: E402

TINY = dict(decoder_layers=2, num_queries=12, num_labels=4)
HEADS = dict(encoder_attention_heads=2, decoder_attention_heads=2)
FFN = dict(encoder_ffn_dim=32, decoder_ffn_dim=32)


def _resnet(cls=None, levels=("stage2", "stage3", "stage4")):
    cls = cls or transformers.ResNetConfig
    return cls(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=list(levels),
    )


def _rt_detr_like(config_cls, backbone, **kw):
    return config_cls(
        backbone_config=backbone,
        encoder_hidden_dim=16,
        encoder_in_channels=[16, 16, 16],
        decoder_in_channels=[16, 16, 16],
        d_model=32,
        num_denoising=5,
        **HEADS,
        **FFN,
        **TINY,
        **kw,
    )


def build(family: str):
    """A tiny model of ``family`` with random weights (seeded)."""
    torch.manual_seed(0)
    T = transformers
    small = dict(d_model=32, encoder_layers=1, auxiliary_loss=True, **HEADS, **FFN, **TINY)
    if family == "detr":
        return T.DetrForObjectDetection(
            T.DetrConfig(backbone_config=_resnet(levels=["stage4"]), **small)
        )
    if family == "conditional":
        config = T.ConditionalDetrConfig(backbone_config=_resnet(levels=["stage4"]), **small)
        return T.ConditionalDetrForObjectDetection(config)
    if family == "deformable":
        config = T.DeformableDetrConfig(
            backbone_config=_resnet(), encoder_n_points=2, decoder_n_points=2, **small
        )
        return T.DeformableDetrForObjectDetection(config)
    if family == "rt-detr":
        config = _rt_detr_like(T.RTDetrConfig, _resnet(T.RTDetrResNetConfig))
        return T.RTDetrForObjectDetection(config)
    if family == "rt-detr-v2":
        config = _rt_detr_like(T.RTDetrV2Config, _resnet(T.RTDetrResNetConfig))
        return T.RTDetrV2ForObjectDetection(config)
    if family == "d-fine":
        backbone = T.HGNetV2Config(
            stem_channels=[3, 8, 8],
            stage_in_channels=[8, 16, 16, 16],
            stage_mid_channels=[8, 8, 8, 8],
            stage_out_channels=[16, 16, 16, 16],
            stage_num_blocks=[1, 1, 1, 1],
            stage_downsample=[False, True, True, True],
            stage_light_block=[False, False, True, True],
            stage_kernel_size=[3, 3, 5, 5],
            stage_numb_of_layers=[1, 1, 1, 1],
            hidden_sizes=[16, 16, 16, 16],
            out_features=["stage2", "stage3", "stage4"],
        )
        config = _rt_detr_like(T.DFineConfig, backbone, hidden_expansion=0.5, lqe_hidden_dim=8)
        return T.DFineForObjectDetection(config)
    if family == "lw-detr":
        backbone = T.LwDetrViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            pretrain_image_size=64,
            num_windows=1,
            out_indices=[1],
        )
        config = T.LwDetrConfig(
            backbone_config=backbone,
            group_detr=3,
            d_model=32,
            decoder_ffn_dim=32,
            decoder_self_attention_heads=2,
            decoder_cross_attention_heads=2,
            projector_scale_factors=[1.0],
            c2f_num_blocks=1,
            **TINY,
        )
        return T.LwDetrForObjectDetection(config)
    raise AssertionError(family)


FAMILIES = ["detr", "deformable", "conditional", "rt-detr", "rt-detr-v2", "d-fine", "lw-detr"]
PLAN_FAMILIES = ["detr", "deformable", "conditional"]


def _batch(seed=1, n=(3, 1, 5)):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(n), 3, 64, 64, generator=g)
    labels = []
    for k in n:
        centres = torch.rand(k, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(k, 2, generator=g) * 0.3 + 0.1
        labels.append(
            {
                "class_labels": torch.randint(4, (k,), generator=g),
                "boxes": torch.cat([centres, sizes], -1),
            }
        )
    return images, labels


def _loss(model, images, labels):
    torch.manual_seed(5)  # the denoising queries of RT-DETR and D-FINE are random
    return model(pixel_values=images, labels=labels)


@pytest.mark.parametrize("family", FAMILIES)
def test_hungarian_with_the_config_costs_is_the_stock_loss(family):
    """Every loss term equal to HF's own, and our matcher made every matching (its calls
    counted: one per decoder layer, plus the encoder's proposals where the family has them)."""
    model = build(family).train()
    images, labels = _batch()
    stock = _loss(model, images, labels)
    use_matcher(model, "hungarian")
    ours = _loss(model, images, labels)
    assert model.loss_function.matcher.calls >= model.config.decoder_layers
    assert set(ours.loss_dict) == set(stock.loss_dict)
    for key, value in stock.loss_dict.items():
        assert ours.loss_dict[key].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), key
    assert ours.loss.item() == pytest.approx(stock.loss.item(), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_uot_matcher_trains_every_family(family):
    """A UOT matching (the default decoding pairs every target), gradients to the box head."""
    model = build(family).train()
    images, labels = _batch()
    use_matcher(model, "uot", eps=0.05)
    out = _loss(model, images, labels)
    adapter = model.loss_function.matcher
    assert isinstance(adapter.inner, UOTMatcher) and adapter.calls > 0 and adapter.unconverged == 0
    assert torch.isfinite(out.loss) and out.loss_dict["loss_bbox"].item() > 0
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "bbox" in n and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("family", PLAN_FAMILIES)
def test_plan_weighted_loss(family):
    """At Hungarian's 0/1 plan the plan-weighted loss is HF's; the UOT plan spreads every
    target's weight over the queries: a different, finite loss."""
    model = build(family).train()
    images, labels = _batch()
    stock = _loss(model, images, labels)
    use_matcher(model, "hungarian", loss="plan")
    hard = _loss(model, images, labels)
    for key, value in stock.loss_dict.items():
        assert hard.loss_dict[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    use_matcher(model, "uot", loss="plan", eps=0.1)
    soft = _loss(model, images, labels)
    assert torch.isfinite(soft.loss) and abs(soft.loss.item() - stock.loss.item()) > 1e-4


@pytest.mark.parametrize("family", ["rt-detr", "d-fine", "lw-detr"])
def test_plan_loss_is_refused_where_the_losses_need_pairs(family):
    with pytest.raises(ValueError, match="loss='plan' is not supported"):
        use_matcher(build(family), "uot", loss="plan")


def test_no_global_state_changes():
    """The hook is per model: another model of the class keeps the stock loss, and HF's module
    still builds its own matcher."""
    a, b = build("detr"), build("detr")
    use_matcher(a, HungarianMatcher(cost_class=1, cost_bbox=5, cost_giou=2))
    assert b.loss_function is LOSS_MAPPING["ForObjectDetection"]
    assert (
        loss_for_object_detection.HungarianMatcher.__module__ == loss_for_object_detection.__name__
    )
    use_matcher(a, "uot")  # again: replaces, does not wrap ours
    assert a.loss_function.uotmatch_stock is LOSS_MAPPING["ForObjectDetection"]


def test_matcher_from_config_reads_the_family_costs():
    rt = matcher_from_config(build("rt-detr"), "hungarian")
    config = build("rt-detr").config
    assert rt.focal and rt.cost_class == config.matcher_class_cost
    assert rt.focal_alpha == config.matcher_alpha and rt.cost_bbox == config.matcher_bbox_cost
    detr = matcher_from_config(build("detr"), "uot", eps=0.2)
    assert not detr.focal and detr.eps == 0.2 and detr.cost_giou == build("detr").config.giou_cost


def test_bad_arguments():
    model = build("detr")
    with pytest.raises(ValueError, match="loss must be one of"):
        use_matcher(model, "uot", loss="soft")
    with pytest.raises(ValueError, match="matcher 'sinkhorn'|matcher must be one of"):
        use_matcher(model, "sinkhorn")
    with pytest.raises(ValueError, match="options .* are for a matcher given by name"):
        use_matcher(model, UOTMatcher(), eps=0.1)
    with pytest.raises(ValueError, match="must be a transformers PreTrainedModel"):
        use_matcher(torch.nn.Linear(2, 2), "uot")
    with pytest.raises(ValueError, match="is not a supported DETR-family detector"):
        use_matcher(transformers.ResNetForImageClassification(transformers.ResNetConfig()), "uot")


def test_trainer_trains_a_few_steps():
    """HF's Trainer, unchanged, trains a Deformable DETR with the UOT plan-weighted loss."""
    pytest.importorskip("accelerate")
    model = build("deformable")
    use_matcher(model, "uot", loss="plan")
    images, labels = _batch(n=(1, 2, 3, 1))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {"pixel_values": images[i], "labels": labels[i]}

    def collate(items):
        return {
            "pixel_values": torch.stack([x["pixel_values"] for x in items]),
            "labels": [x["labels"] for x in items],
        }

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            max_steps=3,
            per_device_train_batch_size=2,
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=Data(), data_collator=collate
        )
        result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert any("bbox_embed" in n for n in moved) and model.loss_function.matcher.calls >= 3
