"""Distributed helpers: ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "barrier",
    "global_count",
    "init_distributed",
    "is_main",
    "rank",
    "world_size",
]


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); False when alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the only process that prints, logs and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def global_count(n: torch.Tensor) -> torch.Tensor:
    """A per-rank count (of targets, foreground anchors, ...) as the mean over the ranks, at
    least 1: the normaliser of DETR's and FCOS's losses (DETR's ``num_boxes``)."""
    n = n.detach().float().reshape(())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return n.clamp_min(1.0)


def global_sum(x: float) -> float:
    """``x`` summed over the ranks (``x`` itself on one process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (just ``[obj]`` when alone)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
