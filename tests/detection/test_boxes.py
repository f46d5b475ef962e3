"""Box ops against hand-computed values and degenerate boxes."""

import torch

from uotmatch.detection import boxes as B


def test_iou_and_giou_by_hand(device):
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], device=device)
    b = torch.tensor(
        [[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 4.0, 5.0, 5.0]], device=device
    )
    # overlap 1, union 7; identical; disjoint with hull 5x5 = 25, union 5
    torch.testing.assert_close(B.box_iou(a, b), a.new_tensor([[1 / 7, 1.0, 0.0]]))
    expected = a.new_tensor([[1 / 7 - (9 - 7) / 9, 1.0, 0.0 - (25 - 5) / 25]])
    torch.testing.assert_close(B.generalized_box_iou(a, b), expected)
    torch.testing.assert_close(B.aligned_iou(a.expand(3, 4), b), expected.new_tensor([1 / 7, 1, 0]))
    torch.testing.assert_close(B.aligned_giou(a.expand(3, 4), b), expected[0])


def test_batched_shapes():
    a, b = torch.rand(3, 5, 4), torch.rand(3, 7, 4)
    a[..., 2:] += a[..., :2]
    b[..., 2:] += b[..., :2]
    assert B.box_iou(a, b).shape == (3, 5, 7)
    torch.testing.assert_close(B.box_iou(a, b)[1], B.box_iou(a[1], b[1]))


def test_degenerate_boxes_give_zero_not_nan(device):
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]], device=device)  # zero area
    line = torch.tensor([[0.0, 0.0, 2.0, 0.0]], device=device)
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]], device=device)
    for x, y in [(point, box), (point, point), (line, line), (line, box)]:
        for fn in (B.box_iou, B.generalized_box_iou):
            out = fn(x, y)
            assert torch.isfinite(out).all()
        assert float(B.box_iou(x, y)) == 0.0
    assert float(B.generalized_box_iou(point, point)) == 0.0


def test_format_round_trips():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 8.0]])
    cxcywh = B.box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, torch.tensor([[3.0, 5.0, 4.0, 6.0]]))
    torch.testing.assert_close(B.box_cxcywh_to_xyxy(cxcywh), xyxy)
    points = torch.tensor([[2.0, 3.0], [9.0, 9.0]])
    ltrb = B.points_to_ltrb(points, xyxy)  # [2, 1, 4]
    torch.testing.assert_close(ltrb[0, 0], torch.tensor([1.0, 1.0, 3.0, 5.0]))
    assert (ltrb[1, 0] < 0).any()  # outside
    torch.testing.assert_close(B.ltrb_to_boxes(points[:1], ltrb[0]), xyxy)
    assert float(B.box_area(torch.tensor([3.0, 3.0, 1.0, 1.0]))) == 0.0  # inverted: empty
