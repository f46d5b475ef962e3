"""FCOS: shapes, every assigner trains (loss decreases on a few Color Boxes images), inference."""

import pytest
import torch

from detectors.common.backbone import ResNet
from detectors.common.data import CocoDetection, collate, default_transforms
from detectors.data import colorboxes
from detectors.fcos.loss import FCOSLoss
from detectors.fcos.model import FCOS
from uotmatch.detection import ASSIGNERS, build_assigner


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    files = colorboxes.generate(root, train=4, val=0, size=64, seed=0, progress=False)
    ds = CocoDetection(root, files["train"], default_transforms(False, 64, 64))
    return collate([ds[i] for i in range(4)])


def _model(num_classes=20):
    torch.manual_seed(0)
    return FCOS(num_classes, ResNet(18, freeze_at=0), channels=32, head_depth=1)


def test_points_are_the_feature_map_cells():
    """The model's points: one per feature-map cell, at ``k * s + s // 2`` (FCOS)."""
    model = _model()
    out = model(torch.zeros(1, 3, 128, 192))
    assert out["points"].shape[0] == 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2
    assert out["points"][:2].tolist() == [[4.0, 4.0], [12.0, 4.0]]
    assert out["points"][-1].tolist() == [192.0, 64.0] and out["strides"][-1] == 128


def test_outputs(tiny_batch, device):
    model = _model().to(device)
    out = model(tiny_batch.to(device)["images"])
    A = out["points"].shape[0]
    assert out["cls_logits"].device == device
    assert out["cls_logits"].shape == (4, A, 20) and out["boxes"].shape == (4, A, 4)
    assert (out["ltrb"] >= 0).all()
    dets = model.detect(out)
    assert len(dets) == 4 and all(d["boxes"].shape[-1] == 4 for d in dets)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ASSIGNERS))
def test_every_assigner_trains(name, tiny_batch, device):
    model = _model().to(device)
    tiny_batch = tiny_batch.to(device)
    options = {"tau1": 10.0, "tau2": 10.0} if name == "uot" else {}
    assigner = build_assigner(name, **options)
    criterion = FCOSLoss(assigner)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = criterion(model(tiny_batch["images"]), tiny_batch)
        opt.zero_grad()
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss["loss"].detach()))
        assert torch.isfinite(loss["loss"])
    assert min(losses[-5:]) < 0.7 * losses[0], losses


def test_unknown_assigner():
    with pytest.raises(ValueError, match="assigner must be one of"):
        build_assigner("nearest")
