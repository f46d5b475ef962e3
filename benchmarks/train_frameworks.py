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
* ``hf-deformable``: Hugging Face transformers' ``DeformableDetrForObjectDetection`` (a tiny
  ResNet from scratch, 3 feature levels, ``d_model`` 64, 2 + 3 layers, 30 queries) with its own
  loss and Hungarian matching; ``hf-deformable-uot``: the same with ``use_matcher(model,
  "uot", loss="plan")`` (the UOT paper's DETR setting: balanced OT at eps = 0.12 / (log(2 Q) +
  1) on the cost divided by its maximum, the plan-weighted loss). AdamW, cosine schedule.
* ``yolo-tal``: Ultralytics YOLOv8n (from its yaml, no weights) with its
  ``TaskAlignedAssigner``; ``yolo-ota`` and ``yolo-uot``: with ``trainer(OTAAssigner())`` and
  ``trainer(UOTAssigner(tau1=10, tau2=1))``. Trained by Ultralytics with its defaults
  (mosaic included), ``amp=False, plots=False`` on a CPU.

Every run is evaluated the same way: its detections on the validation images, scored by
``detectors.common.evaluation`` (faster-coco-eval): AP, AP50, AR100. The step time is a
training step's (forward, loss, backward) relative to the framework's own assignment, measured
after the runs on the same batches, alternating between the two (``OUT/paired_step_s.json``;
``--step-rounds 0`` uses the runs' own step times instead, which see whatever else the machine
was doing). Results go to ``OUT/results.json`` and a markdown table (``OUT/table.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # detectors/ from a clone
from detectors.common.data import CocoDetection  # noqa: E402
from detectors.common.evaluation import coco_detections, coco_evaluate
from detectors.data import colorboxes
from detectors.data.yolo import write_yolo

RUNS = (
    "tv-fcos",
    "tv-fcos-ota",
    "hf-deformable",
    "hf-deformable-uot",
    "yolo-tal",
    "yolo-ota",
    "yolo-uot",
)


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
                detections += coco_detections(
                    target["image_id"],
                    out["boxes"].tolist(),
                    out["scores"].tolist(),
                    out["labels"].tolist(),
                    val.cat_ids,
                )
    metrics = coco_evaluate(val.ann_file, detections, image_ids=val.ids)
    step_s = statistics.median(step_times[len(step_times) // 10 :])
    return {**metrics, "step_s": step_s, "detections": detections}


# -- Hugging Face transformers ---------------------------------------------------------------------


def _hf_model(name: str, num_classes: int, args):
    """A tiny Deformable DETR from its config (random weights, nothing downloaded), with HF's
    own matching (``hf-deformable``) or the UOT paper's (``hf-deformable-uot``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    from uotmatch.integrations.transformers import use_matcher

    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=args.hf_queries,
        num_labels=num_classes,
        auxiliary_loss=True,
    )
    model = DeformableDetrForObjectDetection(config)
    if name.endswith("-uot"):
        eps = 0.12 / (math.log(2 * args.hf_queries) + 1)
        use_matcher(model, "uot", loss="plan", eps=eps)
    return model


def _hf_targets(targets, size: int):
    """Color Boxes targets (xyxy pixels) as HF's: class_labels, normalised cxcywh boxes."""
    out = []
    for t in targets:
        b = t["boxes"] / size
        cxcywh = torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
        out.append({"class_labels": t["labels"], "boxes": cxcywh})
    return out


def train_hf(name, data: Path, args, seed: int) -> dict:
    torch.manual_seed(seed)
    train = CocoDetection(data, data / "annotations" / "instances_train.json")
    val = CocoDetection(data, data / "annotations" / "instances_val.json")
    model = _hf_model(name, train.num_classes, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.hf_lr, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=lambda s: s,
        generator=torch.Generator().manual_seed(seed),
    )
    total = args.hf_epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(total, 1)))
    )
    step_times = []
    for epoch in range(args.hf_epochs):
        model.train()
        for samples in loader:
            images = torch.stack([im for im, _ in samples])
            labels = _hf_targets([t for _, t in samples], args.size)
            start = time.perf_counter()
            loss = model(pixel_values=images, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            sched.step()
            step_times.append(time.perf_counter() - start)
        print(f"  {name} seed {seed} epoch {epoch + 1}/{args.hf_epochs} loss {loss.item():.3f}")
    model.eval()
    detections = []
    with torch.no_grad():
        for i in range(0, len(val), args.batch_size):
            samples = [val[j] for j in range(i, min(i + args.batch_size, len(val)))]
            out = model(pixel_values=torch.stack([im for im, _ in samples]))
            prob = out.logits.sigmoid()  # Deformable DETR's post-processing: top 100 of Q x K
            B, Q, K = prob.shape
            scores, index = prob.flatten(1).topk(min(100, Q * K), dim=1)
            boxes = out.pred_boxes.gather(1, (index // K)[..., None].expand(-1, -1, 4))
            xyxy = torch.cat(
                [boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1
            )
            for (_, target), s, k, b in zip(
                samples, scores, index % K, xyxy * args.size, strict=True
            ):
                detections += coco_detections(
                    target["image_id"], b.tolist(), s.tolist(), k.tolist(), val.cat_ids
                )
    metrics = coco_evaluate(val.ann_file, detections, image_ids=val.ids)
    matcher = getattr(model.loss_function, "matcher", None)
    extra = {} if matcher is None else {"unconverged": matcher.unconverged, "calls": matcher.calls}
    step_s = statistics.median(step_times[len(step_times) // 10 :])
    return {**metrics, "step_s": step_s, **extra, "detections": detections}


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
        detections += coco_detections(
            image_id,
            boxes.xyxy.tolist(),
            boxes.conf.tolist(),
            boxes.cls.long().tolist(),
            val.cat_ids,
        )
    metrics = coco_evaluate(val.ann_file, detections, image_ids=val.ids)
    step_s = statistics.median(timer.times[len(timer.times) // 10 :])
    return {**metrics, "step_s": step_s, "detections": detections}


# -- step time, paired ----------------------------------------------------------------------------


def _batches(data: Path, size: int, count: int, batch_size: int):
    """``count`` training batches of Color Boxes as (images, targets) lists."""
    train = CocoDetection(data, data / "annotations" / "instances_train.json")
    out = []
    for start in range(0, count * batch_size, batch_size):
        samples = [train[i % len(train)] for i in range(start, start + batch_size)]
        images = [im for im, _ in samples]
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples]
        out.append((images, targets))
    return train.num_classes, out


def alternate(steps: dict, batches, rounds: int) -> dict:
    """Each step function timed on the same batches in alternating rounds (same machine load
    for both); returns per name the median over rounds of the per-batch median time."""
    times = {name: [] for name in steps}
    for r in range(rounds + 1):
        for name, step in steps.items():
            per_batch = []
            for batch in batches:
                start = time.perf_counter()
                step(batch)
                per_batch.append(time.perf_counter() - start)
            if r:  # round 0 warms up
                times[name].append(statistics.median(per_batch))
    return {name: statistics.median(t) for name, t in times.items()}


def paired_step_times(data: Path, args, rounds: int = 3, count: int = 6) -> dict:
    """Training-step time (forward, loss, backward) of each framework's own assignment and of
    ours, on the same batches and models of the same initialisation, timed alternately in one
    process: the step-time ratios of the table, free of the load other jobs put on the machine
    during the (sequential) training runs."""
    import warnings

    num_classes, batches = _batches(data, args.size, count, args.batch_size)
    out = {}

    def tv_step(model):
        def step(batch):
            model.zero_grad()
            sum(model(*batch).values()).backward()

        return step

    steps = {}
    for name in ("tv-fcos", "tv-fcos-ota"):
        torch.manual_seed(0)
        model = _tv_model(num_classes, args.size, _assigner(name), args.tv_channels, args.tv_convs)
        steps[name] = tv_step(model.train())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # slow-converging solves say so
        out.update(alternate(steps, batches, rounds))

    if args.hf_epochs:
        hf_batches = [
            (torch.stack(images), _hf_targets(targets, args.size)) for images, targets in batches
        ]
        steps = {}
        for name in ("hf-deformable", "hf-deformable-uot"):
            torch.manual_seed(0)
            model = _hf_model(name, num_classes, args).train()

            def step(batch, model=model):
                model.zero_grad()
                model(pixel_values=batch[0], labels=batch[1]).loss.backward()

            steps[name] = step
        out.update(alternate(steps, hf_batches, rounds))

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

    from uotmatch.integrations.ultralytics import TaskAssigner

    def yolo_batch(images, targets):
        idx, cls, xywh = [], [], []
        for i, t in enumerate(targets):
            b = t["boxes"] / args.size
            idx.append(torch.full((len(b),), float(i)))
            cls.append(t["labels"].float()[:, None])
            xywh.append(torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1))
        return {
            "img": torch.stack(images),
            "batch_idx": torch.cat(idx),
            "cls": torch.cat(cls),
            "bboxes": torch.cat(xywh),
        }

    yolo_batches = [yolo_batch(*b) for b in batches]
    steps = {}
    for name in ("yolo-tal", "yolo-ota", "yolo-uot"):
        torch.manual_seed(0)
        model = DetectionModel("yolov8n.yaml", nc=num_classes, verbose=False)
        model.args = IterableSimpleNamespace(**DEFAULT_CFG_DICT)
        model.criterion = model.init_criterion()
        assigner = _assigner(name)
        if assigner is not None:
            model.criterion.assigner = TaskAssigner(assigner, model.criterion.stride.tolist())

        def step(batch, model=model):
            model.zero_grad()
            loss, _ = model.loss(batch)
            loss.sum().backward()

        steps[name] = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out.update(alternate(steps, yolo_batches, rounds))
    return out


# -- the table -----------------------------------------------------------------------------------


def table(results: dict, paired: dict | None = None) -> str:
    """Mean (and range over seeds) of AP, AP50, AR100 per run, and the step-time ratio against
    the framework's own assignment: from ``paired`` (:func:`paired_step_times`) when given,
    else from the training runs' own step times (which saw whatever load the machine had)."""
    lines = [
        "| framework | assignment | seeds | AP | AP50 | AR100 | step time vs its own |",
        "|---|---|---|---|---|---|---|",
    ]
    own = {"tv": "tv-fcos", "hf": "hf-deformable", "yolo": "yolo-tal"}
    labels = {
        "tv-fcos": ("torchvision FCOS", "its own (centre sampling)"),
        "tv-fcos-ota": ("torchvision FCOS", "OTA (uotmatch)"),
        "hf-deformable": ("HF Deformable DETR", "its own (Hungarian)"),
        "hf-deformable-uot": ("HF Deformable DETR", "UOT plan loss (uotmatch)"),
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

        base_name = own[name.split("-")[0]]
        if paired and name in paired and base_name in paired:
            ratio = f"{paired[name] / paired[base_name]:.2f}x"
        else:
            base = results.get(base_name, {})
            ratios = [r["step_s"] / base[s]["step_s"] for s, r in by_seed.items() if s in base]
            ratio = f"{statistics.mean(ratios):.2f}x" if ratios else "n/a"
        framework, assignment = labels[name]
        lines.append(
            f"| {framework} | {assignment} | {len(runs)} | {stat('AP')} | {stat('AP50')} "
            f"| {stat('AR100')} | {ratio} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (also what benchmarks/study.py builds its framework runs' settings
    from)."""
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
    p.add_argument("--hf-epochs", type=int, default=24, help="0: no Hugging Face runs")
    p.add_argument("--hf-lr", type=float, default=1e-3)
    p.add_argument("--hf-queries", type=int, default=30)
    p.add_argument("--device", default="cpu", help="cpu, or a CUDA device index (0)")
    p.add_argument(
        "--step-rounds",
        type=int,
        default=3,
        help="rounds of the paired step timing (0: use the training runs' step times)",
    )
    return p


def main(argv=None):
    args = parser().parse_args(argv)
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
            elif name.startswith("hf"):
                r = train_hf(name, data, args, seed)
            else:
                r = train_yolo(name, data, yolo_data, args, seed, out)
            r["wall_s"] = time.perf_counter() - start
            r.pop("detections")  # the study (benchmarks/study.py) keeps them; not this table
            results.setdefault(name, {})[str(seed)] = r
            path.write_text(json.dumps(results, indent=1))  # after every run: resumable
            ap, ap50, ar = (100 * r[k] for k in ("AP", "AP50", "AR100"))
            print(f"  AP {ap:.1f}, AP50 {ap50:.1f}, AR100 {ar:.1f}")
    paired = None
    if args.step_rounds and args.device == "cpu":
        paired_path = out / "paired_step_s.json"
        if not paired_path.exists():  # delete it to measure again
            print(f"paired step timing ({args.step_rounds} rounds)")
            paired_path.write_text(json.dumps(paired_step_times(data, args, args.step_rounds)))
        paired = json.loads(paired_path.read_text())
    text = table({name: results[name] for name in RUNS if name in results}, paired)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
