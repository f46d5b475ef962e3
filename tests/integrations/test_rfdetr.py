"""uotmatch's matchers inside RF-DETR's criterion (the real ``rfdetr`` core package, offline,
RF-DETR Nano from its config with random weights). RF-DETR's training extra (Lightning) is not
installed in CI: the criterion and a plain training loop are tested."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("rfdetr")

from rfdetr.config import RFDETRNanoConfig, TrainConfig  # noqa: E402
from rfdetr.models.lwdetr import (  # noqa: E402
    build_criterion_from_config,
    build_model_from_config,
)

from uotmatch.detection import HungarianMatcher, UOTMatcher  # noqa: E402
from uotmatch.integrations.rfdetr import (  # noqa: E402
    RFDETRMatcher,
    matcher_from_criterion,
    use_matcher,
)

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("rfdetr")
    model_config = RFDETRNanoConfig(pretrain_weights=None, num_classes=NUM_CLASSES, resolution=128)
    train_config = TrainConfig(dataset_dir=str(out), output_dir=str(out))
    torch.manual_seed(0)
    model = build_model_from_config(model_config, train_config)
    return model, lambda: build_criterion_from_config(model_config, train_config)[0]


def _batch(seed=0, sizes=(2, 1, 4)):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(sizes), 3, 128, 128, generator=g)
    targets = []
    for n in sizes:
        centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        labels = torch.randint(NUM_CLASSES, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centres, wh], -1)})
    return images, targets


def test_hungarian_with_the_criterion_costs_is_the_stock_loss(built):
    """RF-DETR's loss, term by term, with our Hungarian on its costs: the 13 query groups of
    each layer (final, auxiliary, encoder) matched in one batched solve."""
    model, make_criterion = built
    images, targets = _batch()
    outputs = model.train()(images)
    stock = make_criterion()(outputs, targets)
    criterion = use_matcher(make_criterion(), "hungarian")
    assert isinstance(criterion.matcher, RFDETRMatcher)
    ours = criterion(outputs, targets)
    layers = 2 + len(outputs["aux_outputs"])  # final + auxiliary + encoder
    assert criterion.matcher.calls == layers and set(ours) == set(stock)
    for key, value in stock.items():
        assert ours[key].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), key


def test_every_group_pairs_every_target(built):
    model, make_criterion = built
    images, targets = _batch(1)
    criterion = use_matcher(make_criterion(), "uot", eps=0.05)
    outputs = model.train()(images)
    pairs = criterion.matcher(outputs, targets, group_detr=13)
    q = outputs["pred_logits"].shape[1] // 13
    for (pred, gt), t in zip(pairs, targets, strict=True):
        n = len(t["labels"])
        assert len(pred) == 13 * n and len(set(pred.tolist())) == 13 * n  # one-to-one
        for k in range(13):  # each group: every target once, among its own queries
            inside = (pred >= k * q) & (pred < (k + 1) * q)
            assert sorted(gt[inside].tolist()) == list(range(n))


@pytest.mark.slow
def test_a_few_training_steps_with_the_uot_matcher(built):
    model, make_criterion = built
    criterion = use_matcher(make_criterion(), UOTMatcher(focal=True, cost_class=2.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    head = model.bbox_embed.layers[-1].weight
    before = head.detach().clone()
    for seed in range(3):
        images, targets = _batch(seed)
        losses = criterion(model.train()(images), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        assert torch.isfinite(loss) and losses["loss_bbox"].item() > 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert criterion.matcher.calls == 3 * (2 + len(model.train()(images)["aux_outputs"]))
    assert criterion.matcher.unconverged == 0
    assert not torch.equal(before, head.detach())  # the box head learnt


def test_matcher_from_criterion_reads_the_costs(built):
    _, make_criterion = built
    criterion = make_criterion()
    m = matcher_from_criterion(criterion, "hungarian")
    assert isinstance(m, HungarianMatcher) and m.focal and m.focal_eps == 0.0
    assert m.cost_class == criterion.matcher.cost_class
    assert m.cost_giou == criterion.matcher.cost_giou
    use_matcher(criterion, "uot")
    use_matcher(criterion, "hungarian")  # again: the stock costs are still read
    assert (
        criterion.matcher.stock is not None and criterion.matcher.matcher.cost_bbox == m.cost_bbox
    )


def test_bad_arguments(built):
    _, make_criterion = built
    with pytest.raises(ValueError, match="target must be an rfdetr SetCriterion"):
        use_matcher(torch.nn.Linear(2, 2), "uot")
    with pytest.raises(ValueError, match="options .* are for a matcher given by name"):
        use_matcher(make_criterion(), UOTMatcher(), eps=0.1)
    criterion = use_matcher(make_criterion(), "uot")
    with pytest.raises(ValueError, match="mask and keypoint costs"):
        criterion.matcher(
            {
                "pred_logits": torch.zeros(1, 13, 5),
                "pred_boxes": torch.rand(1, 13, 4),
                "pred_masks": torch.zeros(1, 13, 4, 4),
            },
            [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}],
            group_detr=13,
        )
    with pytest.raises(ValueError, match="group_detr must divide the number of queries"):
        criterion.matcher(
            {"pred_logits": torch.zeros(1, 12, 5), "pred_boxes": torch.rand(1, 12, 4)},
            [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}],
            group_detr=13,
        )
