"""Synchronized BatchNorm that also runs on CPU / gloo.

On accelerators this is ``torch.nn.SyncBatchNorm``. ``torch.nn.SyncBatchNorm`` refuses CPU tensors,
so on the CPU the statistics are synchronized here with differentiable all-reduces: every worker
contributes sums weighted by its own sample count (an empty batch contributes nothing but still takes
part in the collectives), and autograd carries the gradient through the reductions exactly like the
native kernel. Without a process group, or with one process, it is plain BN.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


class SyncBatchNorm(nn.SyncBatchNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        needs_sync = self.training and group is not None and dist.get_world_size(group) > 1
        if not needs_sync or x.device.type != "cpu":
            return super().forward(x)
        self._check_input_dim(x)
        return self._cpu_sync_forward(x, group)

    def _cpu_sync_forward(self, x: torch.Tensor, group) -> torch.Tensor:
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        local_count = x.numel() // channels
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # Two passes (mean, then centred second moment) avoid the cancellation of E[x^2] - E[x]^2.
        sums = torch.cat([xf.sum(dims), xf.new_full((1,), float(local_count))])
        sums = _all_reduce(sums, group)
        count = sums[-1].detach()
        if count.item() == 0:  # every worker got an empty batch
            return self._affine(x)
        mean = sums[:channels] / count
        shape = [1, channels] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = _all_reduce((centred * centred).sum(dims), group) / count
        y = centred * (var + self.eps).rsqrt().view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), int(count.item()))
        return y.to(x.dtype)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        if not self.affine:
            return x.clone()
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
