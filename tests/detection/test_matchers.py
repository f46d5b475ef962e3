"""DETR-style matchers: DETR's own computation, Hungarian limit, empty images, bad input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from tests.conftest import on
from uotmatch.detection import MATCHER_TOL, HungarianMatcher, UOTMatcher
from uotmatch.detection.boxes import box_cxcywh_to_xyxy, generalized_box_iou

INF = math.inf


def _batch(seed, B=3, Q=12, K=6, sizes=(3, 0, 5)):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(B, Q, K + 1, generator=g),
        "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.1,
    }
    targets = [
        {
            "labels": torch.randint(K, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.1,
        }
        for n in sizes[:B]
    ]
    return outputs, targets


def _detr_reference(outputs, targets, w_class=1.0, w_bbox=5.0, w_giou=2.0):
    """facebookresearch/detr models/matcher.py, verbatim in substance (flattened batch)."""
    bs, nq = outputs["pred_logits"].shape[:2]
    out_prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)
    out_bbox = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([v["labels"] for v in targets])
    tgt_bbox = torch.cat([v["boxes"] for v in targets])
    cost_class = -out_prob[:, tgt_ids]
    cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
    C = (w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou).view(bs, nq, -1)
    sizes = [len(v["boxes"]) for v in targets]
    idx = [linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [
        (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
        for i, j in idx
    ]


@given(st.integers(0, 10_000))
def test_hungarian_matcher_equals_detr(device, seed):
    outputs, targets = _batch(seed)
    matcher = HungarianMatcher()
    ours = matcher(on(device, outputs), on(device, targets))
    ref = _detr_reference(outputs, targets)
    # its pairs come straight from the assignment: its plan decodes to the same
    decoded = matcher.solve(on(device, outputs), on(device, targets)).pairs()
    for (pi, gi), (pr, gr), (pd, gd) in zip(ours, ref, decoded, strict=True):
        assert torch.equal(pi, pr) and torch.equal(gi, gr)
        assert torch.equal(pd.cpu(), pr) and torch.equal(gd.cpu(), gr)
        assert pi.dtype == torch.int64 and gi.dtype == torch.int64


@given(st.integers(0, 10_000), st.sampled_from([0.0, 0.7, -3.0]))
def test_uot_matcher_hungarian_limit_equals_hungarian(device, seed, background):
    outputs, targets = _batch(seed, B=4, Q=20, sizes=(3, 0, 7, 20))
    uot = UOTMatcher(eps=0.0, tau1=INF, tau2=INF, background_cost=background)(
        on(device, outputs), on(device, targets)
    )
    hun = HungarianMatcher()(outputs, targets)
    for (pu, gu), (ph, gh) in zip(uot, hun, strict=True):
        assert torch.equal(pu, ph) and torch.equal(gu, gh)


def test_zero_targets_give_empty_pairs():
    outputs, targets = _batch(0, B=2, sizes=(0, 0))
    for matcher in (HungarianMatcher(), UOTMatcher(), UOTMatcher(eps=0.0)):
        for pred, gt in matcher(outputs, targets):
            assert pred.numel() == 0 and gt.numel() == 0


def test_uot_matcher_soft_plan(device):
    outputs, targets = _batch(1)
    m = UOTMatcher(eps=0.05).solve(on(device, outputs), on(device, targets))
    assert m.plan.device.type == device.type
    m = UOTMatcher(eps=0.05, tol=1e-5).solve(outputs, targets)
    assert m.plan.shape == (3, 12, 6)  # G = 5 (max), + background
    assert torch.all(m.plan[0, :, 3:5] == 0)  # image 0 has 3 targets: padded columns are 0
    torch.testing.assert_close(m.plan.sum(-1), torch.ones(3, 12), atol=1e-4, rtol=0)
    assert bool(m.converged.all())
    # each real target receives one unit (balanced): mass on real columns
    torch.testing.assert_close(m.plan[2, :, :5].sum(0), torch.ones(5), atol=1e-4, rtol=0)


def test_default_tolerance_pairs_as_a_converged_solve():
    """The matcher's default tol (MATCHER_TOL, looser than match()'s) gives the pairs of a
    float64 solve to 1e-10 on batches of 100 queries, and an honest error within it."""
    matcher = UOTMatcher()
    assert matcher.tol == MATCHER_TOL == 1e-3
    reference = UOTMatcher(tol=1e-10, max_iter=100_000)
    for seed in range(4):
        outputs, targets = _batch(seed, B=4, Q=100, K=91, sizes=(30, 7, 1, 18))
        m = matcher.solve(outputs, targets)
        assert bool(m.converged.all()) and bool((m.marginal_error <= MATCHER_TOL).all())
        C, t = reference.cost(outputs, targets)
        ref = reference.solve_cost(C.double(), t.gt_mask)  # the same cost, in float64
        assert bool((ref.marginal_error <= 1e-10).all())
        assert torch.equal(m.gt_index("hungarian"), ref.gt_index("hungarian"))
        # looser than the pairs need, yet not the reference: the plans differ within tol
        assert float((m.plan.double() - ref.plan).abs().max()) > 1e-9


def test_the_matcher_solves_by_sweeps_to_the_pairs_of_newtons_stages():
    """UOTMatcher's default ``method="sweeps"`` (cheaper on DETR matchings) pairs as
    ``match``'s ``"auto"`` (Newton's stages at this size), within the same tol."""
    from uotmatch import SolverOptions

    assert UOTMatcher().solver == SolverOptions(tol=MATCHER_TOL, method="sweeps")
    auto = UOTMatcher(solver=SolverOptions(tol=MATCHER_TOL))
    for seed in range(3):
        outputs, targets = _batch(seed, B=4, Q=100, K=91, sizes=(30, 7, 1, 18))
        m, n = UOTMatcher().solve(outputs, targets), auto.solve(outputs, targets)
        assert bool(m.converged.all()) and bool(n.converged.all())
        assert torch.equal(m.gt_index("hungarian"), n.gt_index("hungarian"))


def test_the_cost_keeps_float64_and_computes_half_in_float32():
    """DETR computes its matching cost in the outputs' dtype: float64 outputs give a float64
    cost (DETR's own, to rounding), half precision is computed in float32, and predictions and
    targets of different dtypes meet in the wider one."""
    outputs, targets = _batch(3, B=2, Q=9, sizes=(4, 2))
    double = {k: v.double() for k, v in outputs.items()}
    C, t = HungarianMatcher().cost(double, targets)  # targets stay float32
    assert C.dtype == torch.float64
    bs, nq = 2, 9
    out_prob = double["pred_logits"].flatten(0, 1).softmax(-1)
    out_bbox = double["pred_boxes"].flatten(0, 1)
    for i, v in enumerate(targets):  # DETR's cost, per image, in float64
        box = v["boxes"].double()
        ref = (
            5 * torch.cdist(out_bbox, box, p=1)
            - out_prob[:, v["labels"]]
            - 2 * generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(box))
        ).view(bs, nq, -1)[i]
        torch.testing.assert_close(C[i, :, : len(box)], ref, atol=1e-12, rtol=0)
    half = {k: v.half() for k, v in outputs.items()}
    for matcher in (HungarianMatcher(), UOTMatcher(), HungarianMatcher(focal=True)):
        if matcher.focal:
            half = {**half, "pred_logits": half["pred_logits"][..., :-1]}
        assert matcher.cost(half, targets)[0].dtype == torch.float32


def test_focal_cost_variant():
    outputs, targets = _batch(2)
    outputs["pred_logits"] = outputs["pred_logits"][..., :-1]  # no no-object logit with focal
    pairs = HungarianMatcher(focal=True)(outputs, targets)
    assert [len(p) for p, _ in pairs] == [3, 0, 5]
    # the focal class cost prefers confident predictions: one target, one confident query
    logits = torch.full((1, 4, 6), -5.0)
    logits[0, 2, 1] = 5.0
    out = {"pred_logits": logits, "pred_boxes": torch.full((1, 4, 4), 0.5)}
    tgt = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    assert HungarianMatcher(focal=True)(out, tgt)[0][0].tolist() == [2]


def test_bad_input():
    outputs, targets = _batch(0)
    with pytest.raises(ValueError, match="outputs must be a dict with 'pred_logits'"):
        HungarianMatcher()({"pred_logits": outputs["pred_logits"]}, targets)
    with pytest.raises(ValueError, match=r"batch and query sizes must agree.*5 targets"):
        HungarianMatcher()(outputs, targets[:2] + targets)
    bad = [dict(t) for t in targets]
    bad[0]["boxes"] = bad[0]["boxes"][:, :2]
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be \[3, 4\]"):
        UOTMatcher()(outputs, bad)
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    bad = [dict(t) for t in targets]  # a negative width, as the dense assigners refuse
    bad[2]["boxes"] = bad[2]["boxes"].clone()
    bad[2]["boxes"][0, 2] = -0.1
    for matcher in (HungarianMatcher(), UOTMatcher()):
        with pytest.raises(ValueError, match=r"targets\[2\]\['boxes'\]\[0\].*w >= 0 and h >= 0"):
            matcher(outputs, bad)
    bad = [dict(t) for t in targets]  # float labels
    bad[0]["labels"] = bad[0]["labels"].float()
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must hold integer class"):
        UOTMatcher()(outputs, bad)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_more_targets_than_queries_leaves_the_extra_targets_unmatched(eps):
    """An image with 7 targets and 5 queries: Hungarian matches every query and leaves 2
    targets out; the balanced UOT matcher with a background does the equivalent (it raised
    before), exactly Hungarian at eps = 0."""
    outputs, targets = _batch(4, B=2, Q=5, sizes=(7, 2))
    hun = HungarianMatcher()(outputs, targets)
    m = UOTMatcher(eps=eps, background_cost=0.0, normalize_cost=True, tol=1e-5).solve(
        outputs, targets
    )
    assert m.plan.shape == (2, 5, 8)  # [B, Q, G + 1]
    assert bool(m.converged.all()), m.marginal_error
    torch.testing.assert_close(m.plan.sum(-1), torch.ones(2, 5), atol=1e-4, rtol=0)
    per_target = m.plan[0, :, :7].sum(0)
    assert float(per_target.sum()) == pytest.approx(5.0, abs=1e-4)  # 5 of 7 targets served
    assert bool((per_target <= 1 + 1e-4).all())
    if eps == 0:
        for (pu, gu), (ph, gh) in zip(m.pairs(), hun, strict=True):
            assert torch.equal(pu, ph) and torch.equal(gu, gh)
    assert [len(p) for p, _ in hun] == [5, 2]


def test_focal_class_cost_is_the_published_formula():
    """Deformable DETR / DINO / RT-DETR: alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha)
    p^gamma (-log(1 - p + 1e-8)) of the target class, on sigmoid probabilities, as their code
    and Hugging Face's compute it (focal_eps = 0: without the 1e-8): hand-computed values."""
    from uotmatch.detection.costs import detr_class_cost

    logits = torch.tensor([[[0.0, 2.0], [-1.0, 0.5]]], dtype=torch.float64)  # [B, Q, K]
    labels = torch.tensor([[1, 0]])

    def published(x, e=1e-8):
        p = 1 / (1 + math.exp(-x))
        return 0.25 * (1 - p) ** 2 * -math.log(p + e) - 0.75 * p**2 * -math.log(1 - p + e)

    for focal_eps in (1e-8, 0.0):
        cost = detr_class_cost(logits, labels, focal=True, focal_eps=focal_eps)  # [1, 2, 2]
        e = focal_eps
        expected = [
            [published(2.0, e), published(0.0, e)],
            [published(0.5, e), published(-1.0, e)],
        ]
        torch.testing.assert_close(cost[0], torch.tensor(expected, dtype=torch.float64))
    cost = detr_class_cost(logits, labels, focal=True)
    # with the cost weights, the matchers' cost is that plus DETR's box terms
    out = {"pred_logits": logits.float(), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    tgt = [{"labels": torch.tensor([1, 0]), "boxes": torch.full((2, 4), 0.5)}]
    C, _ = UOTMatcher(focal=True, cost_class=2.0).cost(out, tgt)
    torch.testing.assert_close(C[0].double(), 2 * cost[0] - 2.0, atol=1e-6, rtol=0)


def _deformable_detr_focal_cost(logits, labels, alpha=0.25, gamma=2.0):
    """Deformable-DETR's matcher's class cost (its ``HungarianMatcher.forward``), written out
    from its published code: ``out_prob = logits.sigmoid()``, ``1e-8`` inside the logs."""
    out_prob = logits.sigmoid()
    neg = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
    pos = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
    return pos[:, labels] - neg[:, labels]


def test_saturated_logits_pair_as_deformable_detrs_matcher():
    """One target and two queries with logits 20 and 30 for its class and the same boxes:
    Deformable-DETR's cost (and Hugging Face's) no longer tells them apart past a logit of
    about 16.6 (its 1e-8), so its Hungarian takes the first query; ours, with the same 1e-8,
    pairs the same, and the exact form (focal_eps=0) would prefer the more confident one."""
    logits = torch.tensor([[[20.0, -5.0], [30.0, -5.0]]])  # [1, 2 queries, 2 classes]
    boxes = torch.full((1, 2, 4), 0.3)
    targets = [{"labels": torch.tensor([0]), "boxes": torch.full((1, 4), 0.3)}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    theirs = _deformable_detr_focal_cost(logits[0], torch.tensor([0]))
    assert float(theirs[0, 0]) == float(theirs[1, 0])  # saturated: a tie, broken by order
    assert HungarianMatcher(focal=True)(outputs, targets)[0][0].tolist() == [0]
    exact = HungarianMatcher(focal=True, focal_eps=0.0)(outputs, targets)
    assert exact[0][0].tolist() == [1]
    C, _ = HungarianMatcher(focal=True, cost_bbox=0.0, cost_giou=0.0).cost(outputs, targets)
    torch.testing.assert_close(C[0], theirs)


def test_every_target_gets_a_query_at_initialisation():
    """Near-identical queries (a DETR at random initialisation): the plan is spread thin and
    every query's largest share is the background's, so the raw argmax decoding pairs no target
    at all; the matchers' default decoding (the one-to-one matching of most plan mass) pairs
    every target, at every eps in [1e-3, 1] and for finite taus."""
    g = torch.Generator().manual_seed(0)
    B, Q, K = 4, 20, 5
    base = torch.randn(1, 1, K, generator=g)
    outputs = {
        "pred_logits": base + 1e-3 * torch.randn(B, Q, K, generator=g),
        "pred_boxes": torch.full((B, Q, 4), 0.5) + 1e-3 * torch.rand(B, Q, 4, generator=g),
    }
    sizes = [5, 3, 1, 7]
    targets = [
        {
            "labels": torch.randint(K - 1, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.1,
        }
        for n in sizes
    ]
    for eps in (1e-3, 1e-2, 0.1, 1.0):
        for taus in ((math.inf, math.inf), (1.0, 1.0), (10.0, 1.0), (math.inf, 1.0)):
            matcher = UOTMatcher(eps=eps, tau1=taus[0], tau2=taus[1])
            pairs = matcher(outputs, targets)
            for (pred, gt), n in zip(pairs, sizes, strict=True):
                assert sorted(gt.tolist()) == list(range(n)), (eps, taus)
                assert len(set(pred.tolist())) == n  # one query each
    raw = UOTMatcher(eps=0.05, decode="argmax")(outputs, targets)
    assert sum(len(p) for p, _ in raw) < sum(sizes)  # the raw decoding starves targets
