"""``mabn.update_bn(loader, model)``: recompute every norm's inference statistics from data, the way each keeps them.

``torch.optim.swa_utils.update_bn`` (after SWA, or after changing the data) only knows
``nn.modules.batchnorm._BatchNorm``: it leaves MABN and BRN alone. This one runs the model over ``loader`` in
training mode under ``torch.no_grad()`` (so every layer sees the activations it sees in training) and sets each
norm's inference statistics to the plain average, over all normalization batches, of what that norm tracks:

* BN (``_BatchNorm``, SyncBN, grouped BN): mean and unbiased variance, as ``nn.BatchNorm2d`` with ``momentum=None``;
* BRN: mean and biased variance (its running averages track the biased one);
* MABN: the second moment ``chi^2 = mean(x^2)`` with reduced statistics, else mean and biased variance
  (MABN's ``nu`` tracks these, through the forward SMA).

Everything else a training forward changes (MABN's SMA windows and step counters, BRN's and BN's step counts,
the parameters are not touched anyway) is restored afterwards: only the inference statistics move. Statistics
are per process (as torch's update_bn); average them over ranks afterwards if ranks saw different data.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .layers.batch_renorm import BatchRenorm2d
from .layers.moving_average_bn import MovingAverageBatchNorm
from .layers.registry import learns_running_statistics


def _tracked(norm: nn.Module) -> tuple[bool, bool]:
    """``(centered, unbiased)``: which statistics ``norm``'s inference buffers hold."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return True, True
    if isinstance(norm, BatchRenorm2d):
        return True, False
    if isinstance(norm, MovingAverageBatchNorm):
        return not norm.reduced_stats, False
    raise TypeError(
        f"mabn.update_bn: does not know which statistics a {type(norm).__name__} keeps; "
        "extend mabn.inference_statistics._tracked for it"
    )


class _Average:
    """Sums of the per-normalization-batch statistics of one norm's inputs."""

    def __init__(self, norm: nn.Module):
        self.centered, self.unbiased = _tracked(norm)
        self.group_size = getattr(norm, "norm_batch_size", None)
        self.mean = self.var = None
        self.batches = 0

    def __call__(self, module, inputs):
        x = inputs[0]
        if x.shape[0] == 0:
            return
        b = self.group_size or x.shape[0]
        xg = x.detach().double().unflatten(0, (x.shape[0] // b, b)).transpose(1, 2).flatten(2)  # (G, C, values)
        count = xg.shape[-1]
        if self.centered:
            mean = xg.mean(-1)
            var = ((xg - mean[..., None]) ** 2).mean(-1)
            if self.unbiased:
                var = var * (count / max(count - 1, 1))
        else:
            mean, var = torch.zeros_like(xg[..., 0]), (xg * xg).mean(-1)
        self.mean = mean.sum(0) if self.mean is None else self.mean + mean.sum(0)
        self.var = var.sum(0) if self.var is None else self.var + var.sum(0)
        self.batches += xg.shape[0]


@torch.no_grad()
def update_bn(loader: Iterable, model: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
    """Recompute the inference statistics of every norm in ``model`` that learns them from batches (BN, SyncBN,
    BRN, MABN) from one pass over ``loader``; the other state is unchanged. Items of ``loader`` are inputs, or
    lists / tuples whose first element is the input (as for ``torch.optim.swa_utils.update_bn``). Returns ``model``."""
    norms = [m for m in model.modules() if learns_running_statistics(m)]
    if not norms:
        return model
    averages = {norm: _Average(norm) for norm in norms}
    saved = {norm: {k: v.clone() for k, v in norm.named_buffers(recurse=False) if v is not None} for norm in norms}
    modes = {m: m.training for m in model.modules()}
    hooks = [norm.register_forward_pre_hook(average) for norm, average in averages.items()]
    try:
        model.train()
        for item in loader:
            x = item[0] if isinstance(item, (list, tuple)) else item
            model(x.to(device) if device is not None else x)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.train(training)
        for norm, buffers in saved.items():
            for name, value in buffers.items():
                getattr(norm, name).copy_(value)
    for norm, average in averages.items():
        if average.batches == 0:
            continue
        norm.running_var.copy_(average.var / average.batches)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(average.mean / average.batches)
    return model
