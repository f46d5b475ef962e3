"""COCO-format detection data: dataset, transforms, padding collate, distributed sampling.

Annotation files are validated once, when the dataset is built: every error names the file and,
where there is one, the annotation id. Degenerate boxes (zero width or height) are skipped with
a single warning that counts them; an image without annotations is plain background.

The transforms are our own three small ones (resize by the short side with a cap on the long
side, horizontal flip, normalise) rather than ``torchvision.transforms.v2``: each is a few lines
on a tensor and a plain target dict, and the v2 pipeline would add a ``tv_tensors`` wrapping
and unwrapping step to every sample without removing any code or any of the validation above.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from uotmatch.detection import pad_targets

__all__ = [
    "Batch",
    "CocoDetection",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "ResizeShortSide",
    "collate",
    "default_transforms",
    "images_only",
]

#: ImageNet statistics (torchvision's), for backbones trained on it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Boxes may overhang the image by this many pixels (rounding in converters) before it is an error.
BOX_TOLERANCE = 1.0


class CocoDetection(Dataset):
    """A COCO-format dataset: ``(image [3, H, W] float, target)`` pairs.

    The target holds ``boxes [n, 4]`` (xyxy pixels of the transformed image), ``labels [n]``
    (contiguous ``0..K-1`` in the order of sorted category ids), ``image_id``, ``orig_size``
    and ``size`` (``(h, w)``).

    Args:
        root: directory the images' ``file_name`` are relative to.
        ann_file: the ``instances_*.json``.
        transforms: callable ``(image, target) -> (image, target)``.
        check_images: open every image's header now (cheap: nothing is decoded), so that an
            unreadable file is an error naming it before training, not in the middle of an
            epoch (a file damaged past its header is still found when read, and named then).
    """

    def __init__(
        self,
        root: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        check_images: bool = False,
    ):
        self.root, self.ann_file = Path(root), Path(ann_file)
        self.transforms = transforms
        data = _load_json(self.ann_file)
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{self.ann_file}: expected a list under '{key}'")
        cat_ids = sorted(_field(c, "id", self.ann_file, "category") for c in data["categories"])
        if not cat_ids:
            raise ValueError(f"{self.ann_file}: no categories")
        self.cat_ids = cat_ids
        self.label_of = {c: i for i, c in enumerate(cat_ids)}
        self.class_names = [None] * len(cat_ids)
        for c in data["categories"]:
            self.class_names[self.label_of[c["id"]]] = c.get("name", str(c["id"]))
        self.images = {}
        for img in data["images"]:
            image_id = _field(img, "id", self.ann_file, "image")
            for key in ("file_name", "width", "height"):
                _field(img, key, self.ann_file, f"image {image_id}")
            self.images[image_id] = img
        missing = [
            img["file_name"]
            for img in self.images.values()
            if not (self.root / img["file_name"]).is_file()
        ]
        if missing:
            raise ValueError(
                f"{self.ann_file}: {len(missing)} image file(s) missing under {self.root}, "
                f"first: {self.root / missing[0]}"
            )
        if check_images:
            self._check_images()
        self.boxes = {i: [] for i in self.images}
        degenerate = 0
        for ann in data["annotations"]:
            ann_id = _field(ann, "id", self.ann_file, "annotation")
            where = f"{self.ann_file}: annotation {ann_id}"
            image_id = _field(ann, "image_id", self.ann_file, f"annotation {ann_id}")
            if image_id not in self.images:
                raise ValueError(f"{where} refers to unknown image_id {image_id}")
            category = _field(ann, "category_id", self.ann_file, f"annotation {ann_id}")
            if category not in self.label_of:
                raise ValueError(
                    f"{where} has unknown category_id {category} "
                    f"(known: {cat_ids[:10]}{'...' if len(cat_ids) > 10 else ''})"
                )
            bbox = ann.get("bbox")
            if (
                not isinstance(bbox, list)
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
            ):
                raise ValueError(f"{where} has a malformed bbox {bbox!r} (expected [x, y, w, h])")
            x, y, w, h = bbox
            if w <= 0 or h <= 0:
                degenerate += 1
                continue
            img = self.images[image_id]
            if (
                x < -BOX_TOLERANCE
                or y < -BOX_TOLERANCE
                or x + w > img["width"] + BOX_TOLERANCE
                or y + h > img["height"] + BOX_TOLERANCE
            ):
                raise ValueError(
                    f"{where}: box {bbox} lies outside image {image_id} "
                    f"({img['width']} x {img['height']}, {img['file_name']})"
                )
            if ann.get("iscrowd", 0):
                continue  # crowd regions are neither positives nor errors (COCO convention)
            self.boxes[image_id].append((x, y, x + w, y + h, self.label_of[category]))
        if degenerate:
            warnings.warn(
                f"{self.ann_file}: skipped {degenerate} degenerate box(es) (zero width or height)",
                stacklevel=2,
            )
        self.ids = sorted(self.images)

    def _check_images(self) -> None:
        from PIL import Image

        for image_id, img in self.images.items():
            path = self.root / img["file_name"]
            try:
                with Image.open(path) as im:
                    size = im.size
            except Exception as exc:  # noqa: BLE001 (see __getitem__)
                raise ValueError(
                    f"{self.ann_file}: cannot read image {path} (image {image_id}): {exc}"
                ) from None
            if size != (img["width"], img["height"]):
                raise ValueError(
                    f"{self.ann_file}: image {path} (image {image_id}) is {size[0]} x {size[1]}, "
                    f"the annotations say {img['width']} x {img['height']}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from PIL import Image

        image_id = self.ids[index]
        info = self.images[image_id]
        path = self.root / info["file_name"]
        try:
            with Image.open(path) as im:
                image = torch.from_numpy(_to_numpy(im.convert("RGB"))).permute(2, 0, 1)
        except Exception as exc:  # noqa: BLE001 any decoding failure is about this file: a
            # plain Pillow raises OSError or ValueError, but once Ultralytics is imported its
            # patched Image.open answers an unreadable file with ModuleNotFoundError (pi_heif).
            raise ValueError(
                f"cannot read image {path} (image {image_id}, index {index}): {exc}"
            ) from exc
        image = image.float() / 255.0
        boxes = torch.tensor([b[:4] for b in self.boxes[image_id]], dtype=torch.float32)
        target = {
            "boxes": boxes.reshape(-1, 4),
            "labels": torch.tensor([b[4] for b in self.boxes[image_id]], dtype=torch.long),
            "image_id": image_id,
            "orig_size": (image.shape[1], image.shape[2]),
            "size": (image.shape[1], image.shape[2]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _to_numpy(im):
    import numpy as np

    return np.asarray(im, dtype=np.uint8).copy()


def _load_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read annotation file {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"annotation file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path}: expected a JSON object at the top level")
    return data


def _field(record, key, path, what):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{path}: {what} has no '{key}'")
    return record[key]


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Tensor, target: dict):
        if random.random() < self.p:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
        return image, target


class ResizeShortSide:
    """Resize so the short side is ``short`` pixels, unless the long side would exceed
    ``max_size`` (then the long side is ``max_size``); boxes scale with the image."""

    def __init__(self, short: int, max_size: int):
        self.short, self.max_size = short, max_size

    def __call__(self, image: Tensor, target: dict):
        h, w = image.shape[-2:]
        scale = min(self.short / min(h, w), self.max_size / max(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[
                0
            ]
        boxes = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        return image, {**target, "boxes": boxes, "size": (nh, nw)}


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean)[:, None, None]
        self.std = torch.tensor(std)[:, None, None]

    def __call__(self, image: Tensor, target: dict):
        return (image - self.mean) / self.std, target


def default_transforms(train: bool, short: int, max_size: int) -> Compose:
    """Resize by short side (capped), flip when training, normalise."""
    steps = [ResizeShortSide(short, max_size)]
    if train:
        steps.append(RandomHorizontalFlip())
    return Compose([*steps, Normalize()])


class Batch(dict):
    """A collated batch: ``images [B, 3, H, W]`` (zero-padded bottom/right to a multiple of
    ``size_divisibility``), ``pad_mask [B, H, W]`` (True on that padding), ``image_sizes [B, 2]``
    (each image's ``(h, w)`` before padding), ``targets`` (the list), and for the assigners
    ``gt_boxes [B, G, 4]`` (xyxy pixels), ``gt_labels [B, G]``, ``gt_mask [B, G]``."""

    TENSORS = ("images", "pad_mask", "image_sizes", "gt_boxes", "gt_labels", "gt_mask")

    def to(self, device) -> Batch:
        out = Batch(self)
        for key in self.TENSORS:
            out[key] = self[key].to(device, non_blocking=True)
        return out


def collate(samples, size_divisibility: int = 32) -> Batch:
    images, targets = zip(*samples, strict=True)
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    H = math.ceil(H / size_divisibility) * size_divisibility
    W = math.ceil(W / size_divisibility) * size_divisibility
    batch = images[0].new_zeros(len(images), 3, H, W)
    pad_mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        pad_mask[i, : im.shape[1], : im.shape[2]] = False
    image_sizes = torch.tensor([tuple(im.shape[1:]) for im in images], dtype=torch.long)
    gt_boxes, gt_labels, gt_mask = pad_targets(targets)
    return Batch(
        images=batch,
        pad_mask=pad_mask,
        image_sizes=image_sizes.reshape(-1, 2),
        targets=list(targets),
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_mask=gt_mask,
    )


def images_only(batch: Batch) -> tuple:
    """What a dense detector's ``forward`` takes from a batch: ``(images,)``."""
    return (batch["images"],)
