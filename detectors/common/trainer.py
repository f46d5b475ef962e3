"""The training run shared by the bundled detectors: config fields, setup, the epoch loop with
checkpoints, resume, evaluation and logging, and checkpoint evaluation.

A detector supplies its config (a :class:`TrainConfig` subclass), a model with ``detect(outputs)``,
a criterion ``(outputs, batch) -> {"loss": ..., ...}`` and an optimizer; :func:`fit` does the rest,
on one CPU, one GPU, or many processes through torchrun (rank 0 alone prints, logs and writes).

A run never loses work: an output directory that already holds a run is continued
(``--resume``) or replaced (``--overwrite``) only when asked, and is checked writable before
the first step. A user's mistake (a missing file, a bad flag, a checkpoint of another model) is
one line (:class:`UsageError`, exit status 2); a genuine bug keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from detectors.common.checkpoint import (
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from detectors.common.config import RESUME_FREE, OneLineParser, TrainConfig, flag
from detectors.common.data import CocoDetection, collate, default_transforms, images_only
from detectors.common.dist import barrier, init_distributed, is_main, rank, world_size
from detectors.common.engine import evaluate, train_one_epoch
from detectors.common.errors import UsageError, command
from detectors.common.evaluation import format_table

__all__ = [
    "TrainConfig",
    "UsageError",
    "command",
    "datasets",
    "evaluate_checkpoint",
    "fit",
    "setup",
    "warmup_cosine",
]

#: What a run writes into ``--out`` (``--overwrite`` removes exactly these).
RUN_FILES = ("last.pth", "metrics.jsonl", "tensorboard")


def setup(cfg: TrainConfig) -> tuple[torch.device, bool]:
    """Device, process group (under torchrun), per-rank seeds, and the output directory: checked
    writable, refused when it already holds a run unless ``--resume`` or ``--overwrite``."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(
                f"--device {cfg.device}: CUDA is not available here (try --device cpu)"
            )
    distributed = init_distributed(device)
    torch.manual_seed(cfg.seed + rank())
    random.seed(cfg.seed + rank())
    np.random.seed(cfg.seed + rank())
    if is_main():
        prepare_out(cfg)
    barrier()
    return device, distributed


def prepare_out(cfg: TrainConfig) -> Path:
    """Check ``--out`` before any work, without touching it: a path under a file, an unwritable
    directory, or one that already holds a run without ``--resume``/``--overwrite`` is a
    :class:`UsageError` naming it. Nothing is created or removed here: the directory is created
    with the first checkpoint, and ``--overwrite`` replaces the previous run only then."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory: choose another --out")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (cfg.resume or cfg.overwrite):
        raise UsageError(
            f"--out {out} already holds a run ({', '.join(held)}): continue it with --resume, "
            "replace it with --overwrite, or choose another --out"
        )
    existing = out
    while not existing.exists():  # the nearest directory that exists: where out will be made
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"--out {out}: {existing} is a file, not a directory: choose another --out"
        )
    try:  # a probe that leaves nothing behind (os.access says yes to root even on /proc)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UsageError(
            f"--out {out} is not writable ({existing}: {exc.strerror or exc}): choose a "
            "directory you can write to"
        ) from None
    return out


def datasets(cfg: TrainConfig) -> tuple[CocoDetection, CocoDetection]:
    """``DIR/annotations/instances_{train,val}.json``, with the default transforms (every
    annotation, and every image file's header, checked now)."""
    root = Path(cfg.data)
    ann = root / "annotations"
    try:
        train = CocoDetection(
            root,
            ann / "instances_train.json",
            default_transforms(True, cfg.short, cfg.max_size),
            check_images=True,
        )
        val = CocoDetection(
            root,
            ann / "instances_val.json",
            default_transforms(False, cfg.short, cfg.max_size),
            check_images=True,
        )
    except ValueError as exc:
        raise UsageError(f"--data {root}: {exc}") from None
    return train, val


def build(fn: Callable, *args):
    """``fn(*args)``, a ``ValueError`` of the user's input (``--backbone-weights``, the model's
    flags) turned into a :class:`UsageError`."""
    try:
        return fn(*args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor per iteration: linear warm-up from 0.001, then cosine decay to 0 at ``total``."""

    def f(it: int) -> float:
        if it < warmup:
            return 0.001 + (1 - 0.001) * it / warmup
        return 0.5 * (1 + math.cos(math.pi * min(it - warmup, total) / max(total - warmup, 1)))

    return f


class _Log:
    """``OUT/metrics.jsonl`` (one JSON line per epoch, each naming its run) and TensorBoard
    (when installed), opened with the run's first checkpoint. A run that replaces another
    (``--overwrite``) replaces the previous log at its first line, atomically, and removes the
    previous TensorBoard events then: until that point the previous run is whole."""

    def __init__(self, out: Path, run: str, replacing: bool):
        self.out, self.run, self.replacing = out, run, replacing
        self.writer = None
        self.opened = False

    def write(self, record: dict) -> None:
        path = self.out / "metrics.jsonl"
        line = json.dumps(_json_safe({"run": self.run, **record}), allow_nan=False) + "\n"
        if self.replacing:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(line)
            os.replace(tmp, path)
            board = self.out / "tensorboard"
            if board.exists():
                shutil.rmtree(board)
            self.replacing = False
        else:
            with open(path, "a") as fh:
                fh.write(line)
        if not self.opened:
            self.opened = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.out / "tensorboard")
            except ImportError:
                pass
        if self.writer is not None:
            for key, v in record.items():
                if isinstance(v, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, v, record["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _json_safe(x):
    """``x`` with non-finite floats as strings (``"inf"``): metrics.jsonl is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _read_log(out: Path, upto: int, run: str) -> list[dict]:
    """The log's records of the checkpoint's run (``run``; records written before runs had ids
    count as its own) and of epochs ``<= upto`` (a record written after the last checkpoint, by a
    run killed in between, is dropped: the log and the checkpoint stay one run)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r.get("epoch", 0) <= upto and r.get("run", run) == run]
    if len(kept) != len(records):
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _changes(cfg: TrainConfig, stored: dict) -> dict:
    """``{field: [the run's value, this command's]}`` for the settings that differ, except
    :data:`RESUME_FREE`."""
    now = dataclasses.asdict(cfg)
    stored = type(cfg).upgrade(stored)
    return {
        k: [stored.get(k), v]
        for k, v in now.items()
        if k not in RESUME_FREE and k in stored and stored[k] != v
    }


def _resume(cfg: TrainConfig, ckpt: Path, model, optimizer, scheduler, scaler) -> dict:
    """Load the run's state; a damaged checkpoint, one of another model, or one trained with
    other settings (unless ``--accept-changes``) is a UsageError."""
    try:
        state = load_checkpoint(ckpt)
    except ValueError as exc:
        raise UsageError(
            f"--resume: {exc}; the file is damaged: delete it (or use --overwrite) to start over"
        ) from None
    missing = {"model", "optimizer", "scheduler", "scaler", "epoch", "rng"} - set(state)
    if missing:
        raise UsageError(f"--resume: {ckpt} is not a training checkpoint (no {sorted(missing)})")
    changes = _changes(cfg, state.get("config", {}))
    if changes and not cfg.accept_changes:
        said = ", ".join(f"{flag(k)} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise UsageError(
            f"--resume: the run in {ckpt.parent} was trained with other settings ({said}): "
            "resume with the run's settings, or add --accept-changes to continue with these "
            "(recorded in metrics.jsonl)"
        )
    state["changes"] = changes
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UsageError(
            f"--resume: {ckpt} was written by a different model ({detail}): resume with the "
            "flags of that run, or use another --out"
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    criterion,
    optimizer: torch.optim.Optimizer,
    lr_lambda: Callable[[int, int], Callable[[int], float]],
    train_set: CocoDetection,
    val_set: CocoDetection,
    device: torch.device,
    distributed: bool,
    title: str,
    inputs: Callable = images_only,
) -> dict:
    """Train ``model`` for ``cfg.epochs`` (continuing the run in ``OUT`` with ``cfg.resume``).

    Every epoch: a checkpoint (atomic; model, optimizer, LR schedule, AMP scaler, epoch, RNG
    states, config), a line of ``OUT/metrics.jsonl`` (and TensorBoard when installed), COCO
    evaluation every ``cfg.eval_every`` epochs and after the last. ``lr_lambda(iters_per_epoch,
    total_iters)`` gives the LR factor per iteration. Returns the last COCO metrics. Ctrl-C
    stops with a one-line note of what the checkpoint holds (exit status 130).
    """
    out = Path(cfg.out)
    sampler = DistributedSampler(
        train_set, num_replicas=world_size(), rank=rank(), shuffle=True, seed=cfg.seed
    )
    loader = DataLoader(
        train_set, cfg.batch_size, sampler=sampler, collate_fn=collate, num_workers=cfg.workers
    )
    val_loader = DataLoader(
        Subset(val_set, range(rank(), len(val_set), world_size())),
        cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.workers,
    )
    total = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(len(loader), total))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    start, run, changes = 0, uuid.uuid4().hex[:12], {}
    ckpt = out / "last.pth"
    replacing = cfg.overwrite and any((out / name).exists() for name in RUN_FILES)
    if cfg.resume and ckpt.exists():
        state = _resume(cfg, ckpt, model, optimizer, scheduler, scaler)
        start, run, changes = state["epoch"], state.get("run", run), state["changes"]
        if is_main():
            print(f"resumed from {ckpt} at epoch {start} of {cfg.epochs}")
            if changes:
                said = ", ".join(f"{flag(k)} {o!r} -> {n!r}" for k, (o, n) in changes.items())
                print(f"--accept-changes: continuing with {said} (recorded in metrics.jsonl)")
    elif cfg.resume and is_main():
        print(f"--resume: no {ckpt} yet, starting from scratch")
        replacing = any((out / name).exists() for name in RUN_FILES)  # a log without checkpoint
    # A resumed run's log, trimmed to its checkpoint; a new run leaves any old log alone (an
    # --overwrite replaces it at the first checkpoint).
    records = _read_log(out, start, run) if is_main() and start else []
    if start >= cfg.epochs:  # nothing left to do: report the finished run
        metrics = next((r for r in reversed(records) if "AP" in r), {})
        metrics = {k: v for k, v in metrics.items() if k in _METRIC_KEYS}
        if is_main():
            print(
                f"the run in {out} has finished its {cfg.epochs} epochs (raise --epochs to go on)"
            )
            if metrics:
                print("\n" + format_table(metrics, title))
        return metrics
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    log = _Log(out, run, replacing) if is_main() else None
    metrics = {}
    epoch, finished = start, start
    began = time.perf_counter()
    try:
        for epoch in range(start, cfg.epochs):
            sampler.set_epoch(epoch)
            tick = time.perf_counter()
            stats = train_one_epoch(
                net,
                criterion,
                loader,
                optimizer,
                scheduler,
                scaler,
                device,
                epoch,
                cfg.clip_grad,
                cfg.progress,
                inputs,
                epochs=cfg.epochs,
            )
            if is_main():
                out.mkdir(parents=True, exist_ok=True)
                save_checkpoint(
                    ckpt,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch + 1,
                        "rng": get_rng_state(),
                        "config": dataclasses.asdict(cfg),
                        "num_classes": train_set.num_classes,
                        "run": run,
                    },
                )
            finished = epoch + 1
            last = epoch + 1 == cfg.epochs
            record = {"epoch": epoch + 1, **stats, **cfg.recorded()}
            if changes:  # the settings --accept-changes let differ, from this epoch on
                record["changed"], changes = changes, {}
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                metrics = evaluate(
                    model, model.detect, val_loader, val_set, device, cfg.progress, inputs
                )
                if is_main():
                    record.update(metrics)
            if is_main():
                log.write(record)
                done = time.perf_counter() - began
                eta = done / (epoch + 1 - start) * (cfg.epochs - epoch - 1)
                ap = f", AP {100 * metrics['AP']:.1f}" if "AP" in record else ""
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f}, lr "
                    f"{optimizer.param_groups[0]['lr']:.2e}, {time.perf_counter() - tick:.0f} s "
                    f"({stats['it_per_s']:.2f} it/s){ap}, ETA {_duration(eta)}",
                    flush=True,
                )
            barrier()
    except KeyboardInterrupt:
        if is_main():
            then = _next_step(cfg, finished, replacing and finished == start)
            print(f"\ninterrupted in epoch {epoch + 1}/{cfg.epochs}: {then}", file=sys.stderr)
        raise SystemExit(130) from None
    except UsageError as exc:  # a bad file met in training, a non-finite loss
        raise UsageError(
            f"{exc}; {_next_step(cfg, finished, replacing and finished == start)}"
        ) from None
    finally:
        if log is not None:
            log.close()
    if is_main():
        print("\n" + format_table(metrics, title))
    return metrics


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _next_step(cfg: TrainConfig, finished: int, untouched: bool) -> str:
    """What to do after a run stopped with ``finished`` epochs in its checkpoint."""
    if finished:
        return (
            f"{Path(cfg.out) / 'last.pth'} holds epoch {finished}: continue with the same "
            "command and --resume"
        )
    if untouched:
        return (
            f"no epoch finished, and the previous run in {cfg.out} is untouched (--overwrite "
            "replaces it only at this run's first checkpoint): run the same command again"
        )
    return "no epoch finished (no checkpoint to resume from): run the same command again"


_METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def evaluate_checkpoint(
    argv,
    config_cls,
    build_model: Callable,
    name: str,
    doc: str,
    title: Callable[[TrainConfig], str],
    inputs: Callable = images_only,
    prog: str = "",
) -> dict:
    """The ``evaluate`` CLI of a detector: ``--checkpoint FILE --data DIR [--split val]``;
    ``title(config)`` heads the printed table."""
    p = OneLineParser(description=doc, prog=prog or None)
    p.add_argument("--checkpoint", required=True, type=Path, help="a training run's last.pth")
    p.add_argument("--data", required=True, type=Path, help="COCO-format dataset directory")
    p.add_argument(
        "--split", default="val", help="evaluate annotations/instances_SPLIT.json (default: val)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        if not isinstance(state, dict) or "config" not in state or "model" not in state:
            raise ValueError(f"{args.checkpoint} is not a {name} training checkpoint")
        stored = config_cls.upgrade(state["config"])
        names = {f.name for f in dataclasses.fields(config_cls)}
        if set(stored) != names:
            raise ValueError(
                f"{args.checkpoint} is not a {name} training checkpoint (its config fields "
                f"differ: {sorted(set(stored) ^ names)[:4]})"
            )
        stored = {**stored, "data": str(args.data), "backbone_weights": ""}
        stored.update(resume=False, overwrite=False)
        cfg = config_cls(**stored)
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
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    model = build_model(cfg, dataset.num_classes).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        p.error(f"{args.checkpoint} does not fit its own config: {str(exc).splitlines()[0]}")
    loader = DataLoader(dataset, args.batch_size, collate_fn=collate)
    metrics = evaluate(
        model, model.detect, loader, dataset, device, not args.no_progress, inputs=inputs
    )
    print(format_table(metrics, f"{title(cfg)} ({args.split})"))
    return metrics
