"""BatchNorm with a normalization batch smaller than the device batch (the paper's BN-b baseline).

``BatchNorm2d(C, norm_batch_size=b)`` cuts a device batch of N into N / b consecutive groups and
normalizes each group with its own statistics, exactly as N / b separate ``nn.BatchNorm2d`` calls
in a row would (running statistics updated after every group). Without ``norm_batch_size`` (or when
b equals the batch) it is ``nn.BatchNorm2d``: same class hierarchy, keys and native kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backends import check_backend, select
from .grouping import accumulation_dtype, group_size, num_groups
from .moving_averages import sequential_ema


def check_norm_batch_size(layer: str, norm_batch_size: Optional[int]) -> None:
    if norm_batch_size is not None and (not isinstance(norm_batch_size, int) or norm_batch_size <= 0):
        raise ValueError(f"{layer}: norm_batch_size must be a positive integer or None, got {norm_batch_size!r}")


class BatchNorm2d(nn.BatchNorm2d):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        norm_batch_size: Optional[int] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        """``backend`` implements the grouped mode (see :mod:`mabn.layers.backends`); without groups this is
        ``nn.BatchNorm2d``'s own kernel."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        check_norm_batch_size(type(self).__name__, norm_batch_size)
        self.norm_batch_size = norm_batch_size
        self.backend = check_backend(backend, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 0:  # e.g. a head that received no RoI: leave every buffer alone
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, not self.track_running_stats, 0.0, self.eps)
        if not self.training or self.norm_batch_size is None or x.shape[0] == self.norm_batch_size:
            return super().forward(x)
        self._check_input_dim(x)
        groups = num_groups(type(self).__name__, x.shape[0], self.norm_batch_size)
        kernels = select(self.backend, x.device)
        with torch.no_grad():
            mean, var = kernels.moments(x, groups, True, accumulation_dtype(x.dtype))
            if self.track_running_stats:
                self._update_running_stats(mean, var, group_size(x, groups))
        return kernels.normalize(x, self.weight, self.bias, mean, (var + self.eps).sqrt(), None, None, groups, None)

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        groups = mean.shape[0]
        unbiased = var * (count / max(count - 1, 1))
        mean, unbiased = mean.to(self.running_mean.dtype), unbiased.to(self.running_var.dtype)
        if self.momentum is None:  # cumulative average over every normalization batch seen, as nn.BatchNorm2d
            seen = self.num_batches_tracked.to(mean.dtype)
            self.running_mean.copy_((self.running_mean * seen + mean.sum(0)) / (seen + groups))
            self.running_var.copy_((self.running_var * seen + unbiased.sum(0)) / (seen + groups))
        else:
            self.running_mean.copy_(sequential_ema(self.running_mean, mean, 1 - self.momentum)[1])
            self.running_var.copy_(sequential_ema(self.running_var, unbiased, 1 - self.momentum)[1])
        self.num_batches_tracked.add_(groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm_batch_size={self.norm_batch_size}"
