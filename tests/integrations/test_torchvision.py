"""uotmatch's assigners inside torchvision's own FCOS and RetinaNet (the real library)."""

import math

import pytest
import torch
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detectors.common.data import CocoDetection
from detectors.data import colorboxes
from uotmatch.detection import FCOSAssigner, OTAAssigner, UOTAssigner
from uotmatch.integrations.torchvision import use_assigner


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """8 crowded Color Boxes images of 96 px: (images, targets) as torchvision takes them."""
    root = tmp_path_factory.mktemp("cb-tv")
    files = colorboxes.generate(root, train=8, val=0, size=96, crowded=True, progress=False)
    ds = CocoDetection(root, files["train"])
    images, targets = [], []
    for i in range(8):
        image, target = ds[i]
        images.append(image)
        targets.append({"boxes": target["boxes"], "labels": target["labels"]})
    return images, targets


def _backbone():
    return resnet_fpn_backbone(
        backbone_name="resnet18",
        weights=None,
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )


def _fcos():
    torch.manual_seed(0)
    return FCOS(_backbone(), num_classes=20, min_size=96, max_size=96)


def _retinanet():
    torch.manual_seed(0)
    return RetinaNet(_backbone(), num_classes=20, min_size=96, max_size=96)


def _train(model, samples, steps=4, batch=4):
    images, targets = samples
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005)
    history = []
    for step in range(steps):
        i = (step * batch) % len(images)
        losses = model(images[i : i + batch], targets[i : i + batch])
        total = sum(losses.values())
        assert all(math.isfinite(float(v.detach())) for v in losses.values()), losses
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total))
    return history


@pytest.mark.slow
@pytest.mark.parametrize(
    "assigner",
    [OTAAssigner(), UOTAssigner(eps=0.1, tau1=10.0, tau2=1.0)],
    ids=["ota", "uot-regime"],
)
def test_torchvision_fcos_trains_with_an_ot_assigner(samples, assigner):
    calls = []
    original = type(assigner).__call__

    class Counting(type(assigner)):
        def __call__(self, **kwargs):
            calls.append(kwargs["cls_logits"].shape)
            return original(self, **kwargs)

    assigner.__class__ = Counting
    model = use_assigner(_fcos(), assigner)
    history = _train(model, samples)
    assert len(calls) == 4  # the assigner really made every step's matching
    assert int(model.uotmatch_result.num_fg.sum()) > 0  # foreground found
    assert calls[0][1] == sum(s * s for s in (12, 6, 3, 2, 1))  # one row per FCOS point
    assert len(history) == 4


def test_the_default_matching_is_replaced_not_wrapped(samples):
    """With torchvision's own rule as the assigner (FCOS centre sampling), the adapter trains
    like the stock model: same first loss to rounding (the rules agree on these scenes)."""
    images, targets = samples
    stock = _fcos().train()
    ours = use_assigner(_fcos(), FCOSAssigner(radius=1.5)).train()
    a, b = stock(images[:4], targets[:4]), ours(images[:4], targets[:4])
    assert float(b["classification"]) == pytest.approx(float(a["classification"]), rel=0.05)
    assert int(ours.uotmatch_result.num_fg.sum()) > 0


def test_no_nan_on_empty_images_and_tiny_boxes(device):
    """An image without boxes, one with a 1-pixel box (OTA gives it its nearest point, outside
    the box: centerness would take sqrt of a negative number) and a crowded pile."""
    model = use_assigner(_fcos(), OTAAssigner()).to(device).train()
    images = [torch.rand(3, 96, 96, device=device) for _ in range(3)]
    pile = torch.tensor([[20.0 + i, 20.0 + i, 50.0 + i, 50.0 + i] for i in range(12)])
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[40.3, 40.3, 41.2, 41.2]]), "labels": torch.tensor([3])},
        {"boxes": pile, "labels": torch.arange(12) % 20},
    ]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    losses = model(images, targets)
    assert model.uotmatch_result.gt_index.device == device
    assert all(math.isfinite(float(v.detach())) for v in losses.values()), losses
    index = model.uotmatch_result.gt_index
    assert (index[0] == -1).all() and (index[1] == 0).sum() >= 1 and (index[2] >= 0).sum() >= 1
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_torchvision_retinanet_trains_with_ota(samples):
    model = use_assigner(_retinanet(), OTAAssigner())
    _train(model, samples, steps=2)
    result = model.uotmatch_result
    assert int(result.num_fg.sum()) > 0
    A = sum(9 * s * s for s in (12, 6, 3, 2, 1))  # 9 anchors per location
    assert result.gt_index.shape == (4, A)


@pytest.mark.parametrize("build", [_fcos, _retinanet], ids=["fcos", "retinanet"])
def test_the_model_copies_averages_and_saves(samples, tmp_path, build):
    """deepcopy, an EMA (``AveragedModel``) and ``torch.save`` / ``torch.load`` of the whole
    model keep the assigner's matching (they once recursed without end in FCOS's box coder)."""
    import copy

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    images, targets = samples
    model = use_assigner(build(), OTAAssigner())
    twin = copy.deepcopy(model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    ema.update_parameters(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)  # our own file, just written
    reference = model.train()(images[:2], targets[:2])
    for other in (twin, ema.module, loaded):
        assert isinstance(other, type(model)) and isinstance(other.uotmatch_assigner, OTAAssigner)
        losses = other.train()(images[:2], targets[:2])
        for key, value in reference.items():
            assert float(losses[key]) == pytest.approx(float(value), rel=1e-5), key
        assert int(other.uotmatch_result.num_fg.sum()) > 0
    state = model.state_dict()  # and the weights alone load into a stock model
    stock = build()
    stock.load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="assigner must be a uotmatch.detection DenseAssigner"):
        use_assigner(_fcos(), lambda **kw: None)
    with pytest.raises(ValueError, match="model must be a torchvision.models.detection FCOS"):
        use_assigner(torch.nn.Linear(1, 1), OTAAssigner())
