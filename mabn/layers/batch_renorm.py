"""Batch Renormalization (Ioffe, 2017), the paper's main small-batch baseline.

Training, per normalization batch: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta`` with
``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``,
both constants for autograd, ``mu, sigma`` the running averages. ``r_max`` grows linearly from 1 and
``d_max`` from 0, starting after ``warmup_steps`` training steps and reaching their final values at
``r_max_steps`` / ``d_max_steps`` (Ioffe: 5k, 40k, 25k). Inference: ``(x - mu) / sigma``, like BN.
With ``norm_batch_size`` b < N, ``running_stats_update`` says when ``mu, sigma`` take the N / b groups in:
``"per_group"`` (default) after every group, so that group j is corrected towards averages holding groups
0..j-1; ``"per_step"`` once per step with the groups' mean, every group corrected towards the averages before
the step. The paper rows use ``per_step`` (docs/algorithm.md, section 6).
The buffers carry ``nn.BatchNorm2d``'s names, so BN checkpoints load into BRN models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import RenormStatistics, check_norm_batch_size, check_running_stats_update, num_groups, train_step
from .fused import check_backend, select
from .nonfinite import SkipWarning, register_counter
from .misuse import NotScriptable


class BatchRenorm2d(NotScriptable, nn.Module):
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
        running_stats_update: str = "per_group",
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        """``momentum``: update rate of the running averages (``nn.BatchNorm2d`` convention; Ioffe's alpha).
        ``backend``: see :mod:`mabn.layers.fused`."""
        super().__init__()
        name = type(self).__name__
        check_norm_batch_size(name, norm_batch_size)
        check_running_stats_update(name, running_stats_update)
        self.backend = check_backend(backend, name)
        if not (r_max >= 1 and d_max >= 0 and eps > 0):
            raise ValueError(f"{name}: need r_max >= 1, d_max >= 0 and eps > 0, got r_max={r_max}, d_max={d_max}, eps={eps}")
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
        self.running_stats_update = running_stats_update
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
        register_counter(self, device)
        self._skip_warning = SkipWarning()

    def _config(self) -> RenormStatistics.Config:
        return RenormStatistics.Config(
            eps=self.eps, momentum=self.momentum, r_max=self.r_max, d_max=self.d_max, warmup_steps=self.warmup_steps,
            r_max_steps=self.r_max_steps, d_max_steps=self.d_max_steps, running_stats_update=self.running_stats_update,
        )

    def limits(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_max, d_max)`` in force at training step ``step`` (1-based)."""
        return RenormStatistics.limits(step, self._config())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected 4D input (N, {self.num_features}, H, W), got shape {tuple(x.shape)}")
        if not self.training or x.shape[0] == 0:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        groups = num_groups(name, x.shape[0], self.norm_batch_size)
        state = RenormStatistics.State(
            running_mean=self.running_mean, running_var=self.running_var, num_batches_tracked=self.num_batches_tracked,
            num_nonfinite_skipped=self.num_nonfinite_skipped,
        )
        y, _ = train_step(x, self.weight, self.bias, select(self.backend, x.device), RenormStatistics, state, self._config(), groups)
        self._skip_warning.after_training_forward(self, f"{name}({self.num_features})")
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}, "
            f"norm_batch_size={self.norm_batch_size}, running_stats_update={self.running_stats_update}"
        )
