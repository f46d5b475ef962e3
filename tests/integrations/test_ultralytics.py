"""uotmatch's assigners inside Ultralytics YOLO (the real library, offline, on the CPU)."""

import math
import os
import tempfile

import pytest
import torch

# Ultralytics reads these when imported: no network, settings in a writable place.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))
ultralytics = pytest.importorskip("ultralytics")

from ultralytics.utils.tal import TaskAlignedAssigner, make_anchors  # noqa: E402

from detectors.data import colorboxes  # noqa: E402
from detectors.data.yolo import write_yolo  # noqa: E402
from uotmatch.detection import OTAAssigner, SimOTAAssigner, UOTAssigner  # noqa: E402
from uotmatch.integrations.ultralytics import TaskAssigner, grid_strides, trainer  # noqa: E402

STRIDES = [8.0, 16.0, 32.0]
CALLS = []


class CountingOTA(OTAAssigner):
    """OTA that records each assignment (module level: Ultralytics pickles the model)."""

    def __call__(self, **kwargs):
        result = super().__call__(**kwargs)
        CALLS.append(int(result.num_fg.sum()))
        return result


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


def test_bad_arguments():
    with pytest.raises(ValueError, match="assigner must be a uotmatch.detection DenseAssigner"):
        trainer(lambda **kw: None)
    with pytest.raises(ValueError, match="assigner must be a uotmatch.detection DenseAssigner"):
        TaskAssigner("ota")
