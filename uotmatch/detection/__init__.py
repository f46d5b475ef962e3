"""Detection assigners and matchers built on :func:`uotmatch.match`.

Dense detectors (one row per anchor point): :class:`OTAAssigner`, :class:`UOTAssigner`,
:class:`SimOTAAssigner`, :class:`FCOSAssigner`, :class:`ATSSAssigner`, all keeping the
:class:`DenseAssigner` contract and returning an :class:`AssignResult`. Set predictors (DETR):
:class:`HungarianMatcher`, :class:`UOTMatcher`, keeping the :class:`SetMatcher` contract. By
name: :func:`build_assigner`, :func:`build_matcher`. Everything is batched over images (ground
truths padded, with a mask) and runs without gradients. The costs are in
:mod:`uotmatch.detection.costs`, the box operations in :mod:`uotmatch.detection.boxes`.
"""

from uotmatch.detection._contracts import (
    PAD_BOX,
    AssignResult,
    DenseAssigner,
    DenseInputs,
    SetMatcher,
    SetTargets,
    pad_targets,
)
from uotmatch.detection._geometry import (
    INSIDE_MARGIN,
    INSIDE_MARGIN_STRICT,
    STRIDES,
    anchor_points,
    feature_sizes,
)
from uotmatch.detection._matchers import (
    MATCHER_TOL,
    GroupedMatcher,
    HungarianMatcher,
    UOTMatcher,
)
from uotmatch.detection._ota import (
    ASSIGNER_TOL,
    CENTER_PRIOR_PENALTY,
    OTAAssigner,
    UOTAssigner,
    decode_plan,
)
from uotmatch.detection._registry import (
    ASSIGNERS,
    MATCHERS,
    build_assigner,
    build_matcher,
    options_of,
)
from uotmatch.detection._rules import (
    SIMOTA_GEOMETRIES,
    ATSSAssigner,
    FCOSAssigner,
    SimOTAAssigner,
)
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
from uotmatch.detection.costs import set_matching_cost

__all__ = [
    "ASSIGNERS",
    "ASSIGNER_TOL",
    "CENTER_PRIOR_PENALTY",
    "INSIDE_MARGIN",
    "INSIDE_MARGIN_STRICT",
    "MATCHERS",
    "MATCHER_TOL",
    "PAD_BOX",
    "STRIDES",
    "SIMOTA_GEOMETRIES",
    "ATSSAssigner",
    "GroupedMatcher",
    "AssignResult",
    "DenseAssigner",
    "DenseInputs",
    "FCOSAssigner",
    "HungarianMatcher",
    "OTAAssigner",
    "SetMatcher",
    "SetTargets",
    "SimOTAAssigner",
    "UOTAssigner",
    "UOTMatcher",
    "aligned_giou",
    "aligned_iou",
    "anchor_points",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "build_assigner",
    "build_matcher",
    "decode_plan",
    "feature_sizes",
    "generalized_box_iou",
    "ltrb_to_boxes",
    "options_of",
    "pad_targets",
    "points_to_ltrb",
    "set_matching_cost",
]
