"""Color Boxes: the UOT paper's synthetic detection set, written as a real COCO dataset on disk.

Each image holds 0-30 axis-aligned, filled rectangles in 20 colours (one category per colour) on
a noisy grey background. Later boxes are drawn over earlier ones; a box that would hide most of
an earlier one is redrawn elsewhere (or skipped), so every annotated box shows its colour. The
``--crowded`` mode piles boxes into a few clusters of near-duplicates (heavy overlap and
occlusion: the ambiguous anchors OTA was built for).

    python -m detectors.data.colorboxes --out data/cb --train 1000 --val 200 --size 128 [--crowded]

writes ``OUT/train/*.png``, ``OUT/val/*.png`` and ``OUT/annotations/instances_{train,val}.json``
(``file_name`` relative to ``OUT``). Output is a pure function of the arguments: every image has
its own random stream, seeded by ``(seed, split, index)``. The annotation file is written last,
atomically, so its presence means the split is complete. The paper's set is 4,800 train / 960
val images; the defaults here are sized for a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["COLORS", "COLOR_JITTER", "generate", "main", "render_image"]

#: (name, RGB) per category; the category id is the index + 1. Twenty well-separated colours,
#: none of them grey (the background).
COLORS = [
    ("red", (230, 25, 75)),
    ("green", (60, 180, 75)),
    ("yellow", (255, 225, 25)),
    ("blue", (0, 130, 200)),
    ("orange", (245, 130, 48)),
    ("purple", (145, 30, 180)),
    ("cyan", (70, 240, 240)),
    ("magenta", (240, 50, 230)),
    ("lime", (210, 245, 60)),
    ("pink", (250, 190, 212)),
    ("teal", (0, 128, 128)),
    ("lavender", (220, 190, 255)),
    ("brown", (170, 110, 40)),
    ("beige", (255, 250, 200)),
    ("maroon", (128, 0, 0)),
    ("mint", (170, 255, 195)),
    ("olive", (128, 128, 0)),
    ("apricot", (255, 215, 180)),
    ("navy", (0, 0, 128)),
    ("white", (255, 255, 255)),
]
#: A box's fill differs from its category colour by at most this much per channel.
COLOR_JITTER = 12
#: Boxes per image: at most this many (the paper's 0-30).
MAX_BOXES = 30
#: Smallest box side in pixels.
MIN_SIDE = 6
#: Largest box side as a fraction of the image side (normal mode).
MAX_SIDE_FRACTION = 0.25
#: Every box keeps at least this fraction of its area visible (later boxes that would cover more
#: are redrawn).
MIN_VISIBLE = 0.3
#: Tries to place a box before giving up on it (see :func:`render_image`).
PLACEMENT_TRIES = 20
#: Crowded mode: boxes attempted per image (at least), clusters per image, how far (fraction of
#: the cluster box's side) a member may be shifted from its cluster's box, and the factor it may
#: be scaled by either way.
CROWD_BOXES = 20
CROWD_CLUSTERS = (4, 8)
CROWD_SHIFT = 0.6
CROWD_SCALE = 1.5
#: Background grey level range and per-pixel noise amplitude.
BACKGROUND_LEVELS = (70, 110)
BACKGROUND_NOISE = 15


def _random_box(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    hi = max(MIN_SIDE + 1, int(size * MAX_SIDE_FRACTION))
    w, h = (int(v) for v in rng.integers(MIN_SIDE, hi + 1, size=2))
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    return x, y, w, h


def _cluster_box(
    rng: np.random.Generator, size: int, centre: tuple[int, int, int, int]
) -> tuple[int, int, int, int]:
    """A shifted, rescaled copy of a crowded cluster's box."""
    cx, cy, cw, ch = centre
    s = rng.uniform(1 / CROWD_SCALE, CROWD_SCALE, size=2)
    w = int(np.clip(round(cw * s[0]), MIN_SIDE, size))
    h = int(np.clip(round(ch * s[1]), MIN_SIDE, size))
    dx, dy = rng.uniform(-CROWD_SHIFT, CROWD_SHIFT, size=2) * (cw, ch)
    x = int(np.clip(round(cx + (cw - w) / 2 + dx), 0, size - w))
    y = int(np.clip(round(cy + (ch - h) / 2 + dy), 0, size - h))
    return x, y, w, h


def render_image(
    rng: np.random.Generator, size: int, crowded: bool = False, max_boxes: int = MAX_BOXES
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """One image: ``uint8 [size, size, 3]`` and its boxes ``(x, y, w, h, label)`` (pixels,
    ``label`` in ``0..19`` indexing :data:`COLORS`), in drawing order.

    Boxes are placed one at a time on top of the earlier ones; a candidate that would leave an
    earlier box less than ``MIN_VISIBLE`` visible is redrawn (up to ``PLACEMENT_TRIES`` times,
    then skipped), so every box keeps its colour on screen and its annotation is honest.
    ``max_boxes`` (default the paper's 30) caps the boxes attempted.
    """
    if crowded:
        n = int(rng.integers(min(CROWD_BOXES, max_boxes), max_boxes + 1))
        centres = [_random_box(rng, size) for _ in range(int(rng.integers(*CROWD_CLUSTERS)))]
    else:
        n = int(rng.integers(0, max_boxes + 1))
    owner = np.full((size, size), -1)  # index of the box on top of each pixel
    visible, boxes = [], []  # visible pixels per placed box
    for _ in range(n):
        for _ in range(PLACEMENT_TRIES):
            if crowded:
                x, y, w, h = _cluster_box(rng, size, centres[int(rng.integers(len(centres)))])
            else:
                x, y, w, h = _random_box(rng, size)
            region = owner[y : y + h, x : x + w]
            lost = np.bincount(region[region >= 0], minlength=len(boxes))
            if all(
                v - c >= MIN_VISIBLE * bw * bh
                for v, c, (_, _, bw, bh, _) in zip(visible, lost, boxes, strict=True)
            ):
                break
        else:
            continue
        for j, c in enumerate(lost):
            visible[j] -= int(c)
        region[...] = len(boxes)
        visible.append(w * h)
        boxes.append((x, y, w, h, int(rng.integers(len(COLORS)))))

    level = int(rng.integers(*BACKGROUND_LEVELS))
    noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, size=(size, size, 1))
    img = np.broadcast_to(level + noise, (size, size, 3)).astype(np.int64)
    for x, y, w, h, label in boxes:
        offset = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        img[y : y + h, x : x + w] = np.array(COLORS[label][1]) + offset
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def generate(
    out: str | Path,
    train: int = 1000,
    val: int = 200,
    size: int = 128,
    seed: int = 0,
    crowded: bool = False,
    progress: bool = True,
    max_boxes: int = MAX_BOXES,
) -> dict[str, Path]:
    """Write the dataset under ``out``; returns ``{"train": json path, "val": json path}``
    (a split with 0 images gets a valid, empty annotation file). ``max_boxes`` caps the boxes
    per image (the paper's 30 by default; fewer make an easier set)."""
    from PIL import Image

    checks = (
        ("train", train, 0),
        ("val", val, 0),
        ("size", size, 2 * MIN_SIDE),
        ("max_boxes", max_boxes, 1),
    )
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "box"} for i, (name, _) in enumerate(COLORS)
    ]
    files = {}
    for split_index, (split, count) in enumerate((("train", train), ("val", val))):
        (out / split).mkdir(exist_ok=True)
        images, annotations = [], []
        steps = range(count)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"Color Boxes {split}", unit="img", file=sys.stderr)
        for i in steps:
            rng = np.random.default_rng([seed, split_index, i])
            img, boxes = render_image(rng, size, crowded, max_boxes)
            file_name = f"{split}/{i + 1:06d}.png"
            Image.fromarray(img).save(out / file_name)
            image_id = i + 1
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for x, y, w, h, label in boxes:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        files[split] = out / "annotations" / f"instances_{split}.json"
        info = {
            "description": "Color Boxes",
            "seed": seed,
            "size": size,
            "crowded": crowded,
            "max_boxes": max_boxes,
        }
        _write_json_atomic(
            files[split],
            {"info": info, "images": images, "annotations": annotations, "categories": categories},
        )
    return files


def main(argv: list[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(
        prog="python -m detectors.data.colorboxes",
        description="Generate the Color Boxes detection dataset (COCO format) on disk.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=1000, help="training images")
    p.add_argument("--val", type=int, default=200, help="validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crowded", action="store_true", help="heavy overlap and occlusion")
    p.add_argument("--max-boxes", type=int, default=MAX_BOXES, help="boxes per image at most")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none unless on a terminal)"
    )
    args = p.parse_args(argv)
    for name in ("train", "val"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.size < 2 * MIN_SIDE:
        p.error(f"--size must be >= {2 * MIN_SIDE}, got {args.size}")
    if args.max_boxes < 1:
        p.error(f"--max-boxes must be >= 1, got {args.max_boxes}")
    files = generate(
        args.out,
        args.train,
        args.val,
        args.size,
        args.seed,
        args.crowded,
        not args.no_progress and sys.stderr.isatty(),  # a bar on a terminal, not in a log
        args.max_boxes,
    )
    print(f"wrote {files['train']} ({args.train} images) and {files['val']} ({args.val} images)")
    return files


if __name__ == "__main__":
    main()
