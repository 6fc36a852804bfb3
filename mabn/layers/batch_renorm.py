"""Batch Renormalization (Ioffe, 2017), the paper's main small-batch baseline.

Training, per normalization batch: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``,
both constants for autograd, ``mu, sigma`` the running averages. ``r_max`` grows linearly from 1 and
``d_max`` from 0, starting after ``warmup_steps`` training steps and reaching their final values at
``r_max_steps`` / ``d_max_steps`` (Ioffe: 5k, 40k, 25k). Inference: ``(x - mu) / sigma``, like BN.
The buffers carry ``nn.BatchNorm2d``'s names, so BN checkpoints load into BRN models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backends import check_backend, select
from .batch_norm import check_norm_batch_size
from .grouping import accumulation_dtype, num_groups
from .moving_averages import sequential_ema


def _ramp(step: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """0 until ``start``, then linear to 1 at ``end``."""
    if end <= start:
        return (step > start).to(torch.float64)
    return ((step.to(torch.float64) - start) / (end - start)).clamp(0.0, 1.0)


class BatchRenorm2d(nn.Module):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.01,
        affine: bool = True,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        norm_batch_size: Optional[int] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        """``momentum``: update rate of the running averages (``nn.BatchNorm2d`` convention; Ioffe's alpha).
        ``backend``: see :mod:`mabn.layers.backends`."""
        super().__init__()
        name = type(self).__name__
        check_norm_batch_size(name, norm_batch_size)
        self.backend = check_backend(backend, name)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"{name}: need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"{name}: momentum must be in (0, 1], got {momentum}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = int(warmup_steps), int(r_max_steps), int(d_max_steps)
        self.norm_batch_size = norm_batch_size
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        # Training steps (forward calls), which drive the r_max / d_max schedule.
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))

    def limits(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_max, d_max)`` in force at training step ``step`` (1-based)."""
        r_lim = 1.0 + (self.r_max - 1.0) * _ramp(step, self.warmup_steps, self.r_max_steps)
        d_lim = self.d_max * _ramp(step, self.warmup_steps, self.d_max_steps)
        return r_lim, d_lim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected 4D input (N, {self.num_features}, H, W), got shape {tuple(x.shape)}")
        if not self.training or x.shape[0] == 0:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        groups = num_groups(name, x.shape[0], self.norm_batch_size)
        kernels = select(self.backend, x.device)
        with torch.no_grad():
            mean, var = kernels.moments(x, groups, True, accumulation_dtype(x.dtype))
            std = (var + self.eps).sqrt()
            step = self.num_batches_tracked + 1
            keep = 1.0 - self.momentum
            mean_seen, mean_after = sequential_ema(self.running_mean, mean, keep)
            var_seen, var_after = sequential_ema(self.running_var, var, keep)
            sigma = (var_seen.to(std.dtype) + self.eps).sqrt()
            r_lim, d_lim = (v.to(std.dtype) for v in self.limits(step))
            r = torch.minimum(torch.maximum(std / sigma, 1.0 / r_lim), r_lim)
            d = torch.minimum(torch.maximum((mean - mean_seen.to(std.dtype)) / sigma, -d_lim), d_lim)
            self.running_mean.copy_(mean_after)
            self.running_var.copy_(var_after)
            self.num_batches_tracked.copy_(step)
        return kernels.normalize(x, self.weight, self.bias, mean, std, r, d, groups, None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}, "
            f"norm_batch_size={self.norm_batch_size}"
        )
