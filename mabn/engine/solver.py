"""SGD with the papers' recipes and a step-indexed learning-rate schedule, shared by both trainers.

The schedule is a pure function of the optimizer step (iteration), so that a run resumed from any
checkpoint continues with exactly the learning rates an uninterrupted run would have used; it is a
``LambdaLR`` whose state (a few numbers) goes into the checkpoint.
"""
from __future__ import annotations

import bisect
import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..layers.registry import is_norm


def linear_scaled_lr(base_lr: float, total_batch: int, reference_batch: int) -> float:
    """Goyal et al.'s linear scaling: ``base_lr`` is the rate at ``reference_batch`` images per step."""
    return base_lr * total_batch / reference_batch


def build_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float, norm_weight_decay: Optional[float] = None,
              nesterov: bool = False) -> torch.optim.SGD:
    """SGD; ``norm_weight_decay`` (if not None) replaces ``weight_decay`` on every norm layer's gamma and beta."""
    if norm_weight_decay is None:
        params = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    else:
        norm_params, other = [], []
        for module in model.modules():
            target = norm_params if is_norm(module) else other
            target += [p for p in module.parameters(recurse=False) if p.requires_grad]
        params = [{"params": other, "weight_decay": weight_decay}, {"params": norm_params, "weight_decay": norm_weight_decay}]
        params = [g for g in params if g["params"]]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)


class LRSchedule:
    """Factor applied to the base learning rate at optimizer step ``step`` (0-based).

    ``kind='step'``: multiplied by ``gamma`` at every milestone; ``kind='cosine'``: half a cosine from 1 to 0
    over ``total_steps``. Either is preceded, for ``warmup_steps`` steps, by a linear ramp from ``warmup_factor``.
    """

    def __init__(self, kind: str, total_steps: int, milestones: Sequence[int] = (), gamma: float = 0.1,
                 warmup_steps: int = 0, warmup_factor: float = 1.0):
        if kind not in ("step", "cosine"):
            raise ValueError(f"LR schedule must be 'step' or 'cosine', got {kind!r}")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"LR milestones must increase, got {list(milestones)}")
        self.kind = kind
        self.total_steps = int(total_steps)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step: int) -> float:
        if self.kind == "step":
            factor = self.gamma ** bisect.bisect_right(self.milestones, step)
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / max(1, self.total_steps)))
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
