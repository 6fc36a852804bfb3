"""Cutting a device batch into consecutive normalization batches (groups of b samples).

Every normalization layer of this package that accepts ``norm_batch_size`` sees its input
``(N, C, *spatial)`` as ``(G, b, C, *spatial)`` with ``G = N // b`` groups. Per-group,
per-channel quantities are ``(G, C)`` tensors; :func:`per_sample` repeats them for the samples
of each group. The reference kernels (``normalize.py``) use these helpers; the fused ones
(``fused.py``) do the same inside their compiled graphs.
"""
from __future__ import annotations

import torch


def num_groups(layer_name: str, batch_size: int, norm_batch_size: int | None) -> int:
    """Number of normalization batches in a device batch; a clear error when b does not divide N."""
    if norm_batch_size is None:
        return 1
    if batch_size % norm_batch_size != 0:
        raise ValueError(
            f"{layer_name}: a batch of {batch_size} samples cannot be cut into normalization batches of "
            f"norm_batch_size={norm_batch_size}; norm_batch_size must divide the batch size"
        )
    return batch_size // norm_batch_size


def split_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C, *S)`` -> ``(G, N // G, C, *S)``, a view for any memory format (channels_last included)."""
    return x.unflatten(0, (groups, x.shape[0] // groups))


def reduce_dims(grouped: torch.Tensor) -> tuple[int, ...]:
    """Dimensions of a grouped tensor that one normalization batch reduces over: samples and space."""
    return (1,) + tuple(range(3, grouped.dim()))


def expand_stat(stat: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    """``(G, C)`` -> ``(G, 1, C, 1, ...)``, broadcastable against ``grouped``."""
    return stat.reshape(stat.shape[0], 1, stat.shape[1], *([1] * (grouped.dim() - 3)))


def per_sample(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(G, C)`` -> ``(N, C, 1, ...)``: each group's value repeated for its samples, broadcastable against
    the ungrouped ``x`` (so that outputs are computed on ``x`` itself, not on a grouped view of it)."""
    samples = stat.repeat_interleave(x.shape[0] // stat.shape[0], dim=0) if stat.shape[0] > 1 else stat
    return samples.reshape(samples.shape[0], samples.shape[1], *([1] * (x.dim() - 2)))


def group_mean(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group, per-channel mean of ``t`` (N, C, *S) -> (G, C)."""
    grouped = split_groups(t, groups)
    return grouped.mean(reduce_dims(grouped))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32 at least (float64 inputs keep float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_moments(x: torch.Tensor, groups: int, centered: bool, dtype: torch.dtype):
    """Per-group, per-channel ``(mean, second moment)`` in ``dtype``.

    ``centered=True``: the biased variance around the group mean (BN).
    ``centered=False``: the quadratic mean ``chi^2 = mean(x^2)``; ``mean`` is ``None`` (MABN's reduced statistic).
    """
    xg = split_groups(x, groups).to(dtype)
    dims = reduce_dims(xg)
    if not centered:
        return None, (xg * xg).mean(dims)
    mean = xg.mean(dims)
    centered_x = xg - expand_stat(mean, xg)
    return mean, (centered_x * centered_x).mean(dims)


def group_size(x: torch.Tensor, groups: int) -> int:
    """Number of values one normalization batch reduces over (samples x spatial positions)."""
    return x.numel() // (groups * x.shape[1]) if x.numel() else 0
