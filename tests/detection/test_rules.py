"""SimOTA, FCOS and ATSS against per-image references written from the official code, and
hand-built scenes."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import on
from tests.detection.scenes import anchor_points, as_inputs, scene
from uotmatch.detection import ATSSAssigner, FCOSAssigner, SimOTAAssigner
from uotmatch.detection.boxes import box_iou


def yolox_simota(points, strides, logits, pred, gt_boxes, gt_labels, version="0.3", obj=None):
    """One image, as YOLOX's get_assignments + dynamic_k_matching (with ``obj [A, 1]``, its
    objectness branch: ``sqrt(sigmoid(cls) * sigmoid(obj))``):
    version "0.3" (YOLOX 0.3.0: in some box or centre square of radius 2.5, penalty 1e5 unless
    in both) or "2023" (its 2023 geometry constraint: the centre square of radius 1.5 alone,
    penalty 1e6)."""
    G, A, K = len(gt_boxes), len(points), logits.shape[-1]
    x, y = points[:, 0], points[:, 1]
    left, t, r, b = gt_boxes.T
    in_box = (
        torch.stack(
            [
                x[None] - left[:, None],
                y[None] - t[:, None],
                r[:, None] - x[None],
                b[:, None] - y[None],
            ],
            2,
        )
        .min(-1)
        .values
        > 0.0
    )
    cx, cy = (left + r) / 2, (t + b) / 2
    rad = (2.5 if version == "0.3" else 1.5) * strides
    in_ctr = (
        torch.stack(
            [
                x[None] - (cx[:, None] - rad[None]),
                y[None] - (cy[:, None] - rad[None]),
                (cx[:, None] + rad[None]) - x[None],
                (cy[:, None] + rad[None]) - y[None],
            ],
            2,
        )
        .min(-1)
        .values
        > 0.0
    )
    if version == "0.3":
        fg_mask = in_box.any(0) | in_ctr.any(0)
        geometry = in_box[:, fg_mask] & in_ctr[:, fg_mask]
        penalty = 100000.0
    else:
        fg_mask = in_ctr.any(0)
        geometry = in_ctr[:, fg_mask]
        penalty = 1e6
    ious = box_iou(gt_boxes, pred[fg_mask])
    nfg = int(fg_mask.sum())
    gt_cls = F.one_hot(gt_labels, K).float()
    scores = logits.float().sigmoid()
    if obj is not None:
        scores = (scores * obj.float().sigmoid()).sqrt()
    cls = F.binary_cross_entropy(
        scores[fg_mask][None].repeat(G, 1, 1),
        gt_cls[:, None].repeat(1, nfg, 1),
        reduction="none",
    ).sum(-1)
    cost = cls + 3.0 * -torch.log(ious + 1e-8) + penalty * (~geometry)
    matching = torch.zeros_like(cost)
    ks = torch.clamp(ious.topk(min(10, nfg), dim=1).values.sum(1).int(), min=1)
    for g in range(G):
        _, pos = torch.topk(cost[g], k=int(ks[g]), largest=False)
        matching[g][pos] = 1
    multi = matching.sum(0) > 1
    if multi.any():
        _, argmin = torch.min(cost[:, multi], dim=0)
        matching[:, multi] *= 0
        matching[argmin, multi] = 1
    out = torch.full((A,), -1, dtype=torch.long)
    taken = matching.sum(0) > 0
    out[torch.nonzero(fg_mask).flatten()[taken]] = matching[:, taken].argmax(0)
    return out


def atss_reference(points, strides, gt_boxes, topk=9, scale=8.0):
    """One image, as the official ATSS prepare_targets (FCOS-style: one anchor per point)."""
    G = len(gt_boxes)
    half = (scale * strides / 2)[:, None]
    anchors = torch.cat([points - half, points + half], -1)
    ious = box_iou(anchors, gt_boxes)  # [A, G]
    gt_points = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distances = (points[:, None, :] - gt_points[None]).pow(2).sum(-1).sqrt()
    candidate_idxs, start = [], 0
    for s in strides.unique(sorted=True).tolist():
        n = int((strides == s).sum())
        k = min(topk, n)
        _, idx = distances[start : start + n].topk(k, dim=0, largest=False)
        candidate_idxs.append(idx + start)
        start += n
    candidate_idxs = torch.cat(candidate_idxs, 0)  # [9L, G]
    candidate_ious = ious[candidate_idxs, torch.arange(G)]
    thresh = candidate_ious.mean(0) + candidate_ious.std(0)
    is_pos = candidate_ious >= thresh[None]
    cx, cy = points[candidate_idxs, 0], points[candidate_idxs, 1]
    ltrb = torch.stack(
        [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], 1
    )
    is_pos &= ltrb.min(1).values > 0.01
    ious_inf = torch.full_like(ious, -math.inf)
    cols = torch.arange(G).expand_as(candidate_idxs)
    ious_inf[candidate_idxs[is_pos], cols[is_pos]] = ious[candidate_idxs[is_pos], cols[is_pos]]
    values, index = ious_inf.max(1)
    return torch.where(values == -math.inf, -1, index)


def rule_inputs(points, strides, gt_boxes, gt_labels, gt_mask=None):
    """The protocol's inputs for the rule-based assigners that read no predictions: logits of
    one class more than the labels need, and unit boxes at the points (unused but valid)."""
    B = gt_boxes.shape[0]
    K = int(gt_labels.max()) + 1 if gt_labels.numel() else 1
    logits = torch.zeros(B, len(points), K)
    pred = torch.cat([points - 0.5, points + 0.5], -1).expand(B, -1, -1)
    return as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, gt_mask)


@given(
    st.integers(0, 10_000),
    st.sampled_from([("yolox-0.3", "0.3"), ("yolox-2023", "2023")]),
    st.booleans(),
)
def test_simota_equals_yolox(device, seed, geometry, saturated):
    """Each geometry reproduces its YOLOX release, also with saturated scores (sigmoid = 0 or
    1 in float32), where the cost's logs are clamped at -100 as torch's BCE (YOLOX's) does."""
    ours_geometry, version = geometry
    points, strides, logits, pred, gt_boxes, gt_labels, gt_mask = scene(seed, B=3, G=4)
    if saturated:
        logits = logits * 40  # |logit| up to ~300: p is exactly 0 or 1
    inputs = as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, gt_mask)
    r = on("cpu", SimOTAAssigner(geometry=ours_geometry)(**on(device, inputs)))
    for b in range(3):
        real = gt_mask[b]
        ref = yolox_simota(
            points, strides, logits[b], pred[b], gt_boxes[b][real], gt_labels[b][real], version
        )
        assert r.gt_index[b].tolist() == ref.tolist()


@given(st.integers(0, 10_000))
def test_simota_with_objectness_equals_yolox(device, seed):
    """The shared call's ``obj_logits`` scores as YOLOX's objectness branch does."""
    points, strides, logits, pred, gt_boxes, gt_labels, gt_mask = scene(seed, B=2, G=4)
    obj = torch.randn(2, len(points), 1, generator=torch.Generator().manual_seed(seed)) * 3
    inputs = as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, gt_mask)
    r = on("cpu", SimOTAAssigner()(**on(device, inputs), obj_logits=obj.to(device)))
    for b in range(2):
        real = gt_mask[b]
        ref = yolox_simota(
            points, strides, logits[b], pred[b], gt_boxes[b][real], gt_labels[b][real], obj=obj[b]
        )
        assert r.gt_index[b].tolist() == ref.tolist()


@pytest.mark.parametrize("name", ["ota", "uot", "fcos", "atss"])
def test_assigners_that_do_not_read_objectness_refuse_it(name):
    from uotmatch.detection import build_assigner

    points, strides, logits, pred, gt_boxes, gt_labels, gt_mask = scene(0, B=1, G=2)
    inputs = as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, gt_mask)
    assigner = build_assigner(name)
    assert "obj_logits" not in assigner.uses
    with pytest.raises(ValueError, match="obj_logits: .* does not read it"):
        assigner(**inputs, obj_logits=torch.zeros(1, len(points), 1))


def test_objectness_is_validated():
    points, strides, logits, pred, gt_boxes, gt_labels, gt_mask = scene(0, B=1, G=2)
    inputs = as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, gt_mask)
    A = len(points)
    with pytest.raises(ValueError, match=rf"obj_logits must be a \[B, A, 1\] = \[1, {A}, 1\]"):
        SimOTAAssigner()(**inputs, obj_logits=torch.zeros(1, A))
    with pytest.raises(ValueError, match="obj_logits must be finite"):
        SimOTAAssigner()(**inputs, obj_logits=torch.full((1, A, 1), math.nan))
    with pytest.raises(ValueError, match="obj_logits must have a floating dtype"):
        SimOTAAssigner()(**inputs, obj_logits=torch.zeros(1, A, 1, dtype=torch.long))


def test_saturated_scores_follow_torchs_bce_not_a_probability_clamp():
    """p = 1 exactly: BCE against 0 is 100 (log clamped at -100), not -log(1e-7) = 16.1."""
    from uotmatch.detection.costs import bce_terms

    prob = torch.tensor([[[1.0, 0.5]]])  # [B, A, K]
    pair, background = bce_terms(prob, torch.tensor([[1]]))
    assert float(background) == pytest.approx(100 + math.log(2))
    assert float(pair) == pytest.approx(100 + math.log(2))  # class 1 at 0.5: log 2 either way


@given(st.integers(0, 10_000))
def test_atss_equals_official(device, seed):
    inputs = scene(seed, B=3, G=4, strides=(8, 16, 32))
    points, strides, _, _, gt_boxes, gt_labels, gt_mask = inputs
    r = on("cpu", ATSSAssigner()(**on(device, as_inputs(*inputs))))
    for b in range(3):
        ref = atss_reference(points, strides, gt_boxes[b][gt_mask[b]])
        assert r.gt_index[b].tolist() == ref.tolist()


def test_atss_distances_are_exact_where_float32_cdist_rounds_them_together():
    """Float32 torch.cdist (matrix-product mode) rounds the distances 12.75459 and 12.75429 from
    this centre to the same value, so its top-9 picks the farther point; the official code's
    exact differences, and ours, pick the nearer one."""
    points, strides = anchor_points((1024, 1024), strides=(8, 16, 32))
    centre = torch.tensor([295.83599853515625, 239.83624267578125])
    gt = torch.cat([centre - 20, centre + 20])[None, None]  # [1, 1, 4]
    ctr = (gt[..., :2] + gt[..., 2:]) / 2
    level = strides == 8
    mm = torch.cdist(ctr, points[level][None]).squeeze().topk(9, largest=False).indices
    exact = (points[level] - ctr[0]).pow(2).sum(-1).sqrt().topk(9, largest=False).indices
    assert set(mm.tolist()) != set(exact.tolist())  # the scene does trip cdist
    r = ATSSAssigner()(**rule_inputs(points, strides, gt, torch.tensor([[0]])))
    assert r.gt_index[0].tolist() == atss_reference(points, strides, gt[0]).tolist()


def test_fcos_hand_built(device):
    points, strides = anchor_points((256, 256), strides=(8, 16, 32))
    # a 40 px box (reach <= 64: level stride 8), a 200 px box (reach 64-128: stride 16), and a
    # small box inside the big one (ambiguity: the smaller area wins)
    gt_boxes = torch.tensor(
        [[[8.0, 8.0, 48.0, 48.0], [40.0, 40.0, 240.0, 240.0], [120.0, 120.0, 152.0, 152.0]]]
    )
    gt_labels = torch.tensor([[0, 1, 2]])
    inputs = on(device, rule_inputs(points, strides, gt_boxes, gt_labels))
    r = on("cpu", FCOSAssigner(radius=1.5)(**inputs))

    def at(x, y, s):
        return int(((points[:, 0] == x) & (points[:, 1] == y) & (strides == s)).nonzero())

    assert int(r.gt_index[0, at(28, 28, 8)]) == 0  # centre of box 0, level 8
    assert int(r.gt_index[0, at(24, 24, 16)]) == -1  # box 0 at the wrong level (reach 24 < 64)
    assert int(r.gt_index[0, at(132, 132, 8)]) == 2  # small box, level 8 (reach 20; big: 108)
    assert int(r.gt_index[0, at(136, 136, 16)]) == 1  # big box, level 16 (reach 104)
    assert int(r.gt_index[0, at(12, 12, 8)]) == -1  # inside box 0 but outside its 1.5-stride centre
    # without centre sampling the corner point of box 0 is positive (reach 36 in range)
    r_all = on("cpu", FCOSAssigner(radius=None)(**inputs))
    assert int(r_all.gt_index[0, at(12, 12, 8)]) == 0
    assert r.labels[0, at(132, 132, 8)] == 2 and r.num_fg.item() == int(r.fg_mask.sum())


def test_fcos_ambiguity_takes_the_smallest_area():
    points, strides = anchor_points((64, 64), strides=(8,))
    gt_boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [16.0, 16.0, 48.0, 48.0]]])
    r = FCOSAssigner(radius=None, size_ranges=((0, math.inf),))(
        **rule_inputs(points, strides, gt_boxes, torch.tensor([[0, 1]]))
    )
    inner = (points[:, 0] > 16) & (points[:, 0] < 48) & (points[:, 1] > 16) & (points[:, 1] < 48)
    assert (r.gt_index[0][inner] == 1).all() and (r.gt_index[0][~inner] == 0).all()


def test_simota_hand_built():
    """One box; the two anchors predicting it exactly and confidently are its k cheapest."""
    points, strides = anchor_points((64, 64), strides=(8,))
    gt = torch.tensor([[[16.0, 16.0, 48.0, 48.0]]])
    A = len(points)
    logits = torch.full((1, A, 3), -4.0)
    pred = torch.tensor([[20.0, 20.0, 30.0, 30.0]]).repeat(1, A, 1)
    good = [
        int(((points[:, 0] == 28) & (points[:, 1] == 28)).nonzero()),
        int(((points[:, 0] == 36) & (points[:, 1] == 36)).nonzero()),
    ]
    for i in good:
        logits[0, i, 1] = 4.0
        pred[0, i] = gt[0, 0]
    r = SimOTAAssigner()(**as_inputs(points, strides, logits, pred, gt, torch.tensor([[1]])))
    # k = floor(1 + 1 + small IoUs) = 2
    assert sorted(torch.nonzero(r.fg_mask[0]).flatten().tolist()) == sorted(good)
    assert (r.ious[0, good] > 0.999).all()


def test_rules_handle_empty_images():
    points, strides, logits, pred, gt_boxes, gt_labels, _ = scene(0, B=2, G=2)
    none = torch.zeros(2, 2, dtype=torch.bool)
    for result in (
        SimOTAAssigner()(**as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, none)),
        FCOSAssigner()(**as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, none)),
        ATSSAssigner()(**as_inputs(points, strides, logits, pred, gt_boxes, gt_labels, none)),
    ):
        assert (result.gt_index == -1).all() and result.num_fg.tolist() == [0, 0]


def test_fcos_needs_a_size_range_per_level():
    points, strides = anchor_points((64, 64), strides=(8, 16))
    with pytest.raises(ValueError, match="2 feature levels .* but only 1 size_ranges"):
        FCOSAssigner(size_ranges=((0, 64),))(
            **rule_inputs(
                points,
                strides,
                torch.tensor([[[0.0, 0, 8, 8]]]),
                torch.zeros(1, 1, dtype=torch.long),
            )
        )


def test_atss_hand_built():
    """One level of 4 x 4 points (stride 16: at 8, 24, 40, 56), anchors 32 px (scale 2).

    Box [0, 0, 48, 48]: its centre (24, 24) is a point, whose anchor [8, 8, 40, 40] has IoU
    1024 / 2304 = 0.444; the next nearest points (distance 16) have IoU 768 / 2560 = 0.3. With
    topk = 4 the candidate IoUs are 0.444, 0.3, 0.3, 0.3: mean 0.336 + std 0.072 = 0.408, so only
    the centre point is positive.

    Box [0, 0, 32, 32]: the 4 points around its centre (16, 16) tie in distance and all have
    IoU 576 / 1472 = 0.391: std 0, threshold = mean, all four positive (centres inside).
    """
    points, strides = anchor_points((64, 64), strides=(16,))
    atss = ATSSAssigner(topk=4, anchor_scale=2.0)
    r = atss(
        **rule_inputs(
            points, strides, torch.tensor([[[0.0, 0.0, 48.0, 48.0]]]), torch.tensor([[0]])
        )
    )
    assert {tuple(p) for p in points[r.fg_mask[0]].tolist()} == {(24.0, 24.0)}
    r = atss(
        **rule_inputs(
            points, strides, torch.tensor([[[0.0, 0.0, 32.0, 32.0]]]), torch.tensor([[0]])
        )
    )
    expected = {(8.0, 8.0), (24.0, 8.0), (8.0, 24.0), (24.0, 24.0)}
    assert {tuple(p) for p in points[r.fg_mask[0]].tolist()} == expected
