"""COCO evaluation: the ground truth evaluated as detections gives AP 1.0."""

import json

from detectors.common.evaluation import METRICS, coco_evaluate, format_table
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
