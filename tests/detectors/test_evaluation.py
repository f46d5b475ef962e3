"""COCO evaluation: the ground truth evaluated as detections gives AP 1.0."""

import json

import pytest

from detectors.common.evaluation import (
    METRICS,
    coco_detections,
    coco_evaluate,
    coco_stats,
    format_table,
)
from detectors.data import colorboxes


def test_ground_truth_scores_one(tmp_path):
    files = colorboxes.generate(tmp_path, train=0, val=6, size=96, seed=2, progress=False)
    data = json.loads(files["val"].read_text())
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in data["annotations"]
    ]
    m = coco_evaluate(files["val"], dets)
    assert set(m) == set(METRICS)
    assert m["AP"] == 1.0 and m["AP50"] == 1.0 and m["AR100"] == 1.0
    # shifted boxes: lower AP; no detections at all: 0
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 3, *d["bbox"][1:]]} for d in dets]
    assert coco_evaluate(files["val"], shifted)["AP"] < 0.5
    assert coco_evaluate(files["val"], [])["AP"] == 0.0
    table = format_table(m)
    assert "| COCO bbox | AP | AP50 |" in table and "100.0" in table


def test_coco_detections_are_xywh_with_the_datasets_category_ids():
    dets = coco_detections(
        7, [[10.0, 20.0, 40.0, 25.0], [0.0, 0.0, 1.5, 2.0]], [0.9, 0.2], [1, 0], [3, 8]
    )
    assert dets == [
        {"image_id": 7, "category_id": 8, "bbox": [10.0, 20.0, 30.0, 5.0], "score": 0.9},
        {"image_id": 7, "category_id": 3, "bbox": [0.0, 0.0, 1.5, 2.0], "score": 0.2},
    ]
    with pytest.raises(ValueError):  # boxes and scores of different lengths
        coco_detections(7, [[0.0, 0.0, 1.0, 1.0]], [0.9, 0.2], [0], [3])


def test_faster_coco_eval_and_pycocotools_agree(tmp_path):
    """Both backends give the same 12 stats on imperfect detections: jittered boxes, random
    scores, wrong classes and false positives, over images of every size range."""
    import random

    files = colorboxes.generate(tmp_path, train=0, val=12, size=256, seed=3, progress=False)
    data = json.loads(files["val"].read_text())
    rng = random.Random(0)
    cats = [c["id"] for c in data["categories"]]
    dets = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(2):
            jitter = [rng.uniform(-0.2, 0.2) * s for s in (w, h, w, h)]
            box = [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]
            label = a["category_id"] if rng.random() < 0.8 else rng.choice(cats)
            dets.append({**a, "bbox": box, "category_id": label, "score": rng.random()})
    for img in data["images"]:
        for _ in range(3):
            box = [rng.uniform(0, 200), rng.uniform(0, 200), rng.uniform(2, 50), rng.uniform(2, 50)]
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": rng.choice(cats),
                    "bbox": box,
                    "score": rng.random(),
                }
            )
    fast = coco_stats(files["val"], dets, backend="faster_coco_eval")
    slow = coco_stats(files["val"], dets, backend="pycocotools")
    assert len(fast) == len(slow) == 12
    assert 0.05 < fast[0] < 0.95  # a non-trivial AP
    assert fast == pytest.approx(slow, abs=1e-12)
    with pytest.raises(ValueError, match="backend must be one of"):
        coco_stats(files["val"], dets, backend="detectron2")
