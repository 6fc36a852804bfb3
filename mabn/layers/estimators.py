"""Which statistics a layer normalizes with, and how its state evolves: one estimator per layer type.

Given the per-normalization-batch moments of the input (``(G, C)`` tensors, groups in order), an
estimator's ``forward`` returns the :class:`Plan` the normalization applies and updates the layer's
buffers in place; its ``backward`` may replace the backward statistics ``(g, Psi)``. These functions
are the whole state machine of grouped BN, BRN and MABN. Both backends run them: the reference path
eagerly, the fused path inside its compiled graphs. They touch only small ``(G, C)`` / ``(m, C)``
tensors, never the activations, and never synchronize with the host.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .moving_averages import sequential_ema, sliding_window_mean


class Plan(NamedTuple):
    """Per normalization batch (G, C): ``z = (x - mean) / std``, ``y = weight * (r * z + d) + bias``."""

    mean: Optional[torch.Tensor]  # None: no centering (MABN's reduced statistics)
    std: torch.Tensor
    r: Optional[torch.Tensor] = None
    d: Optional[torch.Tensor] = None
    backward_sma: Optional[torch.Tensor] = None  # (G,) bool, MABN only: use the SMA of (g, Psi)


class BatchStatistics:
    """Grouped BN: each normalization batch by its own statistics, running averages as ``nn.BatchNorm2d``
    would update them after every group (unbiased variance; ``momentum=None``: cumulative average)."""

    class State(NamedTuple):
        running_mean: Optional[torch.Tensor]
        running_var: Optional[torch.Tensor]
        num_batches_tracked: Optional[torch.Tensor]

    class Config(NamedTuple):
        eps: float
        momentum: Optional[float]

    @staticmethod
    def centered(cfg) -> bool:
        return True

    @staticmethod
    def forward(mean: torch.Tensor, var: torch.Tensor, count, state: "BatchStatistics.State", cfg: "BatchStatistics.Config") -> Plan:
        if state.running_mean is not None:
            groups = mean.shape[0]
            unbiased = var * (count / max(count - 1, 1))
            if cfg.momentum is None:
                seen = state.num_batches_tracked.to(state.running_mean.dtype)
                state.running_mean.copy_((state.running_mean * seen + mean.sum(0)) / (seen + groups))
                state.running_var.copy_((state.running_var * seen + unbiased.sum(0)) / (seen + groups))
            else:
                state.running_mean.copy_(sequential_ema(state.running_mean, mean, 1 - cfg.momentum)[1])
                state.running_var.copy_(sequential_ema(state.running_var, unbiased, 1 - cfg.momentum)[1])
            state.num_batches_tracked.add_(groups)
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
    """Batch Renormalization (Ioffe 2017): batch statistics corrected towards the running ones by r and d."""

    class State(NamedTuple):
        running_mean: torch.Tensor
        running_var: torch.Tensor
        num_batches_tracked: torch.Tensor

    class Config(NamedTuple):
        eps: float
        momentum: float
        r_max: float
        d_max: float
        warmup_steps: int
        r_max_steps: int
        d_max_steps: int

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
        mean_seen, mean_after = sequential_ema(state.running_mean, mean, keep)
        var_seen, var_after = sequential_ema(state.running_var, var, keep)
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


class MovingAverageStatistics:
    """MABN (spec: shared/spec/MABN.md): SMA of the forward and backward statistics over the last m
    normalization batches, EMA for inference, renormalization r, and both of the authors' warm-ups."""

    class State(NamedTuple):
        running_var: torch.Tensor
        running_mean: Optional[torch.Tensor]
        num_steps: torch.Tensor
        num_norm_batches: torch.Tensor
        window_var: torch.Tensor
        window_mean: Optional[torch.Tensor]
        window_psi: torch.Tensor
        window_grad_mean: Optional[torch.Tensor]

    class Config(NamedTuple):
        eps: float
        momentum: float
        buffer_size: int
        warmup: str
        warmup_iters: int
        renorm_warmup_iters: int
        r_max: float
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
        batch_index = state.num_norm_batches + torch.arange(1, groups + 1, device=step.device)
        use_sma = step >= cfg.warmup_iters
        if cfg.warmup == "formal":
            use_sma = use_sma & (batch_index > cfg.buffer_size)
        else:
            use_sma = use_sma.expand(groups)

        var_t = var_t.to(state.running_var.dtype)
        var_bar = _forward_average(state.window_var, var_t, use_sma, cfg.forward_sma)
        mean_bar = None
        if mean_t is not None:
            mean_bar = _forward_average(state.window_mean, mean_t.to(state.running_var.dtype), use_sma, cfg.forward_sma)

        var_seen = _update_ema(state.running_var, var_bar, step, cfg)
        if mean_bar is not None:
            _update_ema(state.running_mean, mean_bar, step, cfg)

        std = (var_bar + cfg.eps).sqrt()
        r = None
        if cfg.renorm:
            r = (std / (var_seen + cfg.eps).sqrt()).clamp(1.0 / cfg.r_max, cfg.r_max)
            r = torch.where(step > cfg.renorm_warmup_iters, r, torch.ones_like(r))
        state.num_steps.copy_(step)
        state.num_norm_batches.add_(groups)
        return Plan(mean_bar, std, r, None, use_sma if cfg.backward_sma else torch.zeros_like(use_sma))

    @staticmethod
    def backward(grad_mean, psi, plan: Plan, state: "MovingAverageStatistics.State", cfg):
        psi_bar = _backward_average(state.window_psi, psi, plan.backward_sma)
        grad_bar = None if grad_mean is None else _backward_average(state.window_grad_mean, grad_mean, plan.backward_sma)
        return grad_bar, psi_bar


def _forward_average(window: torch.Tensor, values: torch.Tensor, use_sma: torch.Tensor, enabled: bool) -> torch.Tensor:
    means, new_window = sliding_window_mean(window, values)
    window.copy_(new_window)
    if not enabled:
        return values
    return torch.where(use_sma[:, None], means, values)


def _backward_average(window: torch.Tensor, values: torch.Tensor, use_sma: torch.Tensor) -> torch.Tensor:
    means, new_window = sliding_window_mean(window, values)
    window.copy_(new_window)
    return torch.where(use_sma[:, None], means.to(values.dtype), values)


def _update_ema(average: torch.Tensor, values: torch.Tensor, step: torch.Tensor, cfg) -> torch.Tensor:
    """Fold this step's statistics into the inference EMA; return the EMA each group's r is computed from."""
    if cfg.warmup == "formal":
        seen, after = sequential_ema(average, values, cfg.momentum)
    else:  # classification release: once per step, seeded at step 1; every group sees the previous step's
        seen = average.expand_as(values)
        step_mean = values.mean(0)
        seeded = torch.where(step == 1, step_mean, average)
        after = cfg.momentum * seeded + (1 - cfg.momentum) * step_mean
    seen = seen.clone()  # `average` is overwritten below
    average.copy_(after)
    return seen
