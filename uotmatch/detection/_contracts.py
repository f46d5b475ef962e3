"""The contracts of uotmatch.detection, in one place.

What a dense assigner is called with (:class:`DenseInputs`, validated once) and returns
(:class:`AssignResult`), what a set matcher is called with (:class:`SetTargets`,
:func:`pad_targets`) and returns; the two base classes (:class:`DenseAssigner`,
:class:`SetMatcher`) and the result builders the assigners share."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from uotmatch import _checks
from uotmatch._decode import DECODINGS
from uotmatch._result import Matching
from uotmatch.detection.costs import set_matching_cost

__all__ = [
    "PAD_BOX",
    "AssignResult",
    "DenseAssigner",
    "DenseInputs",
    "Pairs",
    "SetMatcher",
    "SetTargets",
    "pad_targets",
]

#: DETR-style pairs: per image ``(pred_idx, gt_idx)``.
Pairs = list[tuple[Tensor, Tensor]]
#: The padding box of :class:`SetTargets` (a valid normalised cxcywh box; never matched).
PAD_BOX = (0.5, 0.5, 1.0, 1.0)
#: The targets' class key: DETR's, then Hugging Face transformers'.
_LABEL_KEYS = ("labels", "class_labels")
#: The outputs' logits key: DETR's, then Hugging Face transformers'.
_LOGIT_KEYS = ("pred_logits", "logits")


# -- dense assigners ----------------------------------------------------------------------------


@dataclass
class AssignResult:
    """Per-anchor training targets of a batch, ``B`` images by ``A`` anchor points.

    Attributes:
        gt_index: ``[B, A]`` int64, the assigned ground truth (index into the padded ``G``), or
            -1 for background.
        labels: ``[B, A]`` int64 class of the assigned ground truth, -1 for background.
        boxes: ``[B, A, 4]`` xyxy box of the assigned ground truth (0 for background).
        ious: ``[B, A]`` IoU between the anchor's predicted box and its assigned ground truth
            (the IoU branch's target; 0 for background).
        num_fg: ``[B]`` int64 foreground anchors per image.
        converged: ``[B]`` bool, the image's transport problem reached the solver's ``tol``
            (always True for the rule-based assigners, which solve none); training logs count
            the images where it did not.
    """

    gt_index: Tensor
    labels: Tensor
    boxes: Tensor
    ious: Tensor
    num_fg: Tensor
    converged: Tensor

    @property
    def fg_mask(self) -> Tensor:
        """``[B, A]`` bool, True on foreground anchors."""
        return self.gt_index >= 0


@dataclass
class DenseInputs:
    """The validated inputs of a dense assigner.

    Points and boxes in float32 (logits keep their dtype), labels int64, the mask bool, all on
    one device."""

    points: Tensor  # [A, 2]
    strides: Tensor  # [A]
    cls_logits: Tensor  # [B, A, K]
    pred_boxes: Tensor  # [B, A, 4] xyxy
    gt_boxes: Tensor  # [B, G, 4] xyxy
    gt_labels: Tensor  # [B, G] int64
    gt_mask: Tensor  # [B, G] bool
    obj_logits: Tensor | None = None  # [B, A, 1], YOLOX's objectness (SimOTA reads it)

    @property
    def empty(self) -> bool:
        """No real ground truth anywhere in the batch."""
        return self.gt_boxes.shape[1] == 0 or not bool(self.gt_mask.any())

    @classmethod
    def check(
        cls, points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask, obj_logits=None
    ):
        """Shapes, dtypes and devices, then the values in one pass (one host sync).

        Finite logits, points, strides and boxes, positive strides, real ground-truth boxes with
        ``x2 >= x1`` and ``y2 >= y1``, labels in ``[0, K)``. Each failure is a ``ValueError``
        naming the input (and, for ground truths, the image and index)."""
        names = ("points", "strides", "cls_logits", "pred_boxes", "gt_boxes", "gt_labels")
        values = (points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels)
        for name, x in zip(names, values, strict=True):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if points.dim() != 2 or points.shape[1] != 2:
            raise ValueError(f"points must be [A, 2] (x, y), got shape {tuple(points.shape)}")
        A = points.shape[0]
        if tuple(strides.shape) != (A,):
            raise ValueError(f"strides must be [A] = [{A}], got shape {tuple(strides.shape)}")
        if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
            raise ValueError(
                f"gt_boxes must be [B, G, 4] (xyxy), got shape {tuple(gt_boxes.shape)}"
            )
        B, G = gt_boxes.shape[:2]
        if tuple(gt_labels.shape) != (B, G):
            raise ValueError(
                f"gt_labels must be [B, G] = [{B}, {G}], got shape {tuple(gt_labels.shape)}"
            )
        if cls_logits.dim() != 3 or tuple(cls_logits.shape[:2]) != (B, A):
            raise ValueError(
                f"cls_logits must be [B, A, K] = [{B}, {A}, K], got {tuple(cls_logits.shape)}"
            )
        if tuple(pred_boxes.shape) != (B, A, 4):
            raise ValueError(
                f"pred_boxes must be [B, A, 4] = [{B}, {A}, 4] (xyxy), got "
                f"{tuple(pred_boxes.shape)}"
            )
        if gt_mask is None:
            # Padding by zeros without a mask would make class-0 ground truths at the origin.
            zero = (gt_boxes == 0).all(-1) if gt_boxes.dim() == 3 else None
            if zero is not None and bool(zero.any()):
                b, g = (int(i) for i in torch.nonzero(zero)[0])
                raise ValueError(
                    f"gt_boxes: image {b}, ground truth {g} is all zeros (padding?) and no "
                    "gt_mask was given: pass gt_mask [B, G] (True on the real ground truths), "
                    "or drop the zero boxes"
                )
            gt_mask = torch.ones(B, G, dtype=torch.bool, device=gt_boxes.device)
        elif not isinstance(gt_mask, Tensor):
            raise ValueError(f"gt_mask must be a torch tensor, got {type(gt_mask).__name__}")
        elif tuple(gt_mask.shape) != (B, G) or gt_mask.dtype != torch.bool:
            raise ValueError(
                f"gt_mask must be bool [B, G] = [{B}, {G}], got {gt_mask.dtype} "
                f"{tuple(gt_mask.shape)}"
            )
        for name, x in zip(names[:5], values[:5], strict=True):
            if not x.is_floating_point():
                raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
        if gt_labels.is_floating_point() or gt_labels.is_complex() or gt_labels.dtype == torch.bool:
            raise ValueError(f"gt_labels must be an integer tensor, got {gt_labels.dtype}")
        device = gt_boxes.device
        for name, x in zip(names, values, strict=True):
            if x.device != device:
                raise ValueError(f"{name} is on {x.device}, gt_boxes on {device}: use one device")
        if gt_mask.device != device:
            raise ValueError(f"gt_mask is on {gt_mask.device}, gt_boxes on {device}")
        if obj_logits is not None:
            shape = tuple(obj_logits.shape) if isinstance(obj_logits, Tensor) else obj_logits
            if not isinstance(obj_logits, Tensor) or shape != (B, A, 1):
                raise ValueError(f"obj_logits must be a [B, A, 1] = [{B}, {A}, 1] tensor: {shape}")
            if not obj_logits.is_floating_point():
                raise ValueError(f"obj_logits must have a floating dtype, got {obj_logits.dtype}")
            if obj_logits.device != device:
                raise ValueError(f"obj_logits is on {obj_logits.device}, gt_boxes on {device}")
        x = cls(
            points.float(),
            strides.float(),
            cls_logits,
            pred_boxes.float(),
            gt_boxes.float(),
            gt_labels.long(),
            gt_mask,
            obj_logits,
        )
        x._check_values()
        return x

    def _check_values(self) -> None:
        K = self.cls_logits.shape[-1]
        real = self.gt_mask
        box = self.gt_boxes
        flags = {}

        def finite(name: str, t: Tensor) -> Tensor:
            if t.numel() == 0:
                return torch.ones((), dtype=torch.bool, device=t.device)
            lo, hi = torch.aminmax(t)  # NaN propagates; one reduction for both bounds
            return (lo > -math.inf) & (hi < math.inf)

        flags["cls_logits"] = finite("cls_logits", self.cls_logits)
        flags["pred_boxes"] = finite("pred_boxes", self.pred_boxes)
        flags["points"] = finite("points", self.points)
        flags["strides"] = (self.strides > 0).all() & finite("strides", self.strides)
        if self.obj_logits is not None:
            flags["obj_logits"] = finite("obj_logits", self.obj_logits)
        good_box = torch.isfinite(box).all(-1) & (box[..., 2] >= box[..., 0])
        good_box &= box[..., 3] >= box[..., 1]
        flags["gt_boxes"] = (good_box | ~real).all()
        flags["gt_labels"] = (((self.gt_labels >= 0) & (self.gt_labels < K)) | ~real).all()
        ok = torch.stack(list(flags.values())).tolist()
        if all(ok):
            return
        name = list(flags)[ok.index(False)]
        if name == "gt_boxes":
            b, g = (int(i) for i in torch.nonzero(~good_box & real)[0])
            raise ValueError(
                f"gt_boxes: image {b}, ground truth {g} is {box[b, g].tolist()}: expected a "
                "finite xyxy box with x2 >= x1 and y2 >= y1"
            )
        if name == "gt_labels":
            bad = ~((self.gt_labels >= 0) & (self.gt_labels < K)) & real
            b, g = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(
                f"gt_labels: image {b}, ground truth {g} has label {int(self.gt_labels[b, g])}: "
                f"expected a class in [0, {K}) (K = cls_logits.shape[-1])"
            )
        if name == "strides":
            raise ValueError("strides must be finite and > 0")
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")


class DenseAssigner:
    """The contract every dense assigner keeps (the one a head calls, whatever the assigner).

    Call it with keyword arguments::

        result = assigner(
            points=points,          # [A, 2] anchor points (x, y), the same for every image
            strides=strides,        # [A] stride of each point's feature level
            cls_logits=cls_logits,  # [B, A, K] classification logits (any float dtype)
            pred_boxes=pred_boxes,  # [B, A, 4] predicted boxes, xyxy
            gt_boxes=gt_boxes,      # [B, G, 4] ground truths, xyxy, padded to G
            gt_labels=gt_labels,    # [B, G] int64 classes in [0, K)
            gt_mask=gt_mask,        # [B, G] bool, True on real ground truths (default: all;
                                    # an all-zero box without gt_mask is refused as padding)
            obj_logits=None,        # [B, A, 1] objectness: SimOTA only (others refuse it)
        )                           # -> AssignResult

    Each assigner reads what it needs (:attr:`uses` lists it) and validates everything it is
    given (``ValueError`` naming the input). An optional input it does not read (``obj_logits
    [B, A, 1]``, YOLOX's objectness, read by :class:`SimOTAAssigner` only) is refused rather
    than ignored. Assignment runs without gradients.
    """

    #: The inputs this assigner's assignment depends on (the others are validated only); an
    #: optional input (:attr:`OPTIONAL`) not listed here is refused.
    uses: ClassVar[tuple[str, ...]] = ()
    #: The inputs of the call that may be left out.
    OPTIONAL: ClassVar[tuple[str, ...]] = ("gt_mask", "obj_logits")

    @torch.no_grad()
    def __call__(
        self,
        *,
        points: Tensor,
        strides: Tensor,
        cls_logits: Tensor,
        pred_boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor | None = None,
        obj_logits: Tensor | None = None,
    ) -> AssignResult:
        """The assignment of the batch (the class docstring has the inputs)."""
        if obj_logits is not None and "obj_logits" not in self.uses:
            raise ValueError(
                f"obj_logits: {type(self).__name__} does not read it (it uses "
                f"{', '.join(self.uses)}); only SimOTAAssigner scores with objectness"
            )
        x = DenseInputs.check(
            points, strides, cls_logits, pred_boxes, gt_boxes, gt_labels, gt_mask, obj_logits
        )
        if x.empty:
            return background_result(x)
        return self._assign(x)

    def _assign(self, x: DenseInputs) -> AssignResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


def scatter_rows(sub: Tensor, idx: Tensor, A: int, fill) -> Tensor:
    """``[B, L]`` values at ``idx`` into a ``[B, A]`` tensor filled with ``fill`` elsewhere."""
    out = torch.full((sub.shape[0], A), fill, dtype=sub.dtype, device=sub.device)
    return out.scatter_(1, idx, sub)


def result_from_rows(
    sub_index: Tensor,
    idx: Tensor,
    A: int,
    ious: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    converged: Tensor | None = None,
) -> AssignResult:
    """:func:`result_from_index` for an assignment made on a subset of the anchors.

    ``sub_index [B, L]`` (-1 = background) of the rows ``idx [B, L]`` of ``A``, with their
    pairwise ``ious [B, L, G]``; the anchors left out are background."""
    sub_iou = ious.gather(2, sub_index.clamp_min(0)[..., None]).squeeze(-1) * (sub_index >= 0)
    return result_from_index(
        scatter_rows(sub_index, idx, A, -1),
        gt_labels,
        gt_boxes,
        anchor_ious=scatter_rows(sub_iou, idx, A, 0.0),
        converged=converged,
    )


def background_result(x: DenseInputs) -> AssignResult:
    """Every anchor of every image to background."""
    B, A = x.cls_logits.shape[:2]
    empty = torch.full((B, A), -1, dtype=torch.long, device=x.gt_boxes.device)
    return result_from_index(empty, x.gt_labels, x.gt_boxes)


def result_from_index(
    gt_index: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    ious: Tensor | None = None,
    anchor_ious: Tensor | None = None,
    converged: Tensor | None = None,
) -> AssignResult:
    """Gather the per-anchor targets of ``gt_index [B, A]`` (-1 = background).

    The IoU target comes from pairwise ``ious [B, A, G]``, or given per anchor as ``anchor_ious [B,
    A]``; ``converged [B]`` (default: all True)."""
    fg = gt_index >= 0
    if converged is None:
        converged = torch.ones(gt_index.shape[0], dtype=torch.bool, device=gt_index.device)
    if gt_boxes.shape[1] == 0:  # no ground truth in the whole batch: all background
        B, A = gt_index.shape
        zeros = torch.zeros(B, A, dtype=gt_boxes.dtype, device=gt_boxes.device)
        return AssignResult(
            gt_index,
            gt_index.clone(),
            zeros[..., None].expand(B, A, 4).clone(),
            zeros,
            fg.sum(1),
            converged,
        )
    idx = gt_index.clamp_min(0)
    labels = torch.where(fg, gt_labels.gather(1, idx), -1)
    boxes = gt_boxes.gather(1, idx[..., None].expand(-1, -1, 4)) * fg[..., None]
    if anchor_ious is not None:
        iou = anchor_ious * fg
    elif ious is None or ious.shape[-1] == 0:
        iou = torch.zeros(gt_index.shape, dtype=gt_boxes.dtype, device=gt_boxes.device)
    else:
        iou = ious.gather(2, idx[..., None]).squeeze(-1) * fg
    return AssignResult(gt_index, labels, boxes, iou, fg.sum(1), converged)


# -- set matchers -------------------------------------------------------------------------------


@dataclass
class SetTargets:
    """DETR targets padded once per batch.

    ``labels [B, G]`` int64, ``boxes [B, G, 4]`` (normalised cxcywh, as DETR), ``gt_mask [B, G]``
    bool (True on real targets, anywhere).

    The matchers and the bundled criterion take these directly; a DETR list of dicts is
    converted with :meth:`from_list` (what the matchers do when given one).
    """

    labels: Tensor
    boxes: Tensor
    gt_mask: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def from_list(
        cls, targets: Sequence[Mapping[str, Tensor]], device: torch.device | str | None = None
    ) -> SetTargets:
        """DETR's ``[{"labels": [n_i], "boxes": [n_i, 4]}, ...]`` padded to ``G = max n_i``.

        By :func:`pad_targets`, with :data:`PAD_BOX`; Hugging Face's ``"class_labels"`` is read
        as ``"labels"``."""
        boxes, labels, gt_mask = pad_targets(targets, device, pad_box=PAD_BOX)
        return cls(labels, boxes, gt_mask)

    @classmethod
    def coerce(cls, targets, device) -> SetTargets:
        """``targets`` as :class:`SetTargets` on ``device`` (a list of dicts is padded)."""
        if isinstance(targets, SetTargets):
            return targets
        return cls.from_list(targets, device)


def pad_targets(
    targets: Sequence[Mapping[str, Tensor]],
    device: torch.device | str | None = None,
    *,
    pad_box: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image targets padded into batch tensors.

    ``(gt_boxes [B, G, 4], gt_labels [B, G] int64, gt_mask [B, G] bool)``, ``G = max n_i``, each
    image's targets first and in order.

    The one padder of the project: the set matchers (:meth:`SetTargets.from_list`, padding with
    :data:`PAD_BOX`), the torchvision adapter and the bundled detectors' collate use it.

    Args:
        targets: ``[{"labels": [n_i], "boxes": [n_i, 4]}, ...]`` (torchvision's and DETR's
            form; Hugging Face's ``"class_labels"`` is read as ``"labels"``), boxes in any
            format (they are copied as they are).
        device: where the tensors are made (default torch's).
        pad_box: the box written in the padding (zeros by default; the padded ground truths
            are marked False in ``gt_mask`` whatever it is).
    """
    if not isinstance(targets, Sequence) or isinstance(targets, str | bytes):
        raise ValueError(f"targets must be a list of dicts, got {type(targets).__name__}")
    sizes, labels_of, boxes_of = [], [], []
    for i, t in enumerate(targets):
        key = next((k for k in _LABEL_KEYS if isinstance(t, Mapping) and k in t), None)
        if key is None or "boxes" not in t:
            raise ValueError(
                f"targets[{i}] must be a dict with 'labels' (or Hugging Face's "
                "'class_labels') and 'boxes'"
            )
        labels, boxes = t[key], t["boxes"]
        if not isinstance(labels, Tensor) or not isinstance(boxes, Tensor):
            raise ValueError(f"targets[{i}]['{key}'] and ['boxes'] must be torch tensors")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"targets[{i}]['{key}'] must hold integer class indices, got {labels.dtype}"
            )
        n = len(labels)
        if tuple(boxes.shape) != (n, 4):
            raise ValueError(
                f"targets[{i}]['boxes'] must be [{n}, 4] to match its {n} labels, "
                f"got {tuple(boxes.shape)}"
            )
        sizes.append(n)
        labels_of.append(labels)
        boxes_of.append(boxes)
    B, G = len(targets), max(sizes, default=0)
    dtype = next((b.dtype for b in boxes_of if b.is_floating_point()), None)
    gt_boxes = torch.tensor(pad_box, dtype=dtype, device=device).repeat(B, G, 1)
    gt_labels = torch.zeros(B, G, dtype=torch.long, device=device)
    gt_mask = torch.arange(G, device=device) < torch.tensor(sizes, device=device)[:, None]
    if G:  # every image's targets at once, row-major into the mask's first n_i places
        gt_labels[gt_mask] = torch.cat([x.to(device=device, dtype=torch.long) for x in labels_of])
        gt_boxes[gt_mask] = torch.cat([x.to(device=device, dtype=gt_boxes.dtype) for x in boxes_of])
    return gt_boxes, gt_labels, gt_mask


def logits_key(outputs) -> str | None:
    """The key of ``outputs``' class logits, or None.

    DETR's ``"pred_logits"``, then Hugging Face's ``"logits"``."""
    return next((k for k in _LOGIT_KEYS if isinstance(outputs, Mapping) and k in outputs), None)


def _check_outputs(outputs: Mapping[str, Tensor], targets: SetTargets, focal: bool):
    key = logits_key(outputs)
    if key is None or "pred_boxes" not in outputs:
        raise ValueError(
            "outputs must be a dict with 'pred_logits' (or Hugging Face's 'logits') and "
            "'pred_boxes'"
        )
    logits, boxes = outputs[key], outputs["pred_boxes"]
    if not isinstance(logits, Tensor) or not isinstance(boxes, Tensor):
        raise ValueError(f"outputs['{key}'] and outputs['pred_boxes'] must be tensors")
    if logits.dim() != 3 or boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(
            f"outputs['{key}'] must be [B, Q, K] and outputs['pred_boxes'] [B, Q, 4], got "
            f"{tuple(logits.shape)} and {tuple(boxes.shape)}"
        )
    if logits.shape[:2] != boxes.shape[:2] or logits.shape[0] != len(targets):
        raise ValueError(
            f"batch and query sizes must agree: {key} {tuple(logits.shape[:2])}, "
            f"pred_boxes {tuple(boxes.shape[:2])}, {len(targets)} targets"
        )
    # Labels index the class logits: [0, K) with focal, [0, K - 1) with softmax (no-object last).
    K = logits.shape[-1] - (0 if focal else 1)
    real = targets.gt_mask
    bad_label = ((targets.labels < 0) | (targets.labels >= K)) & real
    wh = targets.boxes[..., 2:]
    bad_box = ~(torch.isfinite(targets.boxes).all(-1) & (wh >= 0).all(-1)) & real
    ok = torch.stack(
        [
            torch.isfinite(logits).all(),
            torch.isfinite(boxes).all(),
            ~bad_box.any(),
            ~bad_label.any(),
        ]
    ).tolist()
    if not ok[0]:
        raise ValueError(f"outputs['{key}'] must be finite (it holds NaN or inf)")
    if not ok[1]:
        raise ValueError("outputs['pred_boxes'] must be finite (it holds NaN or inf)")
    if not ok[2]:
        b, g = (int(i) for i in torch.nonzero(bad_box)[0])
        raise ValueError(
            f"targets[{b}]['boxes'][{g}] = {targets.boxes[b, g].tolist()}: expected a finite "
            "normalised (cx, cy, w, h) box with w >= 0 and h >= 0"
        )
    if not ok[3]:
        b, g = (int(i) for i in torch.nonzero(bad_label)[0])
        what = "focal: K sigmoid logits" if focal else "softmax: K + 1 logits, no-object last"
        raise ValueError(
            f"targets[{b}]['labels'][{g}] = {int(targets.labels[b, g])} is not a class of "
            f"{key} ([0, {K}) for {what})"
        )
    return logits, boxes


class SetMatcher(nn.Module):
    """The contract of the set matchers (DETR's).

    ``matcher(outputs, targets)`` returns per image a pair ``(pred_idx, gt_idx)`` of int64 CPU
    tensors sorted by prediction, and ``matcher.solve(outputs, targets)`` the
    :class:`~uotmatch.Matching` they come from (its plan ``[B, Q, G (+1)]``; the last column,
    when there is one, is the background). The pairs are the plan decoded by ``decode``
    (:meth:`uotmatch.Matching.pairs`).

    ``outputs``: ``{"pred_logits": [B, Q, K(+1)], "pred_boxes": [B, Q, 4]}`` (normalised
    cxcywh; Hugging Face's ``"logits"`` is read as ``"pred_logits"``); ``targets``: DETR's list
    of dicts (``"labels"`` or Hugging Face's ``"class_labels"``, and ``"boxes"``), or
    :class:`SetTargets`.
    """

    def __init__(
        self,
        *,
        cost_class: float,
        cost_bbox: float,
        cost_giou: float,
        focal: bool,
        focal_alpha: float,
        focal_gamma: float,
        focal_eps: float,
        decode: str,
    ):
        super().__init__()
        self.cost_class = _checks.real("cost_class", cost_class, low=0.0)
        self.cost_bbox = _checks.real("cost_bbox", cost_bbox, low=0.0)
        self.cost_giou = _checks.real("cost_giou", cost_giou, low=0.0)
        if self.cost_class == 0 and self.cost_bbox == 0 and self.cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou cannot all be 0")
        self.focal = _checks.boolean("focal", focal)
        self.focal_alpha = _checks.real("focal_alpha", focal_alpha, low=0.0, high=1.0)
        self.focal_gamma = _checks.real("focal_gamma", focal_gamma, low=0.0)
        self.focal_eps = _checks.real("focal_eps", focal_eps, low=0.0)
        self.decode = _checks.choice("decode", decode, DECODINGS)

    def cost(self, outputs, targets) -> tuple[Tensor, SetTargets]:
        """The batched matching cost ``[B, Q, G]`` and the padded targets."""
        key = logits_key(outputs)
        logits = outputs[key] if key else None
        device = logits.device if isinstance(logits, Tensor) else None
        targets = SetTargets.coerce(targets, device)
        logits, boxes = _check_outputs(outputs, targets, self.focal)
        C = set_matching_cost(
            logits,
            boxes,
            targets.labels,
            targets.boxes,
            self.cost_class,
            self.cost_bbox,
            self.cost_giou,
            self.focal,
            self.focal_alpha,
            self.focal_gamma,
            self.focal_eps,
        )
        return C, targets

    @torch.no_grad()
    def solve(self, outputs, targets) -> Matching:
        raise NotImplementedError

    def forward(self, outputs, targets) -> Pairs:
        return cast(Pairs, self.solve(outputs, targets).pairs(self.decode))  # torch in: tensors
