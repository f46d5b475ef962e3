"""COCO-format data: loading, transforms, collate, and every bad input's error."""

import json
import warnings

import pytest
import torch

from detectors.common.data import (
    CocoDetection,
    RandomHorizontalFlip,
    ResizeShortSide,
    collate,
    default_transforms,
)
from detectors.data import colorboxes


@pytest.fixture(scope="module")
def boxes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    colorboxes.generate(root, train=4, val=2, size=64, seed=1, progress=False)
    return root


def _dataset(root, data=None, name="instances_train.json", **kw):
    ann = root / "annotations" / name
    if data is not None:
        ann = root / "annotations" / "edited.json"
        ann.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return CocoDetection(root, ann, **kw)


def _data(root):
    return json.loads((root / "annotations" / "instances_train.json").read_text())


def test_loads_colorboxes(boxes_dir):
    ds = _dataset(boxes_dir)
    assert len(ds) == 4 and ds.num_classes == 20 and ds.class_names[0] == "red"
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and 0 <= float(image.min()) and float(image.max()) <= 1
    raw = [a for a in _data(boxes_dir)["annotations"] if a["image_id"] == target["image_id"]]
    assert len(target["boxes"]) == len(raw)
    if raw:
        x, y, w, h = raw[0]["bbox"]
        torch.testing.assert_close(target["boxes"][0], torch.tensor([x, y, x + w, y + h]).float())
        assert int(target["labels"][0]) == raw[0]["category_id"] - 1


def test_transforms_and_collate(boxes_dir):
    ds = _dataset(boxes_dir, transforms=default_transforms(True, short=96, max_size=120))
    image, target = ds[1]
    assert image.shape == (3, 96, 96) and target["size"] == (96, 96)
    r_img, r_t = ResizeShortSide(32, 40)(
        torch.zeros(3, 50, 100), {"boxes": torch.tensor([[10.0, 10, 20, 20]])}
    )
    assert r_img.shape == (3, 20, 40)  # long side capped at 40
    torch.testing.assert_close(r_t["boxes"], torch.tensor([[4.0, 4, 8, 8]]))
    f_img, f_t = RandomHorizontalFlip(p=1.0)(
        torch.arange(4.0).view(1, 1, 4), {"boxes": torch.tensor([[0.0, 0, 1, 1]])}
    )
    assert f_img.flatten().tolist() == [3, 2, 1, 0]
    torch.testing.assert_close(f_t["boxes"], torch.tensor([[3.0, 0, 4, 1]]))
    batch = collate([ds[0], ds[1]])
    assert batch["images"].shape[-2:] == (96, 96)
    G = max(len(t["labels"]) for t in batch["targets"])
    assert batch["gt_boxes"].shape == (2, G, 4) and batch["gt_mask"].sum() == sum(
        len(t["labels"]) for t in batch["targets"]
    )


def test_empty_annotations_are_background(boxes_dir):
    data = _data(boxes_dir)
    data["annotations"] = []
    ds = _dataset(boxes_dir, data)
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert collate([ds[0], ds[1]])["gt_boxes"].shape == (2, 0, 4)


def test_bad_inputs(boxes_dir, tmp_path):
    data = _data(boxes_dir)
    ann_id = data["annotations"][0]["id"]
    cases = {
        "missing image": (
            lambda d: d["images"][0].update(file_name="train/nope.png"),
            r"1 image file\(s\) missing .*nope.png",
        ),
        "unknown category": (
            lambda d: d["annotations"][0].update(category_id=99),
            f"annotation {ann_id} has unknown category_id 99",
        ),
        "outside": (
            lambda d: d["annotations"][0].update(bbox=[50, 50, 30, 30]),
            f"annotation {ann_id}: box \\[50, 50, 30, 30\\] lies outside image",
        ),
        "malformed bbox": (
            lambda d: d["annotations"][0].update(bbox=[1, 2, 3]),
            f"annotation {ann_id} has a malformed bbox",
        ),
        "unknown image": (
            lambda d: d["annotations"][0].update(image_id=12345),
            "refers to unknown image_id 12345",
        ),
        "no id": (lambda d: d["annotations"][0].pop("id"), "annotation has no 'id'"),
    }
    for edit, message in cases.values():
        d = json.loads(json.dumps(data))
        edit(d)
        with pytest.raises(ValueError, match=message):
            _dataset(boxes_dir, d)
    with pytest.raises(ValueError, match="edited.json is not valid JSON"):
        _dataset(boxes_dir, "{not json")
    with pytest.raises(ValueError, match="cannot read annotation file .*absent.json"):
        CocoDetection(boxes_dir, tmp_path / "absent.json")
    (boxes_dir / "train" / "broken.png").write_bytes(b"not a png")
    d = json.loads(json.dumps(data))
    d["images"][0]["file_name"] = "train/broken.png"
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        _dataset(boxes_dir, d)[0]


def test_degenerate_boxes_warn_once_with_a_count(boxes_dir):
    data = _data(boxes_dir)
    for ann in data["annotations"][:3]:
        ann["bbox"][2] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = _dataset(boxes_dir, data)
    messages = [str(w.message) for w in caught if "degenerate" in str(w.message)]
    path = boxes_dir / "annotations" / "edited.json"
    assert messages == [f"{path}: skipped 3 degenerate box(es) (zero width or height)"]
    assert sum(len(b) for b in ds.boxes.values()) == len(data["annotations"]) - 3
