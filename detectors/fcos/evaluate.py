"""Evaluate a trained FCOS checkpoint with COCO metrics.

python -m detectors.fcos.evaluate --checkpoint runs/NAME/last.pth --data DIR [--split val]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from detectors.common.checkpoint import load_checkpoint
from detectors.common.data import CocoDetection, collate, default_transforms
from detectors.common.engine import evaluate
from detectors.common.evaluation import format_table
from detectors.fcos.train import FCOSConfig, build_model

__all__ = ["main"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--data", required=True, type=Path, help="COCO-format dataset directory")
    p.add_argument("--split", default="val", help="annotations/instances_SPLIT.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        if "config" not in state or "model" not in state:
            raise ValueError(f"{args.checkpoint} is not a detectors.fcos.train checkpoint")
        cfg = FCOSConfig(**{**state["config"], "data": str(args.data), "backbone_weights": ""})
        dataset = CocoDetection(
            args.data,
            args.data / "annotations" / f"instances_{args.split}.json",
            default_transforms(False, cfg.short, cfg.max_size),
        )
    except ValueError as exc:
        p.error(str(exc))
    if dataset.num_classes != state["num_classes"]:
        p.error(
            f"{args.data} has {dataset.num_classes} classes, the checkpoint {state['num_classes']}"
        )
    device = torch.device(args.device)
    model = build_model(cfg, dataset.num_classes).to(device)
    model.load_state_dict(state["model"])
    loader = DataLoader(dataset, args.batch_size, collate_fn=collate)
    metrics = evaluate(model, model.detect, loader, dataset, device)
    print(format_table(metrics, f"FCOS-{cfg.assigner} ({args.split})"))
    return metrics


if __name__ == "__main__":
    main()
