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
              nesterov: bool = False, bias_lr_factor: float = 1.0, bias_weight_decay: Optional[float] = None) -> torch.optim.SGD:
    """SGD whose parameter groups follow three rules, applied in this order of precedence:

    * biases: every parameter named ``bias`` (norm betas included) trains at ``lr * bias_lr_factor`` with weight
      decay ``bias_weight_decay`` (None: the decay the rules below give it), maskrcnn-benchmark's
      ``BIAS_LR_FACTOR`` / ``WEIGHT_DECAY_BIAS``; a group of its own unless both are neutral (1, None);
    * norms: ``norm_weight_decay`` (if not None) replaces ``weight_decay`` on every norm layer's other parameters;
    * everything else: ``lr``, ``weight_decay``.

    Groups come in a fixed order, other / norm / bias / norm bias (the last: norm betas while ``bias_weight_decay``
    is None and ``norm_weight_decay`` is not), the empty ones left out, so that an optimizer state saved by a
    run loads into the optimizer the same config builds. The first group always runs at ``lr`` itself.
    """
    separate_biases = bias_lr_factor != 1.0 or bias_weight_decay is not None
    groups = {"other": [], "norm": [], "bias": [], "norm bias": []}
    for module in model.modules():
        rule = "norm" if is_norm(module) and norm_weight_decay is not None else "other"
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                biased = separate_biases and name == "bias"
                groups[{"other": "bias", "norm": "norm bias"}[rule] if biased else rule].append(param)
    norm_decay = weight_decay if norm_weight_decay is None else norm_weight_decay
    settings = {"other": (1.0, weight_decay), "norm": (1.0, norm_decay),
                "bias": (bias_lr_factor, weight_decay if bias_weight_decay is None else bias_weight_decay),
                "norm bias": (bias_lr_factor, norm_decay if bias_weight_decay is None else bias_weight_decay)}
    params = [{"params": groups[rule], "lr": lr * settings[rule][0], "weight_decay": settings[rule][1]}
              for rule in groups if groups[rule]]
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
