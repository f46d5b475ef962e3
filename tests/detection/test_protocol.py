"""One contract for every assigner and matcher: the same call, options by name and checked,
bad inputs refused with a ValueError naming them."""

import math

import numpy as np
import pytest
import torch

from tests.detection.scenes import as_inputs, scene
from uotmatch.detection import (
    ASSIGNERS,
    MATCHERS,
    AssignResult,
    DenseAssigner,
    HungarianMatcher,
    SetMatcher,
    SetTargets,
    UOTAssigner,
    UOTMatcher,
    build_assigner,
    build_matcher,
    options_of,
)

INF = math.inf


@pytest.mark.parametrize("name", list(ASSIGNERS))
def test_every_assigner_takes_the_same_call(name, device):
    inputs = {k: v.to(device) for k, v in as_inputs(*scene(0, B=3, G=4)).items()}
    assigner = build_assigner(name)
    assert isinstance(assigner, DenseAssigner)
    result = assigner(**inputs)
    B, A = inputs["cls_logits"].shape[:2]
    assert isinstance(result, AssignResult)
    assert result.gt_index.shape == (B, A) and result.gt_index.dtype == torch.int64
    assert result.gt_index.device.type == device.type
    assert result.boxes.shape == (B, A, 4) and result.ious.shape == (B, A)
    assert result.num_fg.tolist() == result.fg_mask.sum(1).tolist()
    assert bool((result.num_fg > 0).all())  # every image has ground truths: some foreground
    # padding is never assigned, and labels follow the assigned ground truth
    fg = result.fg_mask
    assert bool(inputs["gt_mask"].gather(1, result.gt_index.clamp_min(0))[fg].all())
    labels = inputs["gt_labels"].gather(1, result.gt_index.clamp_min(0))
    assert torch.equal(result.labels[fg], labels[fg])
    with pytest.raises(TypeError):  # positional calls are not the contract
        assigner(*inputs.values())


@pytest.mark.parametrize("name", list(MATCHERS))
def test_every_matcher_takes_detrs_call_and_solves(name):
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 6, 4, generator=g), "pred_boxes": torch.rand(2, 6, 4)}
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4, generator=g) * 0.5 + 0.2},
        {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=g) * 0.5 + 0.2},
    ]
    matcher = build_matcher(name)
    assert isinstance(matcher, SetMatcher)
    pairs = matcher(outputs, targets)
    m = matcher.solve(outputs, targets)
    assert m.plan.shape == (2, 6, 3) and m.has_background  # [B, Q, G + 1]
    assert [len(p) for p, _ in pairs] == [2, 1]
    for (p, t), (mp, mt) in zip(pairs, m.pairs(matcher.decode), strict=True):
        assert torch.equal(p, mp) and torch.equal(t, mt)
    padded = SetTargets.from_list(targets)
    assert [(p.tolist(), t.tolist()) for p, t in matcher(outputs, padded)] == [
        (p.tolist(), t.tolist()) for p, t in pairs
    ]


@pytest.mark.parametrize(
    "name, option",
    [  # each was silently dropped before
        ("fcos", {"eps": 0.1}),
        ("atss", {"tau1": 1.0}),
        ("simota", {"eps": 0.1}),
        ("ota", {"tau1": 1.0}),
        ("ota", {"tau2": 1.0}),
        ("atss", {"radius": 2.0}),
        ("atss", {"k": 3.0}),
        ("fcos", {"candidate_topk": 5}),
        ("hungarian", {"eps": 0.1}),
        ("hungarian", {"tau1": 1.0}),
        ("hungarian", {"background_cost": 1.0}),
        ("hungarian", {"normalize_cost": True}),
    ],
)
def test_an_option_the_named_one_does_not_take_is_an_error(name, option):
    build = build_matcher if name in MATCHERS and name not in ASSIGNERS else build_assigner
    (key,) = option
    with pytest.raises(ValueError, match=f"{name!r} takes no option {key!r}; its options are: "):
        build(name, **option)


def test_options_are_keyword_only_and_listed():
    assert options_of(ASSIGNERS["ota"])[:3] == ("eps", "radius", "candidate_topk")
    assert "tau1" not in options_of(ASSIGNERS["ota"]) and "tau1" in options_of(ASSIGNERS["uot"])
    with pytest.raises(TypeError):
        UOTAssigner(0.1, 1.0, 1.0)  # keyword-only
    with pytest.raises(TypeError):
        HungarianMatcher(1.0, 5.0, 2.0)
    with pytest.raises(ValueError, match="assigner must be one of"):
        build_assigner("nearest")


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        ("uot", dict(eps=-1.0), "eps must be > 0"),
        ("uot", dict(eps=0.0), "eps must be > 0"),
        ("uot", dict(max_iter=0), "max_iter must be an integer >= 1"),
        ("uot", dict(radius=math.nan), "radius must not be NaN"),
        ("uot", dict(tol=0.0), "tol must be > 0"),
        ("uot", dict(k=0.0), "k must be > 0"),
        ("uot", dict(candidate_topk=0), "candidate_topk must be an integer >= 1"),
        ("uot", dict(decode="best"), r"decode must be one of \['official', 'argmax'\]"),
        ("uot", dict(tau1=1.0, candidates_only=True), "candidates_only=True is exact only"),
        ("uot", dict(focal_alpha=2.0), "focal_alpha must be <= 1"),
        ("simota", dict(geometry="yolox-2021"), "geometry must be one of"),
        ("simota", dict(radius=-1.0), "radius must be > 0"),
        ("fcos", dict(radius=0.0), "radius must be > 0"),
        ("fcos", dict(size_ranges=((64, 0),)), "size_ranges must be"),
        ("atss", dict(topk=0), "topk must be an integer >= 1"),
        ("atss", dict(anchor_scale=math.inf), "anchor_scale must be finite"),
        ("uot-matcher", dict(eps=-0.1), "eps must be >= 0"),
        ("uot-matcher", dict(eps=0.0, tau1=1.0), "eps = 0 is defined only"),
        ("uot-matcher", dict(max_iter=1.5), "max_iter must be an integer"),
        ("uot-matcher", dict(background_cost=math.nan), "background_cost must not be NaN"),
        ("uot-matcher", dict(normalize_cost="yes"), "normalize_cost must be True or False"),
        ("hungarian", dict(cost_class=-1.0), "cost_class must be >= 0"),
        ("hungarian", dict(focal=1), "focal must be True or False"),
    ],
)
def test_constructors_validate_every_option(cls, kwargs, message):
    build = {
        "uot-matcher": lambda **kw: build_matcher("uot", **kw),
        "hungarian": lambda **kw: build_matcher("hungarian", **kw),
    }.get(cls, lambda **kw: build_assigner(cls, **kw))
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def _bad(inputs, **changes):
    return {**inputs, **changes}


@pytest.mark.parametrize("name", list(ASSIGNERS))
def test_bad_detection_inputs_name_what_is_wrong(name):
    inputs = as_inputs(*scene(0, B=2, G=3))
    assigner = build_assigner(name)
    logits, boxes, labels = inputs["cls_logits"], inputs["gt_boxes"], inputs["gt_labels"]
    nan_logits = logits.clone()
    nan_logits[1, 5, 2] = math.nan
    nan_box = boxes.clone()
    nan_box[1, 1, 2] = math.nan
    inverted = boxes.clone()
    inverted[0, 0] = torch.tensor([50.0, 10.0, 20.0, 40.0])  # x2 < x1
    out_of_range = labels.clone()
    out_of_range[1, 0] = 99
    cases = [
        (dict(cls_logits=nan_logits), "cls_logits must be finite"),
        (dict(gt_boxes=nan_box), r"gt_boxes: image 1, ground truth 1 is \[.*nan.*a finite"),
        (dict(gt_boxes=inverted), r"gt_boxes: image 0, ground truth 0 is \[50.0, 10.0, 20.0, 40"),
        (dict(gt_labels=labels.float()), "gt_labels must be an integer tensor, got torch.float32"),
        (dict(gt_labels=out_of_range), r"image 1, ground truth 0 has label 99: .*\[0, 5\)"),
        (dict(gt_boxes=boxes.tolist()), "gt_boxes must be a torch tensor, got list"),
        (dict(points=inputs["points"].numpy()), "points must be a torch tensor, got ndarray"),
        (dict(gt_mask=np.ones((2, 3), bool)), "gt_mask must be a torch tensor, got ndarray"),
        (dict(pred_boxes=inputs["pred_boxes"][:, :5]), r"pred_boxes must be \[B, A, 4\]"),
        (dict(strides=-inputs["strides"]), "strides must be finite and > 0"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            assigner(**_bad(inputs, **change))
    # a NaN box on padding is ignored, as any padding
    padded = boxes.clone()
    padded[1, 2] = math.nan  # image 1 has 2 real ground truths: index 2 is padding
    assert not bool(inputs["gt_mask"][1, 2])
    assigner(**_bad(inputs, gt_boxes=padded))


def test_bad_matcher_inputs_name_what_is_wrong():
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    for matcher in (HungarianMatcher(), UOTMatcher()):
        bad = {**outputs, "pred_logits": outputs["pred_logits"].clone()}
        bad["pred_logits"][0, 1, 1] = math.nan
        with pytest.raises(ValueError, match=r"outputs\['pred_logits'\] must be finite"):
            matcher(bad, targets)
        wrong = [{"labels": torch.tensor([2]), "boxes": targets[0]["boxes"]}]  # K + 1 = 3 logits
        with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]\[0\] = 2 is not a class"):
            matcher(outputs, wrong)
        with pytest.raises(ValueError, match="must be torch tensors"):
            matcher(outputs, [{"labels": [0], "boxes": [[0.5, 0.5, 0.2, 0.2]]}])


def test_pad_targets_pads_each_image_in_order():
    from uotmatch.detection import PAD_BOX, SetTargets, pad_targets

    targets = [
        {"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]])},
        {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[9.0, 9, 9, 9]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    boxes, labels, gt_mask = pad_targets(targets)
    assert labels.tolist() == [[3, 1], [2, 0], [0, 0]]
    assert gt_mask.tolist() == [[True, True], [True, False], [False, False]]
    assert boxes.tolist() == [
        [[1, 2, 3, 4], [5, 6, 7, 8]],
        [[9, 9, 9, 9], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 0, 0]],
    ]
    t = SetTargets.from_list(targets)  # the matchers' padding: PAD_BOX
    assert t.boxes[1, 1].tolist() == list(PAD_BOX) and torch.equal(t.gt_mask, gt_mask)
    assert pad_targets([])[0].shape == (0, 0, 4)
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be \[2, 4\]"):
        pad_targets([{"labels": torch.tensor([1, 2]), "boxes": torch.zeros(3, 4)}])
    with pytest.raises(ValueError, match="integer class indices"):
        pad_targets([{"labels": torch.tensor([1.0]), "boxes": torch.zeros(1, 4)}])


def test_the_integrations_take_a_matcher_or_a_name():
    from uotmatch.detection import HungarianMatcher, UOTMatcher, build_matcher
    from uotmatch.detection._registry import matcher_or_build

    given = HungarianMatcher()
    assert matcher_or_build(given, {}, build_matcher) is given
    built = matcher_or_build("uot", {"eps": 0.2}, build_matcher)
    assert isinstance(built, UOTMatcher) and built.eps == 0.2
    with pytest.raises(ValueError, match=r"options \(eps\) are for a matcher given by name"):
        matcher_or_build(given, {"eps": 0.2}, build_matcher)
    with pytest.raises(ValueError, match="matcher must be a uotmatch.detection SetMatcher"):
        matcher_or_build(3, {}, build_matcher)
