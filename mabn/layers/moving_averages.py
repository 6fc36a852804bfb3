"""The two moving averages of the paper, vectorized over the groups of one device batch.

Both take the ``G`` normalization batches of one device batch at once (``(G, C)`` tensors, oldest
first) and return, for every group, the value that a loop over the groups would have produced.
No Python loop over groups and no host synchronisation: everything stays on the device.
"""
from __future__ import annotations

import torch


def sliding_window_mean(window: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Simple moving average (SMA) over the last ``m`` normalization batches.

    ``window``: ``(m, C)``, the ``m`` most recent earlier values, oldest first.
    ``values``: ``(G, C)``, this step's groups in order.
    Returns ``(means, new_window)``: ``means[j]`` is the mean of the ``m`` most recent values once group
    ``j`` has been pushed (group ``j`` included), ``new_window`` the ``m`` most recent values after all groups.
    """
    m = window.shape[0]
    history = torch.cat([window, values.to(window.dtype)], dim=0)  # (m + G, C), oldest first
    # unfold gives the m+G-m+1 windows of length m; window j+1 ends with group j.
    means = history.unfold(0, m, 1)[1:].mean(dim=-1)
    return means, history[-m:]


def sequential_ema(
    average: torch.Tensor, values: torch.Tensor, momentum: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential moving average ``a <- momentum * a + (1 - momentum) * v``, applied once per group.

    ``average``: ``(C,)`` before the first group; ``values``: ``(G, C)``.
    Returns ``(before, after)``: ``before[j]`` is the average that group ``j`` sees (after groups ``0..j-1``),
    ``after`` the average once every group has been folded in. The recurrence is unrolled into a
    ``(G, G)`` lower-triangular weight matrix so that it is one matmul, not a loop.
    """
    groups = values.shape[0]
    dtype, device = average.dtype, average.device
    j = torch.arange(groups + 1, device=device, dtype=dtype)
    k = torch.arange(groups, device=device, dtype=dtype)
    lag = j[:, None] - 1 - k[None, :]  # row j: groups k < j contribute momentum**(j-1-k)
    weights = torch.where(lag >= 0, (1 - momentum) * momentum ** lag.clamp(min=0), torch.zeros((), dtype=dtype, device=device))
    averages = (momentum ** j)[:, None] * average[None, :] + weights @ values.to(dtype)  # (G + 1, C)
    return averages[:-1], averages[-1]
