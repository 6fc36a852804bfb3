"""The fused backend: a training step in two compiled graphs, as fast as BatchNorm's own kernels.

The reference backend (``normalize.py``) applies the formulas one tensor operation at a time: several
passes over the activations, as many temporaries, and dozens of small eager operations for the
estimator. Here each direction of a training step is one ``torch.compile`` graph (C++/OpenMP on the
CPU, Triton on CUDA; dynamic shapes, so every layer and batch size shares it) whose heavy part is two
memory-bound passes, as in BatchNorm itself, and whose estimator arithmetic on ``(G, C)`` tensors is
fused around them:

* forward:  per (sample, channel) sums of x^2 (or mean and centred second moment) -> estimator ->
  ``y = x * A + B``;
* backward: per (sample, channel) sums of dy and dy * (x - mean) -> estimator -> ``dx = dy * a + x * b + c``.

With ``k = weight * r / std`` and M values per normalization batch, the reference backward rearranges to

    Psi = k * sum(dy * (x - mean)) / M        g = weight * r * sum(dy) / M
    dx  = k * dy - Psi_bar / std^2 * (x - mean) - g_bar / std

``tests/test_fused.py`` holds the two backends together.
"""
from __future__ import annotations

from typing import Optional

import torch

from .estimators import Plan
from .grouping import accumulation_dtype

# Each graph is specialized per estimator, configuration, input rank, dtype and memory format (a few dozen
# variants in a process mixing 1d/2d/3d layers and precisions); dynamo's default of 8 per function is too low.
_RECOMPILE_LIMIT = 64
_GRAPHS: dict = {}


def _compiled(fn):
    graph = _GRAPHS.get(fn)
    if graph is None:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        graph = _GRAPHS[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return graph


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _rows(x: torch.Tensor) -> torch.Tensor:
    # (N, C) inputs (MABN1d on features) become (N, C, 1): every pass reduces over dims 2 and up.
    return x.unsqueeze(-1) if x.dim() == 2 else x


def _per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], *([1] * (like.dim() - 2)))


def _per_sample(t: torch.Tensor, samples_per_group) -> torch.Tensor:
    """(G, C) per normalization batch -> (N, C) per sample."""
    groups, channels = t.shape
    return t[:, None, :].expand(groups, samples_per_group, channels).reshape(groups * samples_per_group, channels)


def _group_sum(rows: torch.Tensor, groups) -> torch.Tensor:
    """(N, C) per sample -> (G, C) summed over each normalization batch."""
    return rows.view(groups, rows.shape[0] // groups, rows.shape[1]).sum(1)


def _moments(x: torch.Tensor, groups, centered: bool):
    """Per-group ``(mean or None, biased second moment, values per group)``, from per-row sums."""
    xr = _rows(x)
    n, c = xr.shape[:2]
    per_row = xr.numel() // (n * c)
    count = (n // groups) * per_row
    dims = tuple(range(2, xr.dim()))
    xa = _acc(xr)
    if not centered:
        return None, _group_sum((xa * xa).sum(dims), groups) / count, count
    row_mean = xa.mean(dims)
    centred = xa - _per_row(row_mean, xa)
    row_m2 = (centred * centred).sum(dims)
    means = row_mean.view(groups, n // groups, c)
    mean = means.mean(1)
    # Chan et al.'s pairwise combination of the rows' moments: exact, no E[x^2] - E[x]^2 cancellation.
    m2 = _group_sum(row_m2, groups) + per_row * ((means - mean[:, None]) ** 2).sum(1)
    return mean, m2 / count, count


def _scale_and_shift(weight, bias, plan: Plan, acc: torch.dtype):
    """(G, C) coefficients of ``y = x * A + B``."""
    inv_std = 1.0 / plan.std.to(acc)
    k = inv_std if weight is None else weight.to(acc) * inv_std
    wr_d = None
    if plan.r is not None:
        k = k * plan.r.to(acc)
    shift = -k * plan.mean.to(acc) if plan.mean is not None else torch.zeros_like(k)
    if plan.d is not None:
        wr_d = plan.d.to(acc) if weight is None else weight.to(acc) * plan.d.to(acc)
        shift = shift + wr_d
    if bias is not None:
        shift = shift + bias.to(acc)
    return k, shift


def _apply(x, weight, bias, plan: Plan, groups):
    xr = _rows(x)
    b = xr.shape[0] // groups
    k, shift = _scale_and_shift(weight, bias, plan, accumulation_dtype(x.dtype))
    y = _acc(xr) * _per_row(_per_sample(k, b), xr) + _per_row(_per_sample(shift, b), xr)
    return y.to(x.dtype).view_as(x)


def _forward(estimator, x, weight, bias, state, cfg, groups):
    mean, var, count = _moments(x, groups, estimator.centered(cfg))
    plan = estimator.forward(mean, var, count, state, cfg)
    return _apply(x, weight, bias, plan, groups), plan


def _backward(estimator, dy, x, weight, plan: Plan, state, cfg, groups, needs_grad, bias_dtype):
    acc = accumulation_dtype(x.dtype)
    xr, dyr = _rows(x), _rows(dy)
    n, c = xr.shape[:2]
    b = n // groups
    count = b * (xr.numel() // (n * c))
    dims = tuple(range(2, xr.dim()))
    d, xa = _acc(dyr), _acc(xr)
    std = plan.std.to(acc)
    center = None if plan.mean is None else plan.mean.to(acc)
    centred = xa if center is None else xa - _per_row(_per_sample(center, b), xr)
    sdy = _group_sum(d.sum(dims), groups)
    sdyz = _group_sum((d * centred).sum(dims), groups)  # sum(dy * (x - mean)) per group
    wr = torch.ones_like(std) if weight is None else weight.to(acc).expand_as(std)
    if plan.r is not None:
        wr = wr * plan.r.to(acc)
    k = wr / std
    psi = k * sdyz / count
    g_mean = wr * sdy / count if center is not None else None
    g_mean, psi = estimator.backward(g_mean, psi, plan, state, cfg)

    dx = dweight = dbias = None
    if needs_grad[0]:
        slope = -psi.to(acc) / (std * std)  # coefficient of x
        out = d * _per_row(_per_sample(k, b), xr) + xa * _per_row(_per_sample(slope, b), xr)
        if center is not None:
            offset = -slope * center - g_mean.to(acc) / std
            out = out + _per_row(_per_sample(offset, b), xr)
        dx = out.to(x.dtype).view_as(x)
    if weight is not None and needs_grad[1]:
        y_hat_sums = sdyz / std if plan.r is None else plan.r.to(acc) * sdyz / std
        if plan.d is not None:
            y_hat_sums = y_hat_sums + plan.d.to(acc) * sdy
        dweight = y_hat_sums.sum(0).to(weight.dtype)
    if needs_grad[2]:
        dbias = sdy.sum(0).to(bias_dtype)
    return dx, dweight, dbias


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # dynamo gives nn.Parameters static shapes (force_parameter_static_shapes): a parameter passed as is would
    # specialize the graph to its channel count and recompile it for every layer width.
    return None if t is None else t.detach()


def forward(estimator, x, weight, bias, state, cfg, groups):
    return _compiled(_forward)(estimator, x, _plain(weight), _plain(bias), state, cfg, groups)


def apply(x, weight, bias, plan: Plan, groups):
    return _compiled(_apply)(x, _plain(weight), _plain(bias), plan, groups)


def backward(estimator, dy, x, weight, plan, state, cfg, groups, needs_grad, bias_dtype):
    return _compiled(_backward)(estimator, dy, x, _plain(weight), plan, state, cfg, groups, needs_grad, bias_dtype)


def moments(x: torch.Tensor, groups: int, centered: bool):
    """``(mean or None, var)`` per normalization batch, as the fused forward computes them (for tests)."""
    mean, var, _ = _compiled(_moments)(x, groups, centered)
    return mean, var
