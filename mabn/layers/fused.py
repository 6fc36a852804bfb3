"""Fused kernels of the normalization step: as fast as BatchNorm's, on the CPU and on CUDA.

The reference path (``normalize.py``) applies the spec's formulas one tensor operation at a time:
several passes over the activations and as many temporaries. Here the same step is four memory-bound
kernels, as in BatchNorm itself, compiled by ``torch.compile`` (C++/OpenMP on the CPU, Triton on CUDA)
with dynamic shapes, so that every layer and batch size shares them:

* forward:  per (sample, channel) sums of x^2 (or mean and centred second moment), then ``y = x * A + B``;
* backward: per (sample, channel) sums of dy and dy * (x - mean), then ``dx = dy * a + x * b + c``.

Everything between (combining the samples of a normalization batch, the layer's statistics logic,
the per-channel coefficients) works on ``(N, C)`` or ``(G, C)`` tensors. In closed form, with
``k = weight * r / std``:

    Psi = k * sum(dy * (x - mean)) / M        g = weight * r * sum(dy) / M        (M values per group)
    dx  = k * dy - Psi_bar / std^2 * (x - mean) - g_bar / std

which is the reference backward rearranged; ``tests/test_fused.py`` holds the two paths together.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .grouping import accumulation_dtype


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], *([1] * (like.dim() - 2)))


def _row_moments(x: torch.Tensor, centered: bool):
    dims = tuple(range(2, x.dim()))
    xa = _acc(x)
    if not centered:
        return None, (xa * xa).sum(dims)
    mean = xa.mean(dims, keepdim=True)
    centred = xa - mean
    return mean.flatten(1), (centred * centred).sum(dims)


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return (_acc(x) * _per_row(scale, x) + _per_row(shift, x)).to(x.dtype)


def _grad_sums(dy: torch.Tensor, x: torch.Tensor, center: Optional[torch.Tensor]):
    dims = tuple(range(2, x.dim()))
    d = _acc(dy)
    xa = _acc(x) if center is None else _acc(x) - _per_row(center, x)
    return d.sum(dims), (d * xa).sum(dims)


def _grad_affine(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
    out = _acc(dy) * _per_row(a, x) + _acc(x) * _per_row(b, x)
    if c is not None:
        out = out + _per_row(c, x)
    return out.to(x.dtype)


_KERNELS = {}
# Each kernel is specialized per input rank, dtype, memory format and optional argument (up to a few
# dozen variants in a mixed 1d/2d/3d, fp32/bf16/fp64 process); dynamo's default of 8 per function is too low.
_RECOMPILE_LIMIT = 64


def _kernel(fn):
    """``fn`` compiled on first use (dynamic shapes: one kernel for every layer, batch and image size)."""
    compiled = _KERNELS.get(fn)
    if compiled is None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        compiled = _KERNELS[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return compiled


def _rows(x: torch.Tensor) -> torch.Tensor:
    # (N, C) inputs (MABN1d on features) become (N, C, 1): every kernel reduces over dims 2 and up.
    return x.unsqueeze(-1) if x.dim() == 2 else x


def _expand(t: Optional[torch.Tensor], samples_per_group: int) -> Optional[torch.Tensor]:
    """(G, C) per normalization batch -> (N, C) per sample."""
    if t is None or samples_per_group == 1:
        return t
    return t.repeat_interleave(samples_per_group, dim=0)


def group_moments(x: torch.Tensor, groups: int, centered: bool, dtype: torch.dtype):
    """Same contract as :func:`mabn.layers.grouping.group_moments`, from one fused pass per moment."""
    x = _rows(x)
    n, c = x.shape[:2]
    b = n // groups
    count = x.numel() // (n * c)
    row_mean, row_m2 = _kernel(_row_moments)(x, centered)
    if not centered:
        return None, (row_m2.view(groups, b, c).sum(1) / (b * count)).to(dtype)
    means = row_mean.view(groups, b, c)
    mean = means.mean(1)
    # Chan et al.'s pairwise combination: exact, no E[x^2] - E[x]^2 cancellation.
    m2 = row_m2.view(groups, b, c).sum(1) + count * ((means - mean[:, None]) ** 2).sum(1)
    return mean.to(dtype), (m2 / (b * count)).to(dtype)


class FusedGroupNormalize(torch.autograd.Function):
    """:class:`~mabn.layers.normalize.GroupNormalize` with fused kernels; same inputs, same results."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, std, r, d, groups: int, grad_statistics):
        acc = accumulation_dtype(x.dtype)
        xr = _rows(x)
        n, c = xr.shape[:2]
        b = n // groups
        inv_std = 1.0 / std.to(acc)
        w = weight.to(acc) if weight is not None else torch.ones((), dtype=acc, device=x.device)
        k = w * inv_std if r is None else w * r.to(acc) * inv_std  # (G, C): dy_hat -> z scale
        shift = -k * mean.to(acc) if mean is not None else torch.zeros_like(k)
        if d is not None:
            shift = shift + w * d.to(acc)
        if bias is not None:
            shift = shift + bias.to(acc)
        y = _kernel(_affine)(xr, _expand(k, b), _expand(shift, b)).view_as(x)
        ctx.groups, ctx.grad_statistics = groups, grad_statistics
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, std, r, d)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, std, r, d = ctx.saved_tensors
        acc = accumulation_dtype(x.dtype)
        xr, dyr = _rows(x), _rows(dy)
        n, c = xr.shape[:2]
        groups = ctx.groups
        b = n // groups
        count = b * (xr.numel() // (n * c))  # values per normalization batch
        std = std.to(acc)
        center = mean.to(acc) if mean is not None else None
        sdy_rows, sdyz_rows = _kernel(_grad_sums)(dyr, xr, _expand(center, b))
        sdy = sdy_rows.view(groups, b, c).sum(1)
        sdyz = sdyz_rows.view(groups, b, c).sum(1)  # sum(dy * (x - mean)) per group
        w = weight.to(acc) if weight is not None else torch.ones((), dtype=acc, device=x.device)
        wr = w if r is None else w * r.to(acc)
        k = wr / std
        psi = k * sdyz / count
        g_mean = wr * sdy / count if mean is not None else None
        if ctx.grad_statistics is not None:
            g_mean, psi = ctx.grad_statistics(g_mean, psi)
            psi = psi.to(acc)
            g_mean = None if g_mean is None else g_mean.to(acc)

        dx = None
        if ctx.needs_input_grad[0]:
            slope = -psi / (std * std)  # coefficient of x
            offset = None
            if center is not None:
                offset = -slope * center - g_mean / std
            dx = _kernel(_grad_affine)(dyr, xr, _expand(k, b), _expand(slope, b), _expand(offset, b)).view_as(x)
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            y_hat_sums = sdyz / std if r is None else r.to(acc) * sdyz / std
            if d is not None:
                y_hat_sums = y_hat_sums + d.to(acc) * sdy
            dweight = y_hat_sums.sum(0).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            dbias = sdy.sum(0).to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None, None, None
