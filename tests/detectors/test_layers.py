"""Backbone (torchvision's, loading its checkpoints), FPN levels, legacy checkpoints."""

import re

import pytest
import torch
import torchvision

from detectors.common.backbone import ResNet, build_resnet, load_backbone_weights
from detectors.fcos.model import FCOS

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


@pytest.mark.parametrize("depth", [18, 50])
def test_load_a_state_dict_saved_from_torchvision(tmp_path, depth):
    """A checkpoint saved from torchvision's own model (regular BatchNorm with
    num_batches_tracked, an fc head) loads, and the backbone then computes torchvision's
    features (its BatchNorm in eval mode is the frozen one)."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    for m in reference.modules():  # non-trivial statistics, so a wrong mapping shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(reference.state_dict(), path)
    model = build_resnet(depth, weights=path).eval().double()
    reference.double()  # float64: the two batch-norm formulas round differently in float32
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        ref = reference.layer2(reference.layer1(ref))
        c5 = reference.layer4(reference.layer3(ref))
        torch.testing.assert_close(model(x)[-1], c5)


def test_load_errors(tmp_path):
    torch.save({"layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth does not fit a ResNet-18: .*size mismatch"):
        load_backbone_weights(ResNet(18), tmp_path / "bad.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth does not fit a ResNet-18: missing \['bn1"):
        load_backbone_weights(ResNet(18), tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_backbone_weights(ResNet(18), tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load .*junk.pth"):
        load_backbone_weights(ResNet(18), tmp_path / "junk.pth")


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
    model = FCOS(3, ResNet(18), channels=32, head_depth=1)
    out = model(torch.randn(1, 3, 128, 160))
    # P3-P7 of a 128 x 160 input: strides 8 to 128, sizes ceil(128 / s) x ceil(160 / s)
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    assert out["points"].shape[0] == sum(h * w for h, w in sizes)
    assert out["strides"].unique().tolist() == [8.0, 16.0, 32.0, 64.0, 128.0]


def test_checkpoints_of_the_previous_fpn_still_load():
    """Checkpoints written before the FPN was torchvision's (keys fpn.lateral.*, fpn.output.*,
    fpn.p6, fpn.p7) load into the same tensors."""
    model = FCOS(3, ResNet(18), channels=32, head_depth=1)
    state = model.state_dict()
    # the previous FPN's layout: lateral.{i}, output.{i}, p6, p7 (weight and bias each)
    renames = [
        (r"^fpn\.inner_blocks\.(\d)\.0\.", r"fpn.lateral.\1."),
        (r"^fpn\.layer_blocks\.(\d)\.0\.", r"fpn.output.\1."),
        (r"^fpn\.extra_blocks\.", "fpn."),
    ]
    legacy = {}
    for key, v in state.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        legacy[key] = v
    assert "fpn.lateral.0.weight" in legacy and "fpn.p7.bias" in legacy
    fresh = FCOS(3, ResNet(18), channels=32, head_depth=1)
    fresh.load_state_dict(legacy)
    for key, v in fresh.state_dict().items():
        torch.testing.assert_close(v, state[key], msg=key)
