"""BatchNorm with a normalization batch smaller than the device batch (the paper's BN-b baseline).

``BatchNorm2d(C, norm_batch_size=b)`` cuts a device batch of N into N / b consecutive groups and
normalizes each group with its own statistics, exactly as N / b separate ``nn.BatchNorm2d`` calls
in a row would. ``running_stats_update`` says when the running statistics take the groups in:
``"per_group"`` (default) after every group, as those N / b calls would (``momentum`` applied N / b times a
step); ``"per_step"`` once per training step with the mean of the N / b group statistics (``momentum``
applied once a step, as for BN at b = N). The paper rows use ``per_step`` (docs/algorithm.md, section 6).
Without ``norm_batch_size`` (or when b equals the batch) it is ``nn.BatchNorm2d``: same class hierarchy,
keys and native kernels, and the option changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (BatchStatistics, check_batch_norm_options, check_norm_batch_size, check_running_stats_update,
                         num_groups, train_step)
from .fused import check_backend, select
from .nonfinite import SkipWarning, register_counter
from .misuse import NotScriptable

class BatchNorm2d(NotScriptable, nn.BatchNorm2d):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        norm_batch_size: Optional[int] = None,
        running_stats_update: str = "per_group",
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        """``backend`` implements the grouped mode (see :mod:`mabn.layers.fused`); without groups this is
        ``nn.BatchNorm2d``'s own kernel."""
        name = type(self).__name__
        check_batch_norm_options(name, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        check_norm_batch_size(name, norm_batch_size)
        self.norm_batch_size = norm_batch_size
        check_running_stats_update(name, running_stats_update)
        self.running_stats_update = running_stats_update
        self.backend = check_backend(backend, name)
        register_counter(self, device)
        self._skip_warning = SkipWarning()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 0:  # e.g. a head that received no RoI: leave every buffer alone
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, not self.track_running_stats, 0.0, self.eps)
        if not self.training or self.norm_batch_size is None or x.shape[0] == self.norm_batch_size:
            return super().forward(x)
        self._check_input_dim(x)
        groups = num_groups(type(self).__name__, x.shape[0], self.norm_batch_size)
        state = BatchStatistics.State(
            running_mean=self.running_mean, running_var=self.running_var, num_batches_tracked=self.num_batches_tracked,
            num_nonfinite_skipped=self.num_nonfinite_skipped,
        )
        config = BatchStatistics.Config(eps=self.eps, momentum=self.momentum, running_stats_update=self.running_stats_update)
        y, _ = train_step(x, self.weight, self.bias, select(self.backend, x.device), BatchStatistics, state, config, groups)
        self._skip_warning.after_training_forward(self, f"{type(self).__name__}({self.num_features}, norm_batch_size={self.norm_batch_size})")
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", norm_batch_size={self.norm_batch_size}, running_stats_update={self.running_stats_update}"
