"""The Color Boxes generator: deterministic, valid COCO, the stated statistics."""

import hashlib
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from detectors.data import colorboxes
from uotmatch.detection import box_iou


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_and_valid_coco(tmp_path):
    a = colorboxes.generate(tmp_path / "a", train=6, val=3, size=64, seed=3, progress=False)
    colorboxes.generate(tmp_path / "b", train=6, val=3, size=64, seed=3, progress=False)
    colorboxes.generate(tmp_path / "c", train=6, val=3, size=64, seed=4, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    coco = COCO(str(a["train"]))
    assert len(coco.getImgIds()) == 6 and len(coco.getCatIds()) == 20
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w >= 6 and h >= 6
        assert ann["area"] == w * h and 1 <= ann["category_id"] <= 20
    img = coco.loadImgs(1)[0]
    assert (tmp_path / "a" / img["file_name"]).exists() and img["width"] == 64


def test_box_counts_and_visibility():
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(60):
        img, boxes = colorboxes.render_image(rng, 96, crowded=False)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        counts.append(len(boxes))
        for x, y, w, h, label in boxes:  # each annotated box shows its colour somewhere
            rgb = np.array(colorboxes.COLORS[label][1])
            patch = img[y : y + h, x : x + w].astype(int)
            assert (np.abs(patch - rgb).max(-1) <= colorboxes.COLOR_JITTER).any()
    assert 0 <= min(counts) and max(counts) <= 30 and np.mean(counts) > 5
    crowded = [colorboxes.render_image(rng, 128, crowded=True)[1] for _ in range(20)]
    assert np.mean([len(b) for b in crowded]) > np.mean(counts)

    def overlapping(boxes):  # fraction of boxes overlapping another one (IoU > 0.1)
        t = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in boxes], dtype=torch.float)
        iou = box_iou(t, t).fill_diagonal_(0)
        return float((iou > 0.1).any(1).float().mean())

    normal = [colorboxes.render_image(rng, 128, crowded=False)[1] for _ in range(20)]
    dense = np.mean([overlapping(b) for b in crowded if len(b) > 1])
    sparse = np.mean([overlapping(b) for b in normal if len(b) > 1])
    assert dense > 0.7 and dense > sparse + 0.2


def test_cli(tmp_path, capsys):
    colorboxes.main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "48"])
    data = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert len(data["images"]) == 1
    with pytest.raises(SystemExit):
        colorboxes.main(["--out", str(tmp_path), "--train", "-1"])
    assert "--train must be >= 0" in capsys.readouterr().err


def test_max_boxes(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for crowded in (False, True):
        counts = [len(colorboxes.render_image(rng, 96, crowded, max_boxes=5)[1]) for _ in range(30)]
        assert max(counts) <= 5 and np.mean(counts) > 1
    files = colorboxes.generate(tmp_path, train=3, val=0, size=64, progress=False, max_boxes=2)
    data = json.loads(files["train"].read_text())
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=4)
    assert per_image.max() <= 2 and data["info"]["max_boxes"] == 2
    with pytest.raises(SystemExit):
        colorboxes.main(["--out", str(tmp_path), "--max-boxes", "0"])
    assert "--max-boxes must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_boxes must be an integer >= 1"):
        colorboxes.generate(tmp_path, train=1, val=0, max_boxes=0)
