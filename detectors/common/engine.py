"""Train one epoch, evaluate: the whole engine, shared by the bundled detectors."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from detectors.common.data import images_only
from detectors.common.dist import all_gather_objects, global_sum, is_main
from detectors.common.errors import UsageError
from detectors.common.evaluation import coco_detections, coco_evaluate

__all__ = ["COUNTS", "NonFiniteLossError", "evaluate", "train_one_epoch"]

#: Criterion outputs that are counts: summed over the epoch (and the ranks), not averaged.
#: ``unconverged``: the images (DETR: images x decoder layers) whose transport problem did not
#: reach the solver's tol.
COUNTS = ("unconverged",)


class NonFiniteLossError(UsageError):
    """The loss became NaN or inf: training stops; the last checkpoint is the last good state."""


def _batches(iterable):
    """The loader's batches; a data file that fails to load (a corrupt image, found only when it
    is read) is a UsageError naming it, not a traceback from inside the loader."""
    iterator = iter(iterable)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except ValueError as exc:  # CocoDetection's "cannot read image PATH (image ID): ..."
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            message = lines[-1].removeprefix("ValueError: ") if lines else repr(exc)
            raise UsageError(f"{message}; fix or remove that file") from None
        yield batch


def train_one_epoch(
    model: nn.Module,
    criterion,
    loader,
    optimizer,
    scheduler,
    scaler,
    device: torch.device,
    epoch: int,
    clip_grad: float = 0.0,
    progress: bool = True,
    inputs: Callable = images_only,
    epochs: int | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean of each loss term (the sum of the
    :data:`COUNTS`), and it/s.

    ``model(*inputs(batch))`` gives the outputs (default: the images alone) and
    ``criterion(outputs, batch)`` a dict of losses whose ``"loss"`` is optimised. ``epoch``
    counts from 0; the progress bar shows it from 1 (of ``epochs``), as the summaries do.
    """
    model.train()
    sums: dict[str, float] = {}
    iterator = _batches(loader)
    bar = None
    if progress and is_main() and sys.stderr.isatty():  # a log file gets the epoch lines only
        from tqdm import tqdm

        desc = f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")
        iterator = bar = tqdm(iterator, total=len(loader), desc=desc, unit="it", dynamic_ncols=True)
    start, n = time.perf_counter(), 0
    for i, batch in enumerate(iterator):
        batch = batch.to(device)
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            outputs = model(*inputs(batch))
        losses = criterion(outputs, batch)
        loss = losses["loss"]
        value = float(loss.detach())
        if not math.isfinite(value):
            terms = {k: float(v.detach()) for k, v in losses.items() if k.startswith("loss")}
            raise NonFiniteLossError(
                f"epoch {epoch + 1}, iteration {i}: the loss is {value} ({terms}); training "
                "stops here (try a lower --lr, or --clip-grad)"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n += 1
        for key, v in losses.items():
            sums[key] = sums.get(key, 0.0) + float(v.detach())
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    out = {key: v / max(n, 1) for key, v in sums.items() if key not in COUNTS}
    out.update({key: global_sum(v) for key, v in sums.items() if key in COUNTS})
    out["it_per_s"] = n / max(time.perf_counter() - start, 1e-9)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    detect,
    loader,
    dataset,
    device: torch.device,
    progress: bool = True,
    inputs: Callable = images_only,
    keep: list | None = None,
) -> dict[str, float] | None:
    """COCO metrics of ``detect(outputs) -> [{"boxes", "scores", "labels"}]`` over ``loader``
    (detections of every rank gathered); None on ranks other than 0. ``keep``: a list that
    receives the COCO-format detections too (rank 0)."""
    model.eval()
    detections = []
    iterator = loader
    if progress and is_main() and sys.stderr.isatty():
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluate", unit="it", dynamic_ncols=True, leave=False)
    for batch in iterator:
        batch = batch.to(device)
        results = detect(model(*inputs(batch)))
        for target, res in zip(batch["targets"], results, strict=True):
            (oh, ow), (h, w) = target["orig_size"], target["size"]
            scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], device=res["boxes"].device)
            boxes = (res["boxes"] * scale).cpu()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
            detections += coco_detections(
                target["image_id"],
                boxes.tolist(),
                res["scores"].tolist(),
                res["labels"].tolist(),
                dataset.cat_ids,
            )
    gathered = [d for part in all_gather_objects(detections) for d in part]
    if not is_main():
        return None
    if keep is not None:
        keep.extend(gathered)
    return coco_evaluate(dataset.ann_file, gathered, image_ids=dataset.ids)
