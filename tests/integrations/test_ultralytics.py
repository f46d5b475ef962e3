"""uotmatch's assigners inside Ultralytics YOLO (the real library, offline, on the CPU)."""

import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

# Ultralytics reads these when imported: no network, settings in a writable place.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))
ultralytics = pytest.importorskip("ultralytics")

from ultralytics.models.utils.loss import RTDETRDetectionLoss  # noqa: E402
from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors  # noqa: E402

from detectors.data import colorboxes  # noqa: E402
from detectors.data.yolo import write_yolo  # noqa: E402
from uotmatch.detection import (  # noqa: E402
    HungarianMatcher,
    OTAAssigner,
    SimOTAAssigner,
    UOTAssigner,
    UOTMatcher,
)
from uotmatch.integrations.ultralytics import (  # noqa: E402
    RTDETRMatcher,
    TaskAssigner,
    grid_strides,
    rtdetr_trainer,
    trainer,
)

STRIDES = [8.0, 16.0, 32.0]
CALLS = []


class CountingOTA(OTAAssigner):
    """OTA that records each assignment (module level: Ultralytics pickles the model)."""

    def __call__(self, **kwargs):
        result = super().__call__(**kwargs)
        CALLS.append(int(result.num_fg.sum()))
        return result


class CountingUOT(UOTMatcher):
    """The UOT matcher, recording the number of pairs of each matching."""

    def forward(self, outputs, targets):
        raise AssertionError("RT-DETR's adapter calls solve()")

    def solve(self, outputs, targets):
        m = super().solve(outputs, targets)
        CALLS.append(sum(len(p) for p, _ in m.pairs(self.decode)))
        return m


def _loads_without_uotmatch(weights, cls, image):
    """A checkpoint loads and predicts in a Python where uotmatch cannot be imported."""
    code = (
        "import sys; sys.modules['uotmatch'] = None\n"
        f"from ultralytics import {cls}\n"
        f"r = {cls}({str(weights)!r}).predict({str(image)!r}, imgsz=64, device='cpu', "
        "verbose=False)\n"
        "print('predicted', len(r))"
    )
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted 1" in done.stdout


def _inputs(seed=0, b=2, n=5, nc=20, size=96):
    """TAL's inputs as v8DetectionLoss builds them: probabilities, pixel boxes and points."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.zeros(b, 1, size // int(s), size // int(s)) for s in STRIDES]
    points, stride_tensor = make_anchors(feats, torch.tensor(STRIDES), 0.5)
    points = points * stride_tensor  # pixels
    A = len(points)
    scores = torch.rand(b, A, nc, generator=g) * 0.3
    half = torch.rand(b, A, 2, generator=g) * 20 + 4
    boxes = torch.cat([points - half, points + half], -1)
    ctr = torch.rand(b, n, 2, generator=g) * (size - 30) + 15
    wh = torch.rand(b, n, 2, generator=g) * 20 + 8
    gt_bboxes = torch.cat([ctr - wh / 2, ctr + wh / 2], -1)
    gt_labels = torch.randint(nc, (b, n, 1), generator=g).float()
    mask_gt = torch.ones(b, n, 1)
    mask_gt[1, 3:] = 0  # image 1 has 3 boxes, padded
    gt_bboxes[1, 3:] = 0
    return scores, boxes, points, gt_labels, gt_bboxes, mask_gt


def test_grid_strides_are_recovered_from_the_points():
    scores, boxes, points, *_ = _inputs()
    s = grid_strides(points, STRIDES)
    assert s.tolist() == [8.0] * 144 + [16.0] * 36 + [32.0] * 9
    with pytest.raises(ValueError, match="cannot recover the strides"):
        grid_strides(points + 1.0, STRIDES)


@pytest.mark.parametrize(
    "assigner", [OTAAssigner(), UOTAssigner(tau1=10.0, tau2=1.0), SimOTAAssigner()]
)
def test_task_assigner_answers_as_task_aligned_assigner(assigner):
    inputs = _inputs()
    tal = TaskAlignedAssigner(topk=10, num_classes=20, alpha=0.5, beta=6.0, stride=STRIDES)
    ours = TaskAssigner(assigner, STRIDES)
    expected, got = tal(*inputs), ours(*inputs)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype and g.device == e.device
    labels, bboxes, scores, fg, gt_idx = got
    assert int(fg.sum()) > 0 and not bool(fg[1, :].logical_and(gt_idx[1] >= 3).any())
    # background as TAL: index 0, zero scores; foreground: the assigned box, label and IoU
    assert bool((gt_idx[~fg] == 0).all()) and bool((scores[~fg] == 0).all())
    result = ours.last_result
    torch.testing.assert_close(bboxes[fg], result.boxes[fg])
    assert torch.equal(labels[fg], result.labels[fg])
    torch.testing.assert_close(scores.amax(-1)[fg], result.ious[fg])
    # an empty batch answers as TAL's
    empty = (*inputs[:3], inputs[3][:, :0], inputs[4][:, :0], inputs[5][:, :0])
    for e, g in zip(tal(*empty), ours(*empty), strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype


@pytest.mark.slow
def test_yolov8n_trains_an_epoch_with_ota(tmp_path):
    coco = tmp_path / "cb"
    colorboxes.generate(coco, train=16, val=8, size=96, crowded=True, progress=False)
    data = write_yolo(coco, tmp_path / "cb-yolo")
    CALLS.clear()
    model = ultralytics.YOLO("yolov8n.yaml")
    results = model.train(
        data=str(data),
        epochs=1,
        imgsz=96,
        batch=8,
        device="cpu",
        amp=False,
        plots=False,
        workers=0,
        project=str(tmp_path / "runs"),
        name="ota",
        trainer=trainer(CountingOTA()),
        verbose=False,
    )
    assert len(CALLS) >= 2 and sum(CALLS) > 0  # the assigner made every step's matching
    assert (tmp_path / "runs" / "ota" / "weights" / "last.pt").exists()
    csv = (tmp_path / "runs" / "ota" / "results.csv").read_text().splitlines()
    header, row = csv[0].split(","), csv[1].split(",")
    losses = [float(v) for h, v in zip(header, row, strict=True) if "train/" in h]
    assert losses and all(math.isfinite(v) for v in losses)
    assert results is not None
    image = next((coco / "val").iterdir())
    _loads_without_uotmatch(tmp_path / "runs" / "ota" / "weights" / "last.pt", "YOLO", image)


def _rtdetr_batch(seed=0, L=4, b=3, nq=30, nc=5, groups=(3, 0, 4)):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(L, b, nq, 4, generator=g) * 0.5 + 0.25
    scores = torch.randn(L, b, nq, nc, generator=g)
    n = sum(groups)
    batch = {
        "cls": torch.randint(nc, (n,), generator=g),
        "bboxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3,
        "gt_groups": list(groups),
    }
    return (boxes, scores), batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rtdetr_loss_with_hungarian_is_the_stock_loss(seed):
    """Ultralytics' RT-DETR loss with our Hungarian (its cost gains 2 / 5 / 2, focal) is its own
    loss, term by term; our matcher made every matching (final and auxiliary layers)."""
    preds, batch = _rtdetr_batch(seed)
    stock = RTDETRDetectionLoss(nc=5, use_vfl=True)(preds, batch)
    criterion = RTDETRDetectionLoss(nc=5, use_vfl=True)
    criterion.matcher = RTDETRMatcher(
        HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal=True)
    )
    ours = criterion(preds, batch)
    assert criterion.matcher.calls == 4 and set(ours) == set(stock)
    for key, value in stock.items():
        assert float(ours[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-7), key


@pytest.mark.slow
def test_rtdetr_trains_with_the_uot_matcher(tmp_path):
    """``rtdetr_trainer``: an epoch of RT-DETR-L on Color Boxes, every matching ours (the stock
    matcher never runs), every target paired; the checkpoint needs no uotmatch."""
    coco = tmp_path / "cb"
    colorboxes.generate(coco, train=8, val=4, size=64, progress=False)
    data = write_yolo(coco, tmp_path / "cb-yolo")
    CALLS.clear()
    ultralytics.RTDETR("rtdetr-l.yaml").train(
        data=str(data),
        epochs=1,
        imgsz=64,
        batch=4,
        device="cpu",
        amp=False,
        plots=False,
        workers=0,
        val=False,
        project=str(tmp_path / "runs"),
        name="uot",
        trainer=rtdetr_trainer(CountingUOT(focal=True, cost_class=2.0)),
        verbose=False,
    )
    assert len(CALLS) >= 2 * 7 and sum(CALLS) > 0  # 2 steps x (6 decoder layers + encoder)
    weights = tmp_path / "runs" / "uot" / "weights" / "last.pt"
    _loads_without_uotmatch(weights, "RTDETR", next((coco / "val").iterdir()))


def test_the_trainers_refuse_the_other_family(tmp_path):
    coco = tmp_path / "cb"
    colorboxes.generate(coco, train=4, val=2, size=64, progress=False)
    data = write_yolo(coco, tmp_path / "cb-yolo")
    kw = dict(data=str(data), epochs=1, imgsz=64, device="cpu", project=str(tmp_path), plots=False)
    with pytest.raises(ValueError, match=r"RT-DETR .* use rtdetr_trainer\(matcher\)"):
        ultralytics.RTDETR("rtdetr-l.yaml").train(trainer=trainer(OTAAssigner()), **kw)
    with pytest.raises(ValueError, match=r"a YOLO model takes trainer\(assigner\)"):
        ultralytics.YOLO("yolov8n.yaml").train(trainer=rtdetr_trainer(UOTMatcher()), **kw)


def test_bad_arguments():
    with pytest.raises(ValueError, match="assigner must be a uotmatch.detection DenseAssigner"):
        trainer(lambda **kw: None)
    with pytest.raises(ValueError, match="assigner must be a uotmatch.detection DenseAssigner"):
        TaskAssigner("ota")
    with pytest.raises(ValueError, match="matcher must be a uotmatch.detection SetMatcher"):
        rtdetr_trainer(OTAAssigner())
    with pytest.raises(ValueError, match="matcher must be a uotmatch.detection SetMatcher"):
        RTDETRMatcher("hungarian")
