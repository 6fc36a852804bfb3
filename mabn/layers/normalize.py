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

from .grouping import accumulation_dtype, expand_stat, reduce_dims, split_groups

# (g_mean or None, psi) per group -> (g_bar or None, psi_bar); called once per backward.
GradStatistics = Callable[[Optional[torch.Tensor], torch.Tensor], tuple]


def _view(t: Optional[torch.Tensor], like: torch.Tensor, default: float):
    return default if t is None else expand_stat(t, like)


def _channel_view(t: Optional[torch.Tensor], like: torch.Tensor):
    if t is None:
        return 1.0
    return t.reshape(1, 1, -1, *([1] * (like.dim() - 3)))


class GroupNormalize(torch.autograd.Function):
    """Reference implementation: the formulas above, one tensor operation at a time."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, std, r, d, groups: int, grad_statistics: Optional[GradStatistics]):
        acc = accumulation_dtype(x.dtype)
        xg = split_groups(x, groups).to(acc)
        z = xg - _view(mean, xg, 0.0) if mean is not None else xg
        z = z / expand_stat(std, xg)
        y = _view(r, xg, 1.0) * z + _view(d, xg, 0.0)
        y = _channel_view(weight, xg) * y + (_channel_view(bias, xg) if bias is not None else 0.0)
        ctx.groups = groups
        ctx.grad_statistics = grad_statistics
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, std, r, d)
        return y.flatten(0, 1).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, std, r, d = ctx.saved_tensors
        acc = accumulation_dtype(x.dtype)
        xg = split_groups(x, ctx.groups).to(acc)
        dyg = split_groups(dy, ctx.groups).to(acc)
        dims = reduce_dims(xg)
        std_v = expand_stat(std, xg)
        z = (xg - _view(mean, xg, 0.0) if mean is not None else xg) / std_v
        g = dyg * _channel_view(weight, xg) * _view(r, xg, 1.0)

        psi = (g * z).mean(dims)
        g_mean = g.mean(dims) if mean is not None else None
        if ctx.grad_statistics is not None:
            g_mean, psi = ctx.grad_statistics(g_mean, psi)

        dx = None
        if ctx.needs_input_grad[0]:
            dx = g - z * expand_stat(psi, xg)
            if g_mean is not None:
                dx = dx - expand_stat(g_mean, xg)
            dx = (dx / std_v).flatten(0, 1).to(x.dtype)
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            y_hat = _view(r, xg, 1.0) * z + _view(d, xg, 0.0)
            dweight = (dyg * y_hat).sum(dims).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            dbias = dyg.sum(dims).sum(0).to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None, None


def group_normalize(x, weight, bias, mean, std, r=None, d=None, groups: int = 1, grad_statistics=None):
    """Apply :class:`GroupNormalize`; ``mean, std, r, d`` are ``(G, C)`` tensors (``mean, r, d`` may be None)."""
    return GroupNormalize.apply(x, weight, bias, mean, std, r, d, groups, grad_statistics)
