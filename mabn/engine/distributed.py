"""Process-group plumbing shared by the trainers: torchrun / torch.distributed.launch / plain python.

torchrun (and the deprecated ``python -m torch.distributed.launch``) export ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the old launcher may instead pass ``--local-rank``
/ ``--local_rank``, which :func:`local_rank_from_argv` folds into the environment. Without them the
job runs as a single process. If one worker dies, torchrun's agent stops the others, so a job never
hangs on a dead rank; the collective timeout bounds any wait that slips through.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..layers.registry import learns_running_statistics


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_rank_from_argv(argv: list[str]) -> list[str]:
    """Strip ``--local-rank N`` / ``--local_rank=N`` (torch.distributed.launch) from argv into ``LOCAL_RANK``."""
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--local-rank", "--local_rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                i += 1
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                break
        else:
            rest.append(arg)
        i += 1
    return rest


def init_distributed(device: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group described by the environment (if any) and pick this process's device.

    ``device``: 'auto' (CUDA when available), 'cuda' or 'cpu'. ``backend``: 'auto' (nccl on CUDA, gloo on
    CPU), 'nccl' or 'gloo'.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available; use device 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    elif device == "cpu":
        torch_device = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {key} is not set: launch with torchrun")
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, torch_device, backend if world_size > 1 else None)


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else ``model`` itself.

    Buffers are not broadcast: MABN keeps per-rank SMA windows, which rank 0's must not overwrite on every
    forward (torch 2.14 deprecates ``broadcast_buffers``, but its successor still syncs buffers at init).
    """
    if not info.enabled:
        return model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


# Inference statistics of the batch-statistics norms: what eval mode and a saved model use.
_STATISTICS = ("running_mean", "running_var")


@torch.no_grad()
def average_norm_statistics(model: nn.Module) -> int:
    """Average the inference statistics (running mean / variance, MABN's EMA) of every BN, BRN and MABN
    layer across ranks, so that evaluation and checkpoints describe all the data, not rank 0's share.

    Per-rank training state (MABN's SMA windows and counters) is left alone. Returns the number of buffers
    averaged (0 without a process group).
    """
    if world_size() == 1:
        return 0
    buffers = []
    for module in model.modules():
        if learns_running_statistics(module):
            buffers += [getattr(module, name) for name in _STATISTICS if getattr(module, name, None) is not None]
    if not buffers:
        return 0
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
    return len(buffers)


def all_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank; one tiny all-reduce, so that every rank stops together."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
