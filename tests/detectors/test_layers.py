"""Backbone (torchvision layout, loading), FPN shapes, NMS against a brute-force reference."""

import pytest
import torch

from detectors.common.backbone import ResNet, build_resnet, load_backbone_weights
from detectors.common.fpn import FPN, batched_nms
from uotmatch.detection import box_iou

# torchvision resnet18's first and last keys and shapes (from its state_dict)
TORCHVISION_R18 = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.weight": (128,),
    "layer4.1.bn2.bias": (512,),
}
TORCHVISION_R50 = {
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer4.2.bn3.running_mean": (2048,),
    "layer3.5.conv2.weight": (256, 256, 3, 3),
}


@pytest.mark.parametrize("depth,keys", [(18, TORCHVISION_R18), (50, TORCHVISION_R50)])
def test_torchvision_state_dict_layout(depth, keys):
    state = ResNet(depth).state_dict()
    for k, shape in keys.items():
        assert tuple(state[k].shape) == shape, k
    assert not any(k.startswith("fc.") for k in state)


def test_load_torchvision_checkpoint(tmp_path):
    """A torchvision-style checkpoint (regular BN with num_batches_tracked, an fc head) loads."""
    src = ResNet(18)
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()
    }
    for k in list(state):
        if k.endswith("running_var"):
            state[k] = state[k].abs() + 0.5
            state[k.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_resnet(18, weights=path)
    torch.testing.assert_close(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    torch.save({"layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth does not fit a ResNet-18: .*size mismatch"):
        load_backbone_weights(ResNet(18), tmp_path / "bad.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth does not fit a ResNet-18: missing \['bn1"):
        load_backbone_weights(ResNet(18), tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone_weights(ResNet(18), tmp_path / "nope.pth")


def test_frozen_stages_and_outputs():
    model = ResNet(18, freeze_at=2)
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert model.layer2[0].conv1.weight.requires_grad
    c3, c4, c5 = model(torch.randn(2, 3, 64, 96))
    assert c3.shape == (2, 128, 8, 12) and c4.shape == (2, 256, 4, 6) and c5.shape == (2, 512, 2, 3)
    # frozen BN is the affine map of its statistics
    bn = model.bn1
    bn.running_mean.fill_(1.0), bn.running_var.fill_(4.0), bn.weight.fill_(2.0), bn.bias.fill_(3.0)
    x = torch.randn(1, 64, 2, 2)
    torch.testing.assert_close(bn(x), (x - 1) / (4 + 1e-5) ** 0.5 * 2 + 3)
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(19)


def test_fpn_levels():
    feats = ResNet(18)(torch.randn(1, 3, 128, 160))
    outs = FPN((128, 256, 512), channels=32)(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert all(o.shape[1] == 32 for o in outs)


def _brute_force_nms(boxes, scores, classes, thr):
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(
            not (classes[i] == classes[j] and box_iou(boxes[i : i + 1], boxes[j : j + 1]) > thr)
            for j in keep
        ):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_nms_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g) * 30 + 2], 1)
    scores = torch.rand(60, generator=g)
    classes = torch.randint(3, (60,), generator=g)
    for thr in (0.3, 0.6):
        assert batched_nms(boxes, scores, classes, thr).tolist() == _brute_force_nms(
            boxes, scores, classes, thr
        )
    assert batched_nms(boxes[:0], scores[:0], classes[:0], 0.5).numel() == 0
