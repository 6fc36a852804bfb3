"""Synchronized BatchNorm that also runs on CPU / gloo.

On accelerators the statistics are synchronized by torch's own SyncBatchNorm kernel. ``torch.nn.SyncBatchNorm``
refuses CPU tensors (and DDP refuses it in CPU modules), so this layer is a ``BatchNorm2d`` - same keys as
BN - and on the CPU synchronizes with differentiable all-reduces: every worker contributes sums weighted
by its own sample count (an empty batch contributes nothing but still takes part in the collectives), and
autograd carries the gradient through the reductions exactly like the native kernel. Without a process
group, with one process, or in eval mode it is plain BN.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as _native_sync_batch_norm  # the Function behind nn.SyncBatchNorm

from .functional import check_batch_norm_options
from .misuse import NotScriptable


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


class SyncBatchNorm(NotScriptable, nn.BatchNorm2d):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        check_batch_norm_options(type(self).__name__, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _sync_group(self):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        factor = self._next_average_factor()
        if x.device.type != "cpu":
            return _native_sync_batch_norm.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, factor, group, dist.get_world_size(group)
            )
        return self._cpu_sync_forward(x, group, factor)

    def _next_average_factor(self) -> float:
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum

    def _cpu_sync_forward(self, x: torch.Tensor, group, factor: float) -> torch.Tensor:
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # Two passes (mean, then centred second moment) avoid the cancellation of E[x^2] - E[x]^2.
        sums = torch.cat([xf.sum(dims), xf.new_full((1,), float(x.numel() // channels))])
        sums = _all_reduce(sums, group)
        count = sums[-1].detach()
        shape = [1, channels] + [1] * (x.dim() - 2)
        if count.item() == 0:  # every worker got an empty batch
            return x * self.weight.view(shape) + self.bias.view(shape) if self.affine else x.clone()
        mean = sums[:channels] / count
        centred = xf - mean.view(shape)
        var = _all_reduce((centred * centred).sum(dims), group) / count
        y = centred * (var + self.eps).rsqrt().view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                n = count.item()
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var.detach() * (n / max(n - 1, 1))).to(self.running_var.dtype), factor)
        return y.to(x.dtype)
