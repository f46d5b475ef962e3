"""COCO evaluation with pycocotools' ``COCOeval``: AP, AP50, AP75, APs/m/l, AR100."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

__all__ = ["METRICS", "coco_evaluate", "format_table"]

#: Names of the reported entries of ``COCOeval.stats`` (bbox), in order of their index.
METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def coco_evaluate(
    ann_file: str | Path, detections: list[dict], image_ids: list[int] | None = None
) -> dict[str, float]:
    """Evaluate COCO-format detections (``image_id``, ``category_id``, ``bbox`` as xywh,
    ``score``) against an annotation file; returns ``METRICS`` as floats in [0, 1] (-1 where a
    size range has no ground truth, as COCOeval)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ids = sorted(gt.getImgIds()) if image_ids is None else list(image_ids)
        if not detections:
            return dict.fromkeys(METRICS, 0.0)
        dt = gt.loadRes(json.loads(json.dumps(detections)))  # plain Python numbers
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(ev.stats[i]) for name, i in METRICS.items()}


def format_table(metrics: dict[str, float], title: str = "COCO bbox") -> str:
    """A markdown table of the metrics, in percent."""
    head = "| " + title + " | " + " | ".join(metrics) + " |"
    rule = "|---" * (len(metrics) + 1) + "|"
    row = (
        "| | " + " | ".join(f"{100 * v:.1f}" if v >= 0 else "n/a" for v in metrics.values()) + " |"
    )
    return "\n".join([head, rule, row])
