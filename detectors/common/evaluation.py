"""COCO evaluation: AP, AP50, AP75, APs/m/l, AR100.

faster-coco-eval (``COCOeval_faster``, the same numbers several times faster) when it is
importable, pycocotools' ``COCOeval`` otherwise; both return the same 12 ``stats``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

__all__ = [
    "BACKENDS",
    "METRICS",
    "coco_detections",
    "coco_evaluate",
    "coco_stats",
    "format_table",
    "per_image_ap",
]

#: Names of the reported entries of ``COCOeval.stats`` (bbox), in order of their index.
METRICS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


#: The evaluation libraries, in order of preference.
BACKENDS = ("faster_coco_eval", "pycocotools")


def _coco_classes(backend: str | None):
    """``(COCO, COCOeval)`` of ``backend``, or of the first importable one when None."""
    for name in BACKENDS if backend is None else (backend,):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
        try:
            if name == "faster_coco_eval":
                from faster_coco_eval import COCO, COCOeval_faster

                return COCO, COCOeval_faster
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            return COCO, COCOeval
        except ImportError:
            if backend is not None:
                raise
    raise ImportError(
        "COCO evaluation needs faster-coco-eval or pycocotools: pip install faster-coco-eval"
    )


def coco_detections(
    image_id: int, boxes: list, scores: list, labels: list, cat_ids: list[int]
) -> list[dict]:
    """One image's detections in COCO's result format: ``boxes`` as xyxy lists (pixels of the
    original image), ``labels`` contiguous class indices mapped through ``cat_ids``."""
    return [
        {
            "image_id": image_id,
            "category_id": cat_ids[label],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": score,
        }
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True)
    ]


def coco_stats(
    ann_file: str | Path,
    detections: list[dict],
    image_ids: list[int] | None = None,
    backend: str | None = None,
) -> list[float]:
    """The 12 ``COCOeval.stats`` (bbox) of COCO-format detections (``image_id``,
    ``category_id``, ``bbox`` as xywh, ``score``) against an annotation file; all 0 without
    detections. ``backend``: one of :data:`BACKENDS`, or None for the first importable."""
    COCO, COCOeval = _coco_classes(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ids = sorted(gt.getImgIds()) if image_ids is None else list(image_ids)
        if not detections:
            return [0.0] * 12
        dt = gt.loadRes(json.loads(json.dumps(detections)))  # plain Python numbers
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats[:12]]


def coco_evaluate(
    ann_file: str | Path,
    detections: list[dict],
    image_ids: list[int] | None = None,
    backend: str | None = None,
) -> dict[str, float]:
    """:func:`coco_stats` as ``METRICS``, floats in [0, 1] (-1 where a size range has no
    ground truth, as COCOeval)."""
    stats = coco_stats(ann_file, detections, image_ids, backend)
    return {name: stats[i] for name, i in METRICS.items()}


def per_image_ap(
    ann_file: str | Path,
    detections: list[dict],
    image_ids: list[int] | None = None,
    backend: str | None = None,
) -> dict[int, float]:
    """COCO AP (IoU 0.5:0.95) of each image on its own, ``{image_id: AP}``: the unit of a
    paired bootstrap over images. Images without ground truth are left out (COCO's -1)."""
    COCO, COCOeval = _coco_classes(backend)
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ids = sorted(gt.getImgIds()) if image_ids is None else list(image_ids)
        dt = gt.loadRes(json.loads(json.dumps(detections))) if detections else None
        for i in ids:
            if not gt.getAnnIds(imgIds=[i]):
                continue
            if dt is None:
                out[i] = 0.0
                continue
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = [i]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[i] = max(float(ev.stats[0]), 0.0)
    return out


def format_table(metrics: dict[str, float], title: str = "COCO bbox") -> str:
    """A markdown table of the metrics, in percent."""
    head = "| " + title + " | " + " | ".join(metrics) + " |"
    rule = "|---" * (len(metrics) + 1) + "|"
    row = (
        "| | " + " | ".join(f"{100 * v:.1f}" if v >= 0 else "n/a" for v in metrics.values()) + " |"
    )
    return "\n".join([head, rule, row])
