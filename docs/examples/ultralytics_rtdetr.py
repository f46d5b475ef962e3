"""Ultralytics RT-DETR trained with the UOT matcher, offline, on a tiny Color Boxes set."""

import os
import sys
import tempfile
from pathlib import Path

# Ultralytics reads these when imported: no downloads, settings in a writable directory.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp())

from ultralytics import RTDETR  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # detectors/ from the clone
from detectors.data import colorboxes  # noqa: E402
from detectors.data.yolo import write_yolo  # noqa: E402
from uotmatch.detection import UOTMatcher  # noqa: E402
from uotmatch.integrations.ultralytics import rtdetr_trainer  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
colorboxes.generate(root / "cb", train=8, val=4, size=64, progress=False)
data = write_yolo(root / "cb", root / "cb-yolo")

# RT-DETR's matching costs (class 2, box 5, GIoU 2, focal), solved as balanced entropic OT
matcher = UOTMatcher(eps=0.05, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal=True)
model = RTDETR("rtdetr-l.yaml")  # built from its yaml: no weights are downloaded
model.train(
    data=str(data),
    trainer=rtdetr_trainer(matcher),  # the one argument that changes the matching
    epochs=1,
    imgsz=64,
    batch=4,
    device="cpu",
    amp=False,
    plots=False,
    workers=0,
    project=str(root / "runs"),
    name="uot",
    verbose=False,
)
print("weights:", root / "runs" / "uot" / "weights" / "last.pt")
