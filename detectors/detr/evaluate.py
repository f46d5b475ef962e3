"""Evaluate a trained DETR checkpoint with COCO metrics.

python -m detectors.detr.evaluate --checkpoint runs/NAME/last.pth --data DIR [--split val]
"""

from __future__ import annotations

from detectors.common.trainer import evaluate_checkpoint
from detectors.detr.train import DETRConfig, build_model, detr_inputs, title

__all__ = ["main"]


def main(argv=None) -> dict:
    return evaluate_checkpoint(
        argv,
        DETRConfig,
        build_model,
        "detectors.detr.train",
        __doc__.split("\n\n")[0],
        title=title,
        inputs=detr_inputs,
        prog="python -m detectors.detr.evaluate",
    )


if __name__ == "__main__":
    main()
