"""A COCO-format dataset (Color Boxes, or any ``DIR/annotations/instances_{train,val}.json``
layout) in the YOLO format Ultralytics trains on.

    python -m detectors.data.yolo --coco data/cb --out data/cb-yolo

writes ``OUT/images/{train,val}/*`` (hard links to the COCO images where the file system
allows, copies otherwise), ``OUT/labels/{train,val}/*.txt`` (one ``class cx cy w h`` line per
box, normalised to the image) and ``OUT/data.yaml`` (``path``, ``train``, ``val``, ``names``).
Classes are numbered as the bundled detectors number them: sorted category ids, from 0. The
annotations are read (and validated) by :class:`~detectors.common.data.CocoDetection`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from detectors.common.data import CocoDetection

__all__ = ["main", "write_yolo"]


def write_yolo(coco: str | Path, out: str | Path, splits=("train", "val")) -> Path:
    """Write the YOLO copy of the COCO dataset ``coco`` under ``out``; returns ``data.yaml``."""
    import yaml

    coco, out = Path(coco), Path(out)
    names = None
    for split in splits:
        ds = CocoDetection(coco, coco / "annotations" / f"instances_{split}.json")
        names = ds.class_names if names is None else names
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for image_id in ds.ids:
            info = ds.images[image_id]
            source = coco / info["file_name"]
            stem = f"{image_id:08d}"
            target = out / "images" / split / (stem + source.suffix)
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
            w, h = info["width"], info["height"]
            lines = [
                f"{label} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                for x1, y1, x2, y2, label in ds.boxes[image_id]
            ]
            (out / "labels" / split / f"{stem}.txt").write_text(
                "\n".join(lines) + "\n" * bool(lines)
            )
    data = {
        "path": str(out.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": dict(enumerate(names)),
    }
    yaml_path = out / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return yaml_path


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m detectors.data.yolo",
        description="Write a COCO-format dataset in the YOLO format (images, labels, data.yaml).",
    )
    p.add_argument("--coco", required=True, type=Path, help="the COCO-format dataset directory")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    args = p.parse_args(argv)
    try:
        path = write_yolo(args.coco, args.out)
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
