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
from .estimators import BatchStatistics
from .grouping import num_groups
from .normalize import train_step


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
        state = BatchStatistics.State(self.running_mean, self.running_var, self.num_batches_tracked)
        y, _ = train_step(x, self.weight, self.bias, select(self.backend, x.device), BatchStatistics, state,
                          BatchStatistics.Config(self.eps, self.momentum), groups)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm_batch_size={self.norm_batch_size}"
