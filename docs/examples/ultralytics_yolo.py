"""YOLOv8n trained with OTA's assignment, offline, on a tiny Color Boxes set in YOLO format."""

import os
import sys
import tempfile
from pathlib import Path

# Ultralytics reads these when imported: no downloads, settings in a writable directory.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp())

from ultralytics import YOLO  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # detectors/ from the clone
from detectors.data import colorboxes  # noqa: E402
from detectors.data.yolo import write_yolo  # noqa: E402
from uotmatch.detection import OTAAssigner  # noqa: E402
from uotmatch.integrations.ultralytics import trainer  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
colorboxes.generate(root / "cb", train=16, val=8, size=96, crowded=True, progress=False)
data = write_yolo(root / "cb", root / "cb-yolo")  # images/, labels/, data.yaml

model = YOLO("yolov8n.yaml")  # built from its yaml: no weights are downloaded
model.train(
    data=str(data),
    trainer=trainer(OTAAssigner()),  # the one argument that changes the assignment
    epochs=1,
    imgsz=96,
    batch=8,
    device="cpu",
    amp=False,  # on a CPU
    plots=False,
    workers=0,
    project=str(root / "runs"),
    name="ota",
    verbose=False,
)
print("weights:", root / "runs" / "ota" / "weights" / "last.pt")
