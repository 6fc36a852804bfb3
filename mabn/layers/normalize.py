"""The training step shared by grouped BN, Batch Renormalization and MABN, and its reference implementation.

Per normalization batch (group) ``j`` and channel, an estimator (``estimators.py``) turns the batch's
moments into a :class:`~mabn.layers.estimators.Plan`; the step then computes

    z = (x - mean_j) / std_j                  (mean_j = 0 for MABN's reduced statistics)
    y = weight * (r_j * z + d_j) + bias       (r, d: renormalization, constants for autograd)

and, backward, with ``g = weight * r_j * dy`` (spec, MABN.md):

    g_j = mean(g) (centered only),   Psi_j = mean(g * z),   (g_bar, Psi_bar) = estimator.backward(g_j, Psi_j)
    dx  = (g - g_bar_j - z * Psi_bar_j) / std_j

With the batch's own statistics (BN, BRN: the estimator returns them unchanged) this is exactly the
gradient of batch normalization through ``mean_j`` and ``std_j``; MABN substitutes moving averages.

:class:`TrainStep` is the autograd Function; a backend (``backends.py``) supplies its kernels. The
functions here are the reference backend: the formulas above, one tensor operation at a time.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from .estimators import Plan
from .grouping import accumulation_dtype, group_mean, group_moments, group_size, per_sample


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


def train_step(x, weight, bias, backend, estimator, state, cfg, groups: int, plan: Optional[Plan] = None, on_backward=None):
    """Run :class:`TrainStep`; returns ``(y, plan)``."""
    plan_out: list = []
    y = TrainStep.apply(x, weight, bias, backend, estimator, state, cfg, groups, plan, on_backward, plan_out)
    return y, plan_out[0]


# ----------------------------------------------------------------------------- reference kernels
def _per_sample(t: Optional[torch.Tensor], x: torch.Tensor, default: float):
    return default if t is None else per_sample(t, x)


def _per_channel(t: Optional[torch.Tensor], x: torch.Tensor):
    return 1.0 if t is None else t.reshape(1, -1, *([1] * (x.dim() - 2)))


def _normalized(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    centred = x - per_sample(plan.mean, x) if plan.mean is not None else x
    return centred / per_sample(plan.std, x)


def reference_forward(estimator, x, weight, bias, state, cfg, groups):
    mean, var = group_moments(x, groups, estimator.centered(cfg), accumulation_dtype(x.dtype))
    plan = estimator.forward(mean, var, group_size(x, groups), state, cfg)
    return reference_apply(x, weight, bias, plan, groups), plan


def reference_apply(x, weight, bias, plan: Plan, groups):
    xa = x.to(accumulation_dtype(x.dtype))
    y = _per_sample(plan.r, xa, 1.0) * _normalized(xa, plan) + _per_sample(plan.d, xa, 0.0)
    y = _per_channel(weight, xa) * y
    if bias is not None:
        y = y + _per_channel(bias, xa)
    return y.to(x.dtype)


def reference_backward(estimator, dy, x, weight, plan: Plan, state, cfg, groups, needs_grad, bias_dtype):
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
