"""Train detectors of other frameworks with their own assignment and with uotmatch's, on the same
crowded Color Boxes, and compare them with one COCO evaluation.

    python benchmarks/train_frameworks.py --out runs/frameworks                # CPU-sized
    python benchmarks/train_frameworks.py --out runs/frameworks --seeds 0 1 2  # several seeds
    python benchmarks/train_frameworks.py --runs yolo-tal yolo-ota --device 0  # on a GPU

Runs (``--runs``, default all):

* ``tv-fcos``: torchvision's ``FCOS`` (ResNet-18 FPN from scratch, 64 channels, 2 convs per
  tower: the bundled FCOS's CPU size) with its own matching
  (centre sampling, scale ranges); ``tv-fcos-ota``: the same with ``use_assigner(model,
  OTAAssigner())``. Trained here with SGD, cosine schedule.
* ``yolo-tal``: Ultralytics YOLOv8n (from its yaml, no weights) with its
  ``TaskAlignedAssigner``; ``yolo-ota`` and ``yolo-uot``: with ``trainer(OTAAssigner())`` and
  ``trainer(UOTAssigner(tau1=10, tau2=1))``. Trained by Ultralytics with its defaults
  (mosaic included), ``amp=False, plots=False`` on a CPU.

Every run is evaluated the same way: its detections on the validation images, scored by
``detectors.common.evaluation`` (faster-coco-eval): AP, AP50, AR100. The step time is the mean
time of a training step relative to the framework's own assignment. Results go to
``OUT/results.json`` and a markdown table (``OUT/table.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detectors.common.data import CocoDetection
from detectors.common.evaluation import coco_evaluate
from detectors.data import colorboxes
from detectors.data.yolo import write_yolo

RUNS = ("tv-fcos", "tv-fcos-ota", "yolo-tal", "yolo-ota", "yolo-uot")


def _assigner(name: str):
    from uotmatch.detection import OTAAssigner, UOTAssigner

    if name.endswith("-ota"):
        return OTAAssigner()
    if name.endswith("-uot"):
        return UOTAssigner(tau1=10.0, tau2=1.0)
    return None


# -- torchvision -----------------------------------------------------------------------------------


def _tv_model(num_classes: int, size: int, assigner, channels: int, num_convs: int):
    """torchvision's FCOS, sized as the bundled FCOS for a CPU: a ResNet-18 from scratch, an
    FPN and head ``channels`` wide with ``num_convs`` convs per tower (torchvision's: 256, 4),
    and a score threshold of 0.05 for evaluation (torchvision's default 0.2 is for display)."""
    import torchvision
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from uotmatch.integrations.torchvision import use_assigner

    resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    for m in resnet.modules():  # from scratch with frozen BN: see detectors/common/backbone.py
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()
    backbone = BackboneWithFPN(
        resnet,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=channels,
        extra_blocks=LastLevelP6P7(channels, channels),
    )
    head = FCOSHead(channels, 1, num_classes, num_convs=num_convs)
    model = FCOS(backbone, num_classes, min_size=size, max_size=size, head=head, score_thresh=0.05)
    return use_assigner(model, assigner) if assigner is not None else model


def train_torchvision(name, data: Path, args, seed: int) -> dict:
    torch.manual_seed(seed)
    device = torch.device("cuda" if args.device not in ("cpu", "") else "cpu")
    train = CocoDetection(data, data / "annotations" / "instances_train.json")
    val = CocoDetection(data, data / "annotations" / "instances_val.json")
    model = _tv_model(
        train.num_classes, args.size, _assigner(name), args.tv_channels, args.tv_convs
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.tv_lr, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=lambda s: s,
        generator=torch.Generator().manual_seed(seed),
    )
    total = args.tv_epochs * len(loader)
    warmup = min(100, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: (
            (i + 1) / warmup
            if i < warmup
            else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(total - warmup, 1)))
        ),
    )
    step_times = []
    for epoch in range(args.tv_epochs):
        model.train()
        for samples in loader:
            images = [im.to(device) for im, _ in samples]
            targets = [
                {"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)}
                for _, t in samples
            ]
            start = time.perf_counter()
            losses = model(images, targets)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - start)
        print(f"  {name} seed {seed} epoch {epoch + 1}/{args.tv_epochs} loss {loss.item():.3f}")
    model.eval()
    detections = []
    with torch.no_grad():
        for i in range(0, len(val), args.batch_size):
            samples = [val[j] for j in range(i, min(i + args.batch_size, len(val)))]
            outputs = model([im.to(device) for im, _ in samples])
            for (_, target), out in zip(samples, outputs, strict=True):
                for box, score, label in zip(
                    out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(),
                    strict=True,
                ):  # fmt: skip
                    x1, y1, x2, y2 = box
                    detections.append(
                        {
                            "image_id": target["image_id"],
                            "category_id": val.cat_ids[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score,
                        }
                    )
    metrics = coco_evaluate(val.ann_file, detections, image_ids=val.ids)
    return {**metrics, "step_s": statistics.median(step_times[len(step_times) // 10 :])}


# -- Ultralytics ---------------------------------------------------------------------------------


class _StepTimer:
    """Ultralytics callbacks timing each training batch (forward, loss, backward, step)."""

    def __init__(self):
        self.times, self._start = [], None

    def start(self, trainer):
        self._start = time.perf_counter()

    def end(self, trainer):
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)


def train_yolo(name, data: Path, yolo_data: Path, args, seed: int, out: Path) -> dict:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))
    from ultralytics import YOLO

    from uotmatch.integrations.ultralytics import trainer

    assigner = _assigner(name)
    model = YOLO("yolov8n.yaml")
    timer = _StepTimer()
    model.add_callback("on_train_batch_start", timer.start)
    model.add_callback("on_train_batch_end", timer.end)
    kwargs = {"trainer": trainer(assigner)} if assigner is not None else {}
    model.train(
        data=str(yolo_data),
        epochs=args.yolo_epochs,
        imgsz=args.size,
        batch=args.batch_size,
        device=args.device,
        amp=args.device not in ("cpu", ""),
        plots=False,
        workers=0,
        seed=seed,
        deterministic=True,
        project=str(out / "yolo"),
        name=f"{name}-seed{seed}",
        exist_ok=True,
        verbose=False,
        **kwargs,
    )
    val = CocoDetection(data, data / "annotations" / "instances_val.json")
    detections = []
    for image_id in val.ids:
        info = val.images[image_id]
        result = model.predict(
            str(data / info["file_name"]),
            imgsz=args.size,
            conf=0.001,
            iou=0.6,
            max_det=100,
            device=args.device,
            verbose=False,
        )[0]
        boxes = result.boxes
        for box, score, label in zip(
            boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.long().tolist(), strict=True
        ):
            x1, y1, x2, y2 = box
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": val.cat_ids[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    metrics = coco_evaluate(val.ann_file, detections, image_ids=val.ids)
    return {**metrics, "step_s": statistics.median(timer.times[len(timer.times) // 10 :])}


# -- the table -----------------------------------------------------------------------------------


def table(results: dict) -> str:
    """Mean (and range over seeds) of AP, AP50, AR100 and the step-time ratio per run."""
    lines = [
        "| framework | assignment | seeds | AP | AP50 | AR100 | step time vs its own |",
        "|---|---|---|---|---|---|---|",
    ]
    own = {"tv": "tv-fcos", "yolo": "yolo-tal"}
    labels = {
        "tv-fcos": ("torchvision FCOS", "its own (centre sampling)"),
        "tv-fcos-ota": ("torchvision FCOS", "OTA (uotmatch)"),
        "yolo-tal": ("YOLOv8n", "its own (TAL)"),
        "yolo-ota": ("YOLOv8n", "OTA (uotmatch)"),
        "yolo-uot": ("YOLOv8n", "UOT tau1 10, tau2 1 (uotmatch)"),
    }
    for name, by_seed in results.items():
        runs = list(by_seed.values())

        def stat(key, scale=100.0, runs=runs):
            values = [r[key] * scale for r in runs]
            mean = statistics.mean(values)
            if len(values) == 1:
                return f"{mean:.1f}"
            return f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"

        base = results.get(own[name.split("-")[0]], {})
        ratios = [r["step_s"] / base[s]["step_s"] for s, r in by_seed.items() if s in base]
        ratio = f"{statistics.mean(ratios):.2f}x" if ratios else "n/a"
        framework, assignment = labels[name]
        lines.append(
            f"| {framework} | {assignment} | {len(runs)} | {stat('AP')} | {stat('AP50')} "
            f"| {stat('AR100')} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/frameworks"))
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tv-epochs", type=int, default=12)
    p.add_argument("--tv-lr", type=float, default=0.02)
    p.add_argument("--tv-channels", type=int, default=64, help="torchvision FCOS width")
    p.add_argument("--tv-convs", type=int, default=2, help="torchvision FCOS convs per tower")
    p.add_argument("--yolo-epochs", type=int, default=30)
    p.add_argument("--device", default="cpu", help="cpu, or a CUDA device index (0)")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "annotations" / "instances_val.json").exists():
        colorboxes.generate(
            data, train=args.train, val=args.val, size=args.size, crowded=True, progress=False
        )
    yolo_data = out / "data-yolo" / "data.yaml"
    if any(r.startswith("yolo") for r in args.runs) and not yolo_data.exists():
        write_yolo(data, out / "data-yolo")
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for seed in args.seeds:
        for name in args.runs:
            if str(seed) in results.get(name, {}):
                continue  # already measured: rerun by deleting it from results.json
            print(f"{name}, seed {seed}")
            start = time.perf_counter()
            if name.startswith("tv"):
                r = train_torchvision(name, data, args, seed)
            else:
                r = train_yolo(name, data, yolo_data, args, seed, out)
            r["wall_s"] = time.perf_counter() - start
            results.setdefault(name, {})[str(seed)] = r
            path.write_text(json.dumps(results, indent=1))  # after every run: resumable
            ap, ap50, ar = (100 * r[k] for k in ("AP", "AP50", "AR100"))
            print(f"  AP {ap:.1f}, AP50 {ap50:.1f}, AR100 {ar:.1f}")
    text = table({name: results[name] for name in RUNS if name in results})
    (out / "table.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
