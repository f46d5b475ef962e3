"""Detection assigners and matchers built on :func:`uotmatch.match`.

Dense detectors (one row per anchor point): :class:`OTAAssigner`, :class:`UOTAssigner`,
:class:`SimOTAAssigner`, :class:`FCOSAssigner`, :class:`ATSSAssigner`, all returning an
:class:`AssignResult`. Set predictors (DETR): :class:`HungarianMatcher`, :class:`UOTMatcher`.
Everything is batched over images (ground truths padded, with a mask) and runs without gradients.
"""

from uotmatch.detection._dense import AssignResult, anchor_points
from uotmatch.detection._matchers import (
    HungarianMatcher,
    UOTMatcher,
    pad_targets,
    set_matching_cost,
)
from uotmatch.detection._ota import CENTER_PRIOR_PENALTY, OTAAssigner, UOTAssigner
from uotmatch.detection._rules import ATSSAssigner, FCOSAssigner, SimOTAAssigner
from uotmatch.detection.boxes import (
    aligned_giou,
    aligned_iou,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    ltrb_to_boxes,
    points_to_ltrb,
)

__all__ = [
    "CENTER_PRIOR_PENALTY",
    "ATSSAssigner",
    "FCOSAssigner",
    "SimOTAAssigner",
    "AssignResult",
    "anchor_points",
    "OTAAssigner",
    "UOTAssigner",
    "HungarianMatcher",
    "UOTMatcher",
    "pad_targets",
    "set_matching_cost",
    "aligned_giou",
    "aligned_iou",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "ltrb_to_boxes",
    "points_to_ltrb",
]
