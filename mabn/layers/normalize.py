"""The normalization step shared by grouped BN, Batch Renormalization and MABN.

For every normalization batch (group) ``j`` and channel ``c`` the layers decide, outside autograd,
which statistics to use; this module applies them and differentiates through them:

    z = (x - mean_j) / std_j                  (mean_j = 0 for MABN's reduced statistics)
    y = weight * (r_j * z + d_j) + bias       (r, d: renormalization, constants for autograd)

Backward, with ``g = weight * r_j * dy`` (spec, MABN.md):

    g_j   = mean(g)       (only when centered)    Psi_j = mean(g * z)
    dx    = (g - g_bar_j - z * Psi_bar_j) / std_j

where ``(g_bar, Psi_bar)`` are ``(g_j, Psi_j)`` themselves (BN, BRN: the exact gradient) or what a
layer's ``grad_statistics`` callback returns (MABN: their moving averages). With the batch
statistics this is exactly the gradient of batch normalization through ``mean_j`` and ``std_j``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from .grouping import accumulation_dtype, group_mean, per_sample

# (g_mean or None, psi) per group -> (g_bar or None, psi_bar); called once per backward.
GradStatistics = Callable[[Optional[torch.Tensor], torch.Tensor], tuple]


def _per_sample(t: Optional[torch.Tensor], x: torch.Tensor, default: float):
    return default if t is None else per_sample(t, x)


def _per_channel(t: Optional[torch.Tensor], x: torch.Tensor):
    return 1.0 if t is None else t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _normalized(x: torch.Tensor, mean, std) -> torch.Tensor:
    centred = x - per_sample(mean, x) if mean is not None else x
    return centred / per_sample(std, x)


class GroupNormalize(torch.autograd.Function):
    """Reference implementation: the formulas above, one tensor operation at a time."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, std, r, d, groups: int, grad_statistics: Optional[GradStatistics]):
        acc = accumulation_dtype(x.dtype)
        xa = x.to(acc)
        y = _per_sample(r, xa, 1.0) * _normalized(xa, mean, std) + _per_sample(d, xa, 0.0)
        y = _per_channel(weight, xa) * y
        if bias is not None:
            y = y + _per_channel(bias, xa)
        ctx.groups = groups
        ctx.grad_statistics = grad_statistics
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, std, r, d)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, std, r, d = ctx.saved_tensors
        groups = ctx.groups
        acc = accumulation_dtype(x.dtype)
        xa, dya = x.to(acc), dy.to(acc)
        z = _normalized(xa, mean, std)
        g = dya * _per_channel(weight, xa) * _per_sample(r, xa, 1.0)

        psi = group_mean(g * z, groups)
        g_mean = group_mean(g, groups) if mean is not None else None
        if ctx.grad_statistics is not None:
            g_mean, psi = ctx.grad_statistics(g_mean, psi)

        dx = None
        if ctx.needs_input_grad[0]:
            dx = g - z * per_sample(psi, xa)
            if g_mean is not None:
                dx = dx - per_sample(g_mean, xa)
            dx = (dx / per_sample(std, xa)).to(x.dtype)
        dweight = dbias = None
        reduce = [0] + list(range(2, x.dim()))
        if weight is not None and ctx.needs_input_grad[1]:
            y_hat = _per_sample(r, xa, 1.0) * z + _per_sample(d, xa, 0.0)
            dweight = (dya * y_hat).sum(reduce).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = dya.sum(reduce).to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None, None


def group_normalize(x, weight, bias, mean, std, r=None, d=None, groups: int = 1, grad_statistics=None):
    """Apply :class:`GroupNormalize`; ``mean, std, r, d`` are ``(G, C)`` tensors (``mean, r, d`` may be None)."""
    return GroupNormalize.apply(x, weight, bias, mean, std, r, d, groups, grad_statistics)
