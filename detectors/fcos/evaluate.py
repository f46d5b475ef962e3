"""Evaluate a trained FCOS checkpoint with COCO metrics.

python -m detectors.fcos.evaluate --checkpoint runs/NAME/last.pth --data DIR [--split val]
"""

from __future__ import annotations

from detectors.common.trainer import evaluate_checkpoint
from detectors.fcos.train import FCOSConfig, build_model

__all__ = ["main"]


def main(argv=None) -> dict:
    return evaluate_checkpoint(
        argv,
        FCOSConfig,
        build_model,
        "detectors.fcos.train",
        __doc__.split("\n\n")[0],
        title=lambda cfg: f"FCOS-{cfg.assigner}",
        prog="python -m detectors.fcos.evaluate",
    )


if __name__ == "__main__":
    main()
