"""The training step of MABN, in the order of the paper, and of the two baselines that share it (grouped BN, BRN).

Read it beside ``docs/algorithm.md``; the section numbers below are that document's. Top to bottom:

1. normalization batches: a device batch ``(N, C, ...)`` seen as ``G = N / b`` consecutive groups (section 6);
2. what an estimator hands the step (:class:`Plan`) and what an estimator is (:class:`Estimator`);
3. MABN's statistics (sections 3, 4, 5, 7, 8): forward statistic chi^2, its SMA, the renormalization
   factor r, the EMA nu for inference; backward the SMA of Psi;
4. grouped BN and Batch Renormalization as estimators of the same step (section 10);
5. the reference step: moments -> estimator -> ``y``; backward ``Psi`` -> estimator -> ``dx`` (sections 4-5);
6. :class:`TrainStep`, the autograd Function every layer of this package trains through.

Per normalization batch (group) ``j`` and channel, an estimator turns the batch's moments into a
:class:`Plan`, and the step computes

    z = (x - mean_j) / std_j                  (mean_j = 0 for MABN's reduced statistics)
    y = weight * (r_j * z + d_j) + bias       (r, d: renormalization, constants for autograd)

and backward, with ``g = weight * r_j * dy``:

    g_j = mean(g) (centered only),   Psi_j = mean(g * z),   (g_bar, Psi_bar) = estimator.backward(g_j, Psi_j)
    dx  = (g - g_bar_j - z * Psi_bar_j) / std_j

With the batch's own statistics (BN, BRN: the estimator returns them unchanged) this is exactly the gradient
of batch normalization through ``mean_j`` and ``std_j``; MABN substitutes moving averages. Estimators touch
only ``(G, C)`` / ``(m, C)`` tensors, never the activations, and never wait for an accelerator, so the
fused backend (:mod:`mabn.layers.fused`, the same formulas rearranged into compiled graphs) runs them too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
from torch.autograd.function import once_differentiable


# ============================================================================ 1. normalization batches
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


def check_norm_batch_size(layer: str, norm_batch_size: Optional[int]) -> None:
    if norm_batch_size is not None and (not isinstance(norm_batch_size, int) or norm_batch_size <= 0):
        raise ValueError(f"{layer}: norm_batch_size must be a positive integer or None, got {norm_batch_size!r}")


def check_batch_norm_options(layer: str, eps: float, momentum: Optional[float]) -> None:
    """``nn.BatchNorm2d`` takes any number; a momentum outside [0, 1] makes the running statistics diverge."""
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{layer}: momentum (update rate of the running statistics) must be in [0, 1] or None, got {momentum}")
    if not eps > 0:
        raise ValueError(f"{layer}: eps must be positive, got {eps}")


# When grouped BN and BRN fold a step's normalization batches into their running statistics (docs/algorithm.md,
# section 6): "per_group" after every normalization batch, in order, as G separate nn.BatchNorm2d calls would;
# "per_step" once per training step, with the mean over the step's G normalization batches of their statistics.
RUNNING_STATS_UPDATES = ("per_group", "per_step")


def check_running_stats_update(layer: str, running_stats_update: str) -> None:
    if running_stats_update not in RUNNING_STATS_UPDATES:
        raise ValueError(
            f"{layer}: running_stats_update must be one of {', '.join(RUNNING_STATS_UPDATES)}, got {running_stats_update!r}"
        )


def running_stats_values(values: torch.Tensor, running_stats_update: str) -> torch.Tensor:
    """The ``(G, C)`` group statistics as the running averages take them in: all ``G`` in order, or their mean."""
    return values if running_stats_update == "per_group" else values.mean(0, keepdim=True)


def split_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(N, C, *S)`` -> ``(G, N // G, C, *S)``, a view for any memory format (channels_last included).

    ``view`` splitting the outermost dimension, not ``Tensor.unflatten`` (the same view with ~2 us more Python per
    call: the fused backend makes five per training step)."""
    return x.view(groups, x.shape[0] // groups, *x.shape[1:])


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


def group_size(x: torch.Tensor, groups: int) -> int:
    """Number of values one normalization batch reduces over (samples x spatial positions)."""
    return x.numel() // (groups * x.shape[1]) if x.numel() else 0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float32 at least (float64 inputs keep float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ============================================================================ 2. plans and estimators
class Plan(NamedTuple):
    """Per normalization batch (G, C): ``z = (x - mean) / std``, ``y = weight * (r * z + d) + bias``."""

    mean: Optional[torch.Tensor]  # None: no centering (MABN's reduced statistics)
    std: torch.Tensor
    r: Optional[torch.Tensor] = None
    d: Optional[torch.Tensor] = None
    backward_sma: Optional[torch.Tensor] = None  # (G,) bool, MABN only: use the SMA of (g, Psi)


class Estimator(Protocol):
    """Which statistics a layer type normalizes with, and how its state evolves: the whole state machine of
    one layer type. ``State`` holds the layer's buffers (updated in place), ``Config`` its constants."""

    State: type
    Config: type

    @staticmethod
    def centered(cfg) -> bool:
        """Whether the step subtracts a mean (False: MABN's reduced statistics)."""

    @staticmethod
    def forward(mean: Optional[torch.Tensor], var: torch.Tensor, count: int, state, cfg) -> Plan:
        """Each group's moments ``(G, C)`` (``mean`` None when not centered; ``count`` values per group) ->
        the plan the step normalizes with; advances the state by one training step."""

    @staticmethod
    def backward(grad_mean: Optional[torch.Tensor], psi: torch.Tensor, plan: Plan, state, cfg) -> tuple:
        """Each group's backward statistics ``(g or None, Psi)`` -> those that ``dx`` uses."""


# ============================================================================ 3. MABN's statistics
# Forward statistic (section 3): per group the quadratic mean chi^2 = mean(x^2) or, with full statistics,
# the mean and the biased variance.
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


# Non-finite statistics (an fp16 overflow, a NaN in an input) never enter a layer's state: every estimator
# below keeps them out of its windows and averages, per normalization batch and channel, as if that batch had
# not been seen, and counts them. Its formulas come in two branches, the plain ones and those that skip, and the
# plain ones run whenever every value is kept, so that finite inputs keep their numbers bit for bit.
def finite_statistics(*stats: Optional[torch.Tensor]) -> torch.Tensor:
    """``(G, C)`` bool: which normalization batches' statistics (all of those given) are finite."""
    kept = None
    for stat in stats:
        if stat is not None:
            kept = torch.isfinite(stat) if kept is None else kept & torch.isfinite(stat)
    return kept


def branches_on_flags(device: torch.device) -> bool:
    """Whether the non-finite rule on ``device`` runs one of its two branches (the CPU: the flags are in host
    memory, so reading them waits for nothing) or both, the device picking the result (an accelerator: the
    training step never waits for the device)."""
    return device.type == "cpu"


def _unless_skipped(kept: torch.Tensor, plain: Callable[[], tuple], skipping: Callable[[], tuple], branch: bool = True) -> tuple:
    """``plain()`` if every value of ``kept`` is True, else ``skipping()``; each returns a tuple of new tensors
    of the same shapes (``torch.cond`` takes no branch that returns a view of its inputs).

    Where :func:`branches_on_flags`, only the branch taken runs (compiled, as ``torch.cond``): the skipping
    formulas (a masked count over (L, L, C), per-channel decay powers over (G + 1, G, C)) cost more than the
    rest of a small layer's step, for a case that almost never happens. ``branch=False``: the caller's
    skipping formulas are too small to be worth a branch (a compiled branch costs ~8 us on the CPU)."""
    if branch and branches_on_flags(kept.device):
        if torch.compiler.is_compiling():
            return tuple(torch.cond(kept.all(), plain, skipping))
        return plain() if bool(kept.all()) else skipping()
    everything_kept = kept.all()
    return tuple(torch.where(everything_kept, p, s) for p, s in zip(plain(), skipping()))


def running_count(flags: torch.Tensor) -> torch.Tensor:
    """``flags.cumsum(0)`` of a bool ``(L, C)`` tensor (int64), written as a masked sum over a lower-triangular
    mask: torch.compile fuses that into its kernels, where its CPU backend calls ATen's cumsum as a library
    function (~10 us per call on a small layer, seven calls per MABN step). Integers, so the counts are exact."""
    index = torch.arange(flags.shape[0], device=flags.device)
    lower = index[:, None] >= index[None, :]  # (L, L): row i counts flags 0..i
    return (lower[:, :, None] & flags[None]).sum(1)


def _count_skipped(counter: Optional[torch.Tensor], kept: torch.Tensor) -> None:
    if counter is not None:
        counter.add_((~kept).sum())


# Simple moving average (section 4): the mean of the last m normalization batches, vectorized over the G
# groups of a device batch (no Python loop, no wait for the device).
def sliding_window_mean(window: torch.Tensor, values: torch.Tensor, kept: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``window``: ``(m, C)``, the ``m`` most recent earlier values, oldest first; ``values``: ``(G, C)``, this
    step's groups in order. Returns ``(means, new_window)``: ``means[j]`` is the mean of the ``m`` most recent
    values once group ``j`` has been pushed (group ``j`` included), ``new_window`` the ``m`` most recent values
    after all groups. ``kept`` (``(G, C)`` bool): values where it is False are never pushed (``means[j]`` of
    such a group is the mean as the latest kept value before it left it)."""
    m = window.shape[0]
    history = torch.cat([window, values.to(window.dtype)], dim=0)  # (m + G, C), oldest first

    # Each branch returns the means and the history it slid the window over, whose last m rows are the new
    # window (a slice taken out here: torch.cond wants both branches' outputs laid out alike, which a slice of
    # the plain history, a view of an input of the branch, is not after compilation). The branches read
    # tensors only, and take their sizes from them: torch's older compilers take no integers into torch.cond.
    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        # unfold gives the G windows of length m that end with a group: window j ends with group j.
        return history[1:].unfold(0, history.shape[0] - values.shape[0], 1).mean(dim=-1), history.clone()

    def skipping() -> tuple[torch.Tensor, torch.Tensor]:
        # The values not kept move to the front and the kept history follows in order (the permutation of a
        # stable sort of the flags, written as a scatter: a sort is no compiled kernel but a library call of
        # ~80 us per window on small layers); the window that ends at the latest kept value up to group j then
        # starts at dropped + kept_through_j.
        rows, length = history.shape[0], history.shape[0] - kept.shape[0]
        pushed = torch.cat([torch.ones_like(history[:length], dtype=torch.bool), kept], dim=0)
        dropped = (~pushed).sum(0, keepdim=True)
        # one running count serves all three: the window's m rows are always pushed, so kept_through_j is
        # pushed_through[m + j] - m, and the dropped ones through row i are i + 1 - pushed_through[i]
        pushed_through = running_count(pushed)
        rows_through = torch.arange(1, rows + 1, device=pushed.device)[:, None]
        position = torch.where(pushed, dropped + pushed_through - 1, rows_through - pushed_through - 1)
        compact = torch.zeros_like(history).scatter(0, position, history)
        compact_means = compact.unfold(0, length, 1).mean(dim=-1)  # (G + 1, C): row i = mean(compact[i : i + m])
        starts = dropped + pushed_through[length:] - length
        return compact_means.gather(0, starts), compact

    means, slid = plain() if kept is None else _unless_skipped(kept, plain, skipping)
    return means, slid[-m:]


def _sma_in_use(step: torch.Tensor, norm_batches_before: torch.Tensor, groups: int, cfg) -> torch.Tensor:
    """``(G,)`` bool: which groups of this step normalize with the SMA rather than their own statistic
    (section 7: 'formal' once t >= warmup_iters and the window is full; 'classification' once t >= warmup_iters)."""
    use_sma = step >= cfg.warmup_iters
    if cfg.warmup == "formal":
        batch_index = norm_batches_before + torch.arange(1, groups + 1, device=step.device)
        return use_sma & (batch_index > cfg.buffer_size)
    return use_sma.expand(groups)


def _forward_average(window: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, use_sma: torch.Tensor, enabled: bool) -> torch.Tensor:
    means, new_window = sliding_window_mean(window, values, kept)
    window.copy_(new_window)
    if not enabled:  # ablation: the batch statistic, though the window keeps sliding
        return values
    return torch.where(use_sma[:, None], means, values)


# Exponential moving average (section 4): the inference statistic nu.
def sequential_ema(average: torch.Tensor, values: torch.Tensor, momentum: float,
                   kept: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``a <- momentum * a + (1 - momentum) * v``, applied once per group.

    ``average``: ``(C,)`` before the first group; ``values``: ``(G, C)``. Returns ``(before, after)``:
    ``before[j]`` is the average that group ``j`` sees (after groups ``0..j-1``), ``after`` the average once
    every group has been folded in. The recurrence is unrolled into a ``(G, G)`` lower-triangular weight
    matrix so that it is one matmul, not a loop. ``kept`` (``(G, C)`` bool): groups where it is False leave
    the average as it is.
    """
    groups = values.shape[0]
    dtype, device = average.dtype, average.device
    j = torch.arange(groups + 1, device=device, dtype=dtype)
    k = torch.arange(groups, device=device, dtype=dtype)
    lag = j[:, None] - 1 - k[None, :]  # row j: groups k < j contribute momentum**(j-1-k)

    def plain() -> tuple[torch.Tensor]:
        zero = torch.zeros((), dtype=dtype, device=device)
        weights = torch.where(lag >= 0, (1 - momentum) * momentum ** lag.clamp(min=0), zero)
        return ((momentum ** j)[:, None] * average[None, :] + weights @ values.to(dtype),)  # (G + 1, C)

    def skipping() -> tuple[torch.Tensor]:
        # per channel, a group's weight decays only over the kept groups after it: lag counts kept groups
        zero = torch.zeros((), dtype=dtype, device=device)
        kept_before = torch.cat([torch.zeros_like(kept[:1], dtype=dtype), running_count(kept).to(dtype)])  # (G + 1, C)
        kept_lag = kept_before[:, None, :] - kept_before[None, 1:, :]  # (G + 1, G, C): kept groups in k+1 .. j-1
        kept_weights = torch.where((lag >= 0)[:, :, None] & kept[None], (1 - momentum) * momentum ** kept_lag.clamp(min=0), zero)
        kept_values = torch.where(kept, values.to(dtype), zero)
        return (momentum ** kept_before * average[None, :] + (kept_weights * kept_values[None]).sum(1),)

    # one group: the masked recurrence is a few (2, 1, C) tensors, cheaper than a branch
    (averages,) = plain() if kept is None else _unless_skipped(kept, plain, skipping, branch=groups > 1)
    return averages[:-1], averages[-1]


def _inference_ema(average: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, step: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the EMA each group's r is computed from, the EMA after this step)`` (section 7)."""
    if cfg.warmup == "formal":
        return sequential_ema(average, values, cfg.momentum, kept)
    # classification release: once per step, seeded at step 1; every group sees the previous step's
    def plain() -> tuple[torch.Tensor]:
        step_mean = values.mean(0)
        seeded = torch.where(step == 1, step_mean, average)
        return (cfg.momentum * seeded + (1 - cfg.momentum) * step_mean,)

    def skipping() -> tuple[torch.Tensor]:
        # the mean of the kept groups only; a channel without any keeps its average
        count = kept.sum(0)
        kept_mean = torch.where(kept, values, torch.zeros_like(values)).sum(0) / count.clamp(min=1)
        kept_seeded = torch.where(step == 1, kept_mean, average)
        return (torch.where(count > 0, cfg.momentum * kept_seeded + (1 - cfg.momentum) * kept_mean, average),)

    (after,) = _unless_skipped(kept, plain, skipping)
    return average.expand_as(values), after


def _backward_average(window: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, use_sma: torch.Tensor) -> torch.Tensor:
    means, new_window = sliding_window_mean(window, values, kept)
    window.copy_(new_window)
    return torch.where(use_sma[:, None], means.to(values.dtype), values)


class MovingAverageStatistics:
    """MABN (docs/algorithm.md, sections 3-8): SMA of the forward and backward statistics over the last m
    normalization batches, renormalization r, EMA for inference, and both of the authors' warm-ups."""

    class State(NamedTuple):
        running_var: torch.Tensor  # nu, the EMA of chi^2 (of the variance, with full statistics)
        running_mean: Optional[torch.Tensor]  # full statistics only
        num_steps: torch.Tensor  # t
        num_norm_batches: torch.Tensor  # n
        window_var: torch.Tensor  # forward window (m, C), oldest first
        window_mean: Optional[torch.Tensor]
        window_psi: torch.Tensor  # backward window
        window_grad_mean: Optional[torch.Tensor]
        num_nonfinite_skipped: Optional[torch.Tensor] = None  # statistics kept out of the windows and the EMA

    class Config(NamedTuple):
        eps: float
        momentum: float  # EMA keep-rate alpha
        buffer_size: int  # m
        warmup: str
        warmup_iters: int
        renorm_warmup_iters: int
        r_max: float  # lambda
        forward_sma: bool
        backward_sma: bool
        reduced_stats: bool
        renorm: bool

    @staticmethod
    def centered(cfg) -> bool:
        return not cfg.reduced_stats

    @staticmethod
    def forward(mean_t, var_t: torch.Tensor, count, state: "MovingAverageStatistics.State", cfg: "MovingAverageStatistics.Config") -> Plan:
        groups = var_t.shape[0]
        step = state.num_steps + 1
        use_sma = _sma_in_use(step, state.num_norm_batches, groups, cfg)

        # SMA of the forward statistic: each group is pushed into the window, then (after the warm-up) averaged
        var_t = var_t.to(state.running_var.dtype)
        mean_t = None if mean_t is None else mean_t.to(state.running_var.dtype)
        kept = finite_statistics(var_t, mean_t)
        var_bar = _forward_average(state.window_var, var_t, kept, use_sma, cfg.forward_sma)
        mean_bar = None
        if mean_t is not None:
            mean_bar = _forward_average(state.window_mean, mean_t, kept, use_sma, cfg.forward_sma)
        std = (var_bar + cfg.eps).sqrt()
        # without the SMA (warm-up, ablation) a group normalizes with its own statistic, which the EMA must not see
        ema_kept = kept & finite_statistics(var_bar, mean_bar)
        _count_skipped(state.num_nonfinite_skipped, kept)

        # renormalization: r = std / sqrt(nu + eps) against the EMA that group sees, clipped, 1 while warming up
        var_seen, var_after = _inference_ema(state.running_var, var_bar, ema_kept, step, cfg)
        r = None
        if cfg.renorm:
            r = (std / (var_seen + cfg.eps).sqrt()).clamp(1.0 / cfg.r_max, cfg.r_max)
            r = torch.where(step > cfg.renorm_warmup_iters, r, torch.ones_like(r))

        # EMA for inference
        state.running_var.copy_(var_after)
        if mean_bar is not None:
            state.running_mean.copy_(_inference_ema(state.running_mean, mean_bar, ema_kept, step, cfg)[1])
        state.num_steps.copy_(step)
        state.num_norm_batches.add_(groups)
        return Plan(mean_bar, std, r, None, use_sma if cfg.backward_sma else torch.zeros_like(use_sma))

    @staticmethod
    def backward(grad_mean, psi, plan: Plan, state: "MovingAverageStatistics.State", cfg):
        # SMA of the backward statistic(s), under the warm-up rule of the forward pass of the same step
        kept = finite_statistics(psi, grad_mean)
        _count_skipped(state.num_nonfinite_skipped, kept)
        psi_bar = _backward_average(state.window_psi, psi, kept, plan.backward_sma)
        grad_bar = None if grad_mean is None else _backward_average(state.window_grad_mean, grad_mean, kept, plan.backward_sma)
        return grad_bar, psi_bar


# ============================================================================ 4. the baselines on the same step
class BatchStatistics:
    """Grouped BN: each normalization batch by its own statistics, running averages as ``nn.BatchNorm2d``
    updates them (unbiased variance; ``momentum=None``: cumulative average), after every group or once per
    step with the groups' mean (``running_stats_update``); ``num_batches_tracked`` counts the updates."""

    class State(NamedTuple):
        running_mean: Optional[torch.Tensor]
        running_var: Optional[torch.Tensor]
        num_batches_tracked: Optional[torch.Tensor]
        num_nonfinite_skipped: Optional[torch.Tensor] = None  # statistics kept out of the running averages

    class Config(NamedTuple):
        eps: float
        momentum: Optional[float]  # update rate (nn.BatchNorm2d's convention)
        running_stats_update: str = "per_group"  # one of RUNNING_STATS_UPDATES

    @staticmethod
    def centered(cfg) -> bool:
        return True

    @staticmethod
    def forward(mean: torch.Tensor, var: torch.Tensor, count, state: "BatchStatistics.State", cfg: "BatchStatistics.Config") -> Plan:
        if state.running_mean is not None:
            new_mean = running_stats_values(mean, cfg.running_stats_update)
            new_var = running_stats_values(var * (count / max(count - 1, 1)), cfg.running_stats_update)  # unbiased
            updates = new_mean.shape[0]
            kept = finite_statistics(new_mean, new_var)
            _count_skipped(state.num_nonfinite_skipped, kept)
            if cfg.momentum is None:
                seen = state.num_batches_tracked.to(state.running_mean.dtype)
                pairs = ((state.running_mean, new_mean), (state.running_var, new_var))

                def plain():
                    return tuple((average * seen + values.sum(0)) / (seen + values.shape[0]) for average, values in pairs)

                def skipping():
                    # a channel's skipped updates are left out of its sum and its count (in this step only:
                    # num_batches_tracked counts every update)
                    total = seen + kept.sum(0)
                    return tuple(
                        torch.where(total > 0, (average * seen + torch.where(kept, values, torch.zeros_like(values)).sum(0))
                                    / total.clamp(min=1), average)
                        for average, values in pairs
                    )

                for (average, _), updated in zip(pairs, _unless_skipped(kept, plain, skipping)):
                    average.copy_(updated)
            else:
                state.running_mean.copy_(sequential_ema(state.running_mean, new_mean, 1 - cfg.momentum, kept)[1])
                state.running_var.copy_(sequential_ema(state.running_var, new_var, 1 - cfg.momentum, kept)[1])
            state.num_batches_tracked.add_(updates)
        return Plan(mean, (var + cfg.eps).sqrt())

    @staticmethod
    def backward(grad_mean, psi, plan: Plan, state, cfg):
        return grad_mean, psi


def _ramp(step: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """0 until ``start``, then linear to 1 at ``end``."""
    if end <= start:
        return (step > start).to(torch.float64)
    return ((step.to(torch.float64) - start) / (end - start)).clamp(0.0, 1.0)


class RenormStatistics:
    """Batch Renormalization (Ioffe 2017): batch statistics corrected towards the running ones by r and d.

    ``running_stats_update="per_group"``: group ``j`` is corrected towards the averages that already hold groups
    ``0..j-1`` of the step; ``"per_step"``: every group towards the averages before the step, which then take in
    the groups' mean once."""

    class State(NamedTuple):
        running_mean: torch.Tensor
        running_var: torch.Tensor
        num_batches_tracked: torch.Tensor
        num_nonfinite_skipped: Optional[torch.Tensor] = None  # statistics kept out of the running averages

    class Config(NamedTuple):
        eps: float
        momentum: float  # update rate of the running averages (nn.BatchNorm2d's convention; Ioffe's alpha)
        r_max: float
        d_max: float
        warmup_steps: int
        r_max_steps: int
        d_max_steps: int
        running_stats_update: str = "per_group"  # one of RUNNING_STATS_UPDATES

    @staticmethod
    def centered(cfg) -> bool:
        return True

    @staticmethod
    def limits(step: torch.Tensor, cfg: "RenormStatistics.Config"):
        """``(r_max, d_max)`` in force at training step ``step`` (1-based)."""
        r_lim = 1.0 + (cfg.r_max - 1.0) * _ramp(step, cfg.warmup_steps, cfg.r_max_steps)
        d_lim = cfg.d_max * _ramp(step, cfg.warmup_steps, cfg.d_max_steps)
        return r_lim, d_lim

    @staticmethod
    def forward(mean: torch.Tensor, var: torch.Tensor, count, state: "RenormStatistics.State", cfg: "RenormStatistics.Config") -> Plan:
        std = (var + cfg.eps).sqrt()
        step = state.num_batches_tracked + 1
        keep = 1.0 - cfg.momentum
        # per_step: one row for all groups, which is skipped as a whole where a group's statistic is not finite
        new_mean = running_stats_values(mean, cfg.running_stats_update)
        new_var = running_stats_values(var, cfg.running_stats_update)
        kept = finite_statistics(new_mean, new_var)
        _count_skipped(state.num_nonfinite_skipped, kept)
        mean_seen, mean_after = sequential_ema(state.running_mean, new_mean, keep, kept)
        var_seen, var_after = sequential_ema(state.running_var, new_var, keep, kept)
        mean_seen, var_seen = mean_seen.expand_as(mean), var_seen.expand_as(var)
        sigma = (var_seen.to(std.dtype) + cfg.eps).sqrt()
        r_lim, d_lim = (v.to(std.dtype) for v in RenormStatistics.limits(step, cfg))
        r = torch.minimum(torch.maximum(std / sigma, 1.0 / r_lim), r_lim)
        d = torch.minimum(torch.maximum((mean - mean_seen.to(std.dtype)) / sigma, -d_lim), d_lim)
        state.running_mean.copy_(mean_after)
        state.running_var.copy_(var_after)
        state.num_batches_tracked.copy_(step)
        return Plan(mean, std, r, d)

    @staticmethod
    def backward(grad_mean, psi, plan: Plan, state, cfg):
        return grad_mean, psi


# ============================================================================ 5. the reference step
def _per_sample(t: Optional[torch.Tensor], x: torch.Tensor, default: float):
    return default if t is None else per_sample(t, x)


def _per_channel(t: Optional[torch.Tensor], x: torch.Tensor):
    return 1.0 if t is None else t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _normalized(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    centred = x - per_sample(plan.mean, x) if plan.mean is not None else x
    return centred / per_sample(plan.std, x)


def reference_forward(estimator, x, weight, bias, state, cfg, groups):
    """Forward statistic of every group -> ``estimator.forward`` (SMA, r, EMA) -> ``y``; returns ``(y, plan)``."""
    mean, var = group_moments(x, groups, estimator.centered(cfg), accumulation_dtype(x.dtype))
    plan = estimator.forward(mean, var, group_size(x, groups), state, cfg)
    return reference_apply(x, weight, bias, plan, groups), plan


def reference_apply(x, weight, bias, plan: Plan, groups):
    """``y = weight * (r * z + d) + bias`` with ``z = (x - mean) / std``, each group by its own plan."""
    xa = x.to(accumulation_dtype(x.dtype))
    y = _per_sample(plan.r, xa, 1.0) * _normalized(xa, plan) + _per_sample(plan.d, xa, 0.0)
    y = _per_channel(weight, xa) * y
    if bias is not None:
        y = y + _per_channel(bias, xa)
    return y.to(x.dtype)


def reference_backward(estimator, dy, x, weight, plan: Plan, state, cfg, groups, needs_grad, bias_dtype):
    """``g = weight * r * dy``, ``Psi = mean(g * z)`` per group -> ``estimator.backward`` (SMA) -> ``dx``."""
    acc = accumulation_dtype(x.dtype)
    xa, dya = x.to(acc), dy.to(acc)
    z = _normalized(xa, plan)
    g = dya * _per_channel(weight, xa) * _per_sample(plan.r, xa, 1.0)

    psi = group_mean(g * z, groups)
    g_mean = group_mean(g, groups) if plan.mean is not None else None
    g_mean, psi = estimator.backward(g_mean, psi, plan, state, cfg)

    dx = dweight = dbias = None
    if needs_grad[0]:
        dx = g - z * per_sample(psi, xa)
        if g_mean is not None:
            dx = dx - per_sample(g_mean, xa)
        dx = (dx / per_sample(plan.std, xa)).to(x.dtype)
    reduce = [0] + list(range(2, x.dim()))
    if weight is not None and needs_grad[1]:
        y_hat = _per_sample(plan.r, xa, 1.0) * z + _per_sample(plan.d, xa, 0.0)
        dweight = (dya * y_hat).sum(reduce).to(weight.dtype)
    if needs_grad[2]:
        dbias = dya.sum(reduce).to(bias_dtype)
    return dx, dweight, dbias


# ============================================================================ 6. the autograd Function
@dataclass(frozen=True)
class Backend:
    """The kernels of a training step: this module's reference ones, or the fused ones of :mod:`mabn.layers.fused`."""

    name: str
    forward: Callable  # (estimator, x, weight, bias, state, cfg, groups) -> (y, plan)
    apply: Callable  # (x, weight, bias, plan, groups) -> y
    backward: Callable  # (estimator, dy, x, weight, plan, state, cfg, groups, needs_grad, bias_dtype) -> (dx, dw, db)


REFERENCE = Backend("reference", reference_forward, reference_apply, reference_backward)


class TrainStep(torch.autograd.Function):
    """``plan=None``: moments -> ``estimator.forward`` (which advances the layer's state) -> normalize.
    ``plan`` given: normalize with it and leave the forward state alone (a checkpointed recomputation).
    The plan used is appended to ``plan_out``. ``on_backward`` runs first thing in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend, estimator, state, cfg, groups: int, plan: Optional[Plan],
                on_backward: Optional[Callable[[], None]], plan_out: list):
        if plan is None:
            y, plan = backend.forward(estimator, x, weight, bias, state, cfg, groups)
        else:
            y = backend.apply(x, weight, bias, plan, groups)
        plan_out.append(plan)
        ctx.backend, ctx.estimator, ctx.state, ctx.cfg, ctx.groups = backend, estimator, state, cfg, groups
        ctx.plan, ctx.on_backward = plan, on_backward
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if ctx.on_backward is not None:
            ctx.on_backward()
        x, weight = ctx.saved_tensors
        dx, dweight, dbias = ctx.backend.backward(
            ctx.estimator, dy, x, weight, ctx.plan, ctx.state, ctx.cfg, ctx.groups, tuple(ctx.needs_input_grad[:3]), ctx.bias_dtype
        )
        return dx, dweight, dbias, None, None, None, None, None, None, None, None


def train_step(x, weight, bias, backend: Backend, estimator: Any, state, cfg, groups: int, plan: Optional[Plan] = None,
               on_backward=None):
    """Run :class:`TrainStep`; returns ``(y, plan)``."""
    plan_out: list = []
    y = TrainStep.apply(x, weight, bias, backend, estimator, state, cfg, groups, plan, on_backward, plan_out)
    return y, plan_out[0]
