"""DETR: model shapes and padding, the criterion on a hand-built case, plan-weighted = hard loss
at the Hungarian limit, smoke runs of both matchers and weightings, resume, bad input."""

import json
import math

import pytest
import torch

from detectors.common.backbone import ResNet
from detectors.common.checkpoint import load_checkpoint
from detectors.common.data import collate
from detectors.common.trainer import datasets
from detectors.detr import evaluate as detr_evaluate
from detectors.detr import train as detr_train
from detectors.detr.criterion import SetCriterion, detr_targets
from detectors.detr.model import DETR, PositionEmbeddingSine
from detectors.fcos import train as fcos_train
from tests.detectors.helpers import TINY_RUN, linux_only, torchrun
from uotmatch.detection import (
    HungarianMatcher,
    SetTargets,
    UOTMatcher,
    aligned_giou,
    box_cxcywh_to_xyxy,
)

SMALL = [*TINY_RUN, "--hidden-dim", "32", "--nheads", "4", "--enc-layers", "1"]
SMALL += ["--dec-layers", "2", "--dim-feedforward", "64", "--num-queries", "32"]
WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _model(num_classes=3, **kw):
    torch.manual_seed(0)
    args = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64)
    return DETR(num_classes, ResNet(18, freeze_at=0), **{"num_queries": 7, **args, **kw})


def test_outputs_and_padding():
    model = _model().eval().requires_grad_(False)
    images = torch.randn(2, 3, 64, 96)
    pad = torch.zeros(2, 64, 96, dtype=torch.bool)
    pad[1, :, 64:] = True  # the second image is 64 x 64, padded on the right
    out = model(images, pad)
    assert out["pred_logits"].shape == (2, 7, 4) and out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_boxes"].shape == (2, 7, 4)
    assert out["image_sizes"].tolist() == [[64, 96], [64, 64]]
    assert 0 < float(out["pred_boxes"].min()) and float(out["pred_boxes"].max()) < 1
    dets = model.detect(out)
    # boxes in pixels of each unpadded image: cxcywh * (w, h, w, h)
    b = out["pred_boxes"][1, 0]
    expected = torch.stack([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])
    idx = (dets[1]["scores"] == out["pred_logits"][1, 0].softmax(-1)[:-1].max()).nonzero()[0, 0]
    torch.testing.assert_close(dets[1]["boxes"][idx], expected * 64)
    # positions count only the unpadded pixels: a padded map's valid part is the unpadded map's
    position = PositionEmbeddingSine(16)
    alone = position(torch.zeros(1, 4, 4, dtype=torch.bool))
    padded_mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    padded_mask[..., 4:] = True
    torch.testing.assert_close(position(padded_mask)[..., :4], alone)


def _hand_case():
    # one class (K = 1), two queries, one target; query 0 overlaps the target, query 1 is far.
    outputs = {
        "pred_logits": torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    return outputs, targets


def test_criterion_hand_built_case():
    outputs, targets = _hand_case()
    criterion = SetCriterion(1, HungarianMatcher(), WEIGHTS, eos_coef=0.1)
    losses = criterion(outputs, targets)
    # query 0 -> class 0 (weight 1), query 1 -> no-object (weight 0.1): weighted mean of CEs
    ce = (math.log(1 + math.exp(-2)) + 0.1 * math.log(1 + math.exp(-1))) / 1.1
    # boxes: L1 |0.4 - 0.2| = 0.2; xyxy (.4,.3,.6,.7) vs (.4,.4,.6,.6): IoU .04/.08, hull = union
    assert float(losses["loss_ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(losses["loss_bbox"]) == pytest.approx(0.2, rel=1e-6)
    assert float(losses["loss_giou"]) == pytest.approx(0.5, rel=1e-6)
    assert float(losses["cardinality_error"]) == 0.0 and float(losses["class_error"]) == 0.0
    assert float(losses["loss"]) == pytest.approx(ce + 5 * 0.2 + 2 * 0.5, rel=1e-6)


def _random_batch(seed, B=3, Q=9, K=4, focal=False):
    g = torch.Generator().manual_seed(seed)
    out = {
        "pred_logits": torch.randn(B, Q, K if focal else K + 1, generator=g),
        "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25,
    }
    out["aux_outputs"] = [
        {"pred_logits": torch.randn_like(out["pred_logits"]), "pred_boxes": out["pred_boxes"] * 0.9}
    ]
    sizes = [3, 0, 5]
    targets = [
        {
            "labels": torch.randint(0, K, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3,
        }
        for n in sizes
    ]
    return out, targets


def _detr_losses(outputs, targets, pairs, num_classes, focal, eos_coef=0.1):
    """DETR's (and Deformable DETR's) hard losses on matched pairs, written as their code:
    cross-entropy with the no-object class weighted eos_coef (or sigmoid focal over one-hot
    targets, summed, / num_boxes), L1 and 1 - GIoU over the matched pairs, / num_boxes."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    B, Q = logits.shape[:2]
    num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
    b = torch.cat([torch.full_like(i, k) for k, (i, _) in enumerate(pairs)])
    q = torch.cat([i for i, _ in pairs])
    labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, pairs, strict=True)])
    tboxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, pairs, strict=True)])
    classes = torch.full((B, Q), num_classes, dtype=torch.long)
    classes[b, q] = labels
    if focal:
        onehot = torch.nn.functional.one_hot(classes, num_classes + 1)[..., :-1].float()
        p = logits.sigmoid()
        ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        p_t = p * onehot + (1 - p) * (1 - onehot)
        alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
        loss_ce = (alpha_t * (1 - p_t) ** 2 * ce).sum() / num_boxes
    else:
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        loss_ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), classes, weight)
    src = boxes[b, q]
    giou = aligned_giou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tboxes))
    return {
        "loss_ce": loss_ce,
        "loss_bbox": (src - tboxes).abs().sum() / num_boxes,
        "loss_giou": (1 - giou).sum() / num_boxes,
    }


@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_weighted_loss_on_a_0_1_plan_is_detrs_hard_loss(seed, focal):
    """The criterion has one implementation of each loss, weighted by a plan. On a matching's
    0/1 plan (Hungarian's, hard or plan weighting; UOT's at eps = 0) it is DETR's loss."""
    outputs, targets = _random_batch(seed, focal=focal)
    pairs = HungarianMatcher(focal=focal)(outputs, targets)
    reference = _detr_losses(outputs, targets, pairs, 4, focal)
    aux = {"pred_logits": outputs["aux_outputs"][0]["pred_logits"]}
    aux["pred_boxes"] = outputs["aux_outputs"][0]["pred_boxes"]
    aux_pairs = HungarianMatcher(focal=focal)(aux, targets)
    reference_aux = _detr_losses(aux, targets, aux_pairs, 4, focal)
    uot = UOTMatcher(eps=0.0, background_cost=0.0, focal=focal)
    for matcher, weighting in [
        (HungarianMatcher(focal=focal), "hard"),
        (HungarianMatcher(focal=focal), "plan"),
        (uot, "plan"),
        (uot, "hard"),
    ]:
        criterion = SetCriterion(4, matcher, WEIGHTS, loss_weighting=weighting, focal=focal)
        losses = criterion(outputs, targets)
        for key, v in reference.items():
            torch.testing.assert_close(losses[key], v, msg=key)
            torch.testing.assert_close(losses[key + "_0"], reference_aux[key], msg=key)


def test_soft_plan_weights_every_pair():
    outputs, targets = _hand_case()
    uot = UOTMatcher(eps=2.0, background_cost=0.0)
    criterion = SetCriterion(1, uot, WEIGHTS, loss_weighting="plan")
    plan = uot.solve(outputs, targets).plan[0]  # [2, 2]: target, background
    assert 0.01 < float(plan[1, 0]) < float(plan[0, 0])  # soft: the far query shares a little
    l1 = torch.tensor([0.2, 0.3 + 0.3 + 0.1 + 0.1])  # |d cx| + |d cy| + |d w| + |d h|
    losses = criterion(outputs, targets)
    torch.testing.assert_close(losses["loss_bbox"], (plan[:, 0].float() * l1).sum())


def test_targets_are_padded_once_from_the_batch():
    batch = {
        "gt_boxes": torch.tensor([[[0.0, 0.0, 32.0, 16.0], [0, 0, 1, 1]]]),
        "gt_labels": torch.tensor([[3, 0]]),
        "gt_mask": torch.tensor([[True, False]]),
        "image_sizes": torch.tensor([[32, 64]]),  # h, w
    }
    t = detr_targets(batch)
    assert isinstance(t, SetTargets) and t.labels.tolist() == [[3, 0]]
    assert t.gt_mask.tolist() == [[True, False]]
    torch.testing.assert_close(t.boxes[0, 0], torch.tensor([0.25, 0.25, 0.5, 0.5]))
    # the same targets as DETR's list of dicts give the same losses
    outputs, targets = _hand_case()
    padded = SetTargets.from_list(targets)
    criterion = SetCriterion(1, HungarianMatcher(), WEIGHTS)
    a, b = criterion(outputs, targets), criterion(outputs, padded)
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize(
    "extra",
    [
        ["--matcher", "hungarian"],
        ["--matcher", "hungarian", "--loss-weighting", "plan"],
        ["--matcher", "uot", "--eps", "0.05", "--tau1", "100", "--tau2", "1"],
        ["--preset", "uot-paper"],
        ["--matcher", "uot", "--focal"],
    ],
    ids=["hungarian", "hungarian-plan", "uot-unbalanced-hard", "uot-paper", "uot-focal"],
)
def test_smoke_runs(data, tmp_path, extra):
    out = tmp_path / "run"
    metrics = detr_train.main(
        ["--data", str(data), "--out", str(out), "--epochs", "1", *SMALL, *extra]
    )
    assert set(metrics) >= {"AP", "AP50", "AR100"}
    state = load_checkpoint(out / "last.pth")
    eps = state["config"]["eps"]  # a matcher option: stored only when given
    assert state["epoch"] == 1 and (eps is None or math.isfinite(eps))
    again = detr_evaluate.main(["--checkpoint", str(out / "last.pth"), "--data", str(data)])
    assert again == pytest.approx(metrics)


def test_unconverged_matchings_are_counted_and_the_budget_is_a_flag(data, tmp_path):
    """--max-iter and --tol reach the UOT matcher; metrics.jsonl counts the matchings (images x
    decoder layers) that missed tol in the epoch; Hungarian takes neither flag."""
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--epochs", "1", "--eval-every", "0"]
    with pytest.warns(RuntimeWarning, match="max_iter = 1 is small"):
        detr_train.main([*argv, *SMALL, "--matcher", "uot", "--eps", "0.01", "--max-iter", "1"])
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["unconverged"] > 0 and line["unconverged"] == int(line["unconverged"])
    assert load_checkpoint(out / "last.pth")["config"]["max_iter"] == 1
    with pytest.raises(ValueError, match="--tol does not apply to --matcher hungarian"):
        detr_train.DETRConfig(data=str(data), matcher="hungarian", tol=1e-3)


@pytest.mark.parametrize("extra", [{}, {"tau1": 1.0, "tau2": 1.0}], ids=["default", "unbalanced"])
def test_uot_hard_loss_trains_the_boxes_from_the_first_step(data, extra):
    """``--matcher uot`` with the default hard loss at random initialisation (near-identical
    queries): every target gets a query, so the box losses are positive and reach the box head
    (the raw argmax decoding paired none: loss_bbox 0.0)."""
    cfg = detr_train.DETRConfig(data=str(data), matcher="uot", short=64, max_size=64, **extra)
    train_set, _ = datasets(cfg)
    batch = collate([train_set[i] for i in range(4)])
    model = _model(num_classes=20, num_queries=32)
    criterion = detr_train.build_criterion(cfg, 20)
    targets = detr_targets(batch)
    outputs = model(batch["images"], batch["pad_mask"])
    pairs = criterion.matcher(outputs, targets)
    for (_, gt), real in zip(pairs, targets.gt_mask, strict=True):
        assert sorted(gt.tolist()) == torch.nonzero(real).flatten().tolist()  # each, once
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"] > 0 and losses["loss_giou"] > 0
    losses["loss"].backward()
    head = model.bbox_embed.layers[-1].weight.grad
    assert head is not None and head.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["", "uot-paper"])
def test_loss_decreases_on_one_batch(data, preset):
    """Both matchings learn: 40 AdamW steps on one batch of 4 images cut the loss by a fifth
    (to about 0.64 of its start on Color Boxes)."""
    torch.manual_seed(0)  # the same batch (augmentation) whatever ran before
    cfg = detr_train.DETRConfig(data=str(data), preset=preset, short=64, max_size=64)
    train_set, _ = datasets(cfg)
    batch = collate([train_set[i] for i in range(4)])
    model = _model(num_classes=20, num_queries=32)
    criterion = detr_train.build_criterion(cfg, 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets = detr_targets(batch)
    history = []
    for _ in range(40):
        losses = criterion(model(batch["images"], batch["pad_mask"]), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(float(losses["loss"].detach()))
    assert history[-1] < 0.8 * history[0], history


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_weights(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["--data", str(data), "--eval-every", "0", "--preset", "uot-paper", "--lr-drop", "1"]
    common += SMALL
    detr_train.main([*common, "--out", str(full), "--epochs", "2"])
    detr_train.main([*common, "--out", str(cut), "--epochs", "1"])  # as if killed after epoch 1
    detr_train.main([*common, "--out", str(cut), "--epochs", "2", "--resume"])
    a, b = load_checkpoint(full / "last.pth")["model"], load_checkpoint(cut / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_preset_sets_the_paper_setting():
    cfg = detr_train.DETRConfig(data="x", preset="uot-paper", num_queries=100)
    assert cfg.matcher == "uot" and cfg.normalize_cost and cfg.loss_weighting == "plan"
    assert cfg.eps == pytest.approx(0.12 / (math.log(200) + 1))
    assert (cfg.set_cost_class, cfg.set_cost_bbox, cfg.set_cost_giou) == (2.0, 5.0, 2.0)


def test_bad_input(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        detr_train.main(["--data", str(data), "--preset", "uot-paper", "--matcher", "hungarian"])
    err = capsys.readouterr().err
    assert "--preset uot-paper sets --matcher to 'uot': drop --matcher 'hungarian'" in err
    with pytest.raises(SystemExit):
        detr_train.main(["--data", str(data), "--preset", "uot-paper", "--eps", "0.05"])
    assert "--preset uot-paper derives --eps: drop --eps 0.05" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--preset uot-paper sets --matcher"):
        detr_train.DETRConfig(data="x", preset="uot-paper", matcher="other")
    with pytest.raises(SystemExit):
        detr_train.main(["--data", str(data), "--matcher", "sinkhorn"])
    with pytest.raises(SystemExit):
        detr_train.main(["--out", str(tmp_path)])
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        detr_train.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), *SMALL])
    assert "instances_train.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="feature_level must be one of"):
        _model(feature_level=2)
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        SetCriterion(1, HungarianMatcher(), WEIGHTS, loss_weighting="soft")
    with pytest.raises(ValueError, match="weight_dict keys"):
        SetCriterion(1, HungarianMatcher(), {"loss_l2": 1.0})
    with pytest.raises(ValueError, match="the matcher's focal .* must agree"):
        SetCriterion(1, HungarianMatcher(focal=True), WEIGHTS)
    # a matcher option given to a matcher that does not take it is an error, not ignored
    for flag in (["--eps", "0.1"], ["--background-cost", "1"], ["--normalize-cost"]):
        with pytest.raises(SystemExit):
            detr_train.main(["--data", str(data), "--matcher", "hungarian", *flag])
        assert f"{flag[0]} does not apply to --matcher hungarian" in capsys.readouterr().err
    # an FCOS checkpoint is not a DETR checkpoint
    fcos_out = tmp_path / "fcos"
    fcos_train.main(
        ["--data", str(data), "--out", str(fcos_out), "--epochs", "1", "--eval-every", "0"]
        + [*TINY_RUN, "--channels", "32", "--head-depth", "1"]
    )
    with pytest.raises(SystemExit):
        detr_evaluate.main(["--checkpoint", str(fcos_out / "last.pth"), "--data", str(data)])
    assert "is not a detectors.detr.train training checkpoint" in capsys.readouterr().err


@pytest.mark.slow
@linux_only
def test_two_process_gloo_run(data, tmp_path):
    out = tmp_path / "ddp"
    argv = ["--data", str(data), "--out", str(out), "--epochs", "1", "--preset", "uot-paper"]
    run = torchrun("detectors.detr.train", argv + SMALL, port=29518)
    assert load_checkpoint(out / "last.pth")["epoch"] == 1
    assert run.stdout.count("| DETR-uot, plan loss | AP |") == 1  # rank 0 alone prints
