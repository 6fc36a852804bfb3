"""Moving Average Batch Normalization (Yan et al., ICLR 2020): the layers. Their training step, in the paper's
order, is :mod:`mabn.layers.functional`; the algorithm is written out in ``docs/algorithm.md``.

One implementation, :class:`MovingAverageBatchNorm`, serves 1d, 2d and 3d inputs; the public classes
only fix the accepted input ranks.

Per channel and normalization batch, at training step ``t`` (the layer's training forwards) and
normalization batch ``n`` (groups seen so far, this one included):

* forward: ``chi2_t = mean(x^2)`` (reduced statistic, no centering); ``chi2_bar`` is ``chi2_t`` during
  warm-up, else the simple moving average (SMA) of the last ``m`` values; ``z = x / sqrt(chi2_bar + eps)``;
  ``y = gamma * r * z + beta`` with the renormalization ``r = sqrt(chi2_bar + eps) / sqrt(nu + eps)``
  (1 during its warm-up, else clipped to ``[1/r_max, r_max]``); ``nu`` is the EMA of ``chi2_bar``.
* backward: ``Psi_t = mean(gamma * r * dy * z)``, ``Psi_bar`` its SMA under the same warm-up rule, and
  ``dx = (gamma * r * dy - z * Psi_bar) / sqrt(chi2_bar + eps)``.
* inference: ``y = gamma * x / sqrt(nu + eps) + beta``, an affine map that folds into the previous conv.

The ablation switches of the paper (``forward_sma``, ``backward_sma``, ``reduced_stats``, ``renorm``)
and both warm-up schedules the authors released (``warmup='formal'`` / ``'classification'``) are options
(docs/algorithm.md, sections 7 and 8).
"""
from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .functional import MovingAverageStatistics, Plan, check_norm_batch_size, num_groups, train_step
from .fused import check_backend, select
from .misuse import NotScriptable, warn_if_buffers_broadcast
from .nonfinite import SkipWarning, register_counter

WARMUPS = ("formal", "classification")


class _BackwardToken:
    """Lives exactly as long as one forward's autograd graph; says whether its backward has run."""

    __slots__ = ("done", "__weakref__")

    def __init__(self):
        self.done = False


def _recomputing_in_backward() -> bool:
    # Activation checkpointing (both torch.utils.checkpoint modes) reruns forwards from inside the
    # autograd engine; a regular forward never runs there.
    return torch._C._current_graph_task_id() != -1


class MovingAverageBatchNorm(NotScriptable, nn.Module):
    """The MABN family's base class (``isinstance(m, MovingAverageBatchNorm)`` finds MABN1d, 2d and 3d)."""

    _input_ranks: tuple[int, ...] = ()
    _rank_help: str = ""

    def __init__(
        self,
        num_features: int,
        B: Optional[int] = None,
        real_B: Optional[int] = None,
        eps: float = 1e-5,
        momentum: float = 0.98,
        warmup_iters: Optional[int] = None,
        *,
        buffer_size: Optional[int] = None,
        norm_batch_size: Optional[int] = None,
        renorm_warmup_iters: Optional[int] = None,
        r_max: float = 5.0,
        warmup: str = "formal",
        forward_sma: bool = True,
        backward_sma: bool = True,
        reduced_stats: bool = True,
        renorm: bool = True,
        affine: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        """
        Args:
            num_features: channels C.
            B, real_B: the authors' way to give the window: ``buffer_size = real_B // B`` normalization
                batches (``real_B`` must be a multiple of ``B``). Give either these or ``buffer_size``.
            eps: added to the second moment before the square root.
            momentum: EMA keep-rate alpha of the inference statistic, ``nu <- alpha * nu + (1 - alpha) * chi2_bar``
                (the authors' convention, the opposite of ``nn.BatchNorm2d``'s ``momentum``).
            warmup_iters: first training step at which the SMA may be used (default 100 for the formal warm-up,
                2 for the classification one).
            buffer_size: SMA window m, in normalization batches (default 16).
            norm_batch_size: normalization batch b; the device batch is cut into consecutive groups of b
                samples, each normalized on its own (default: the whole device batch).
            renorm_warmup_iters: r is forced to 1 during the first this-many training steps (default
                ``max(1000, warmup_iters)`` for the formal warm-up, 99 for the classification one).
            r_max: clip lambda of the renormalization factor r, in ``[1 / r_max, r_max]``.
            warmup: ``'formal'`` (the authors' detection release: SMA once the window holds m batches and
                ``t >= warmup_iters``; EMA updated after every normalization batch) or ``'classification'``
                (their classification release: SMA from step ``warmup_iters`` on over a window seeded with
                ones; EMA seeded at step 1 and updated once per step with the mean of the step's groups;
                every group of a step computes r from the previous step's EMA).
            forward_sma, backward_sma: use the SMA of the forward (chi^2) / backward (Psi) statistic;
                off means the plain per-batch statistic (ablation).
            reduced_stats: True: no centering (chi^2, Psi), for use after weight-centered convs; False: full
                statistics (mean and variance forward, g and Psi backward), each tracked like chi^2 / Psi.
            renorm: apply the renormalization factor r (ablation).
            affine: learnable per-channel gamma (``weight``) and beta (``bias``).
            backend: 'auto' (fused kernels where torch.compile works), 'fused' or 'reference' (the spec's
                formulas one operation at a time, the oracle of the tests); see :mod:`mabn.layers.fused`.
        """
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        name = type(self).__name__
        if (B is None) != (real_B is None):
            raise ValueError(f"{name}: give both B and real_B (window = real_B // B), or neither")
        if B is not None:
            if buffer_size is not None:
                raise ValueError(f"{name}: give the SMA window either as buffer_size or as (B, real_B), not both")
            if B <= 0 or real_B <= 0 or real_B % B != 0:
                raise ValueError(
                    f"{name}: real_B={real_B} must be a positive multiple of B={B}; "
                    "the SMA window holds real_B // B normalization batches"
                )
            buffer_size = real_B // B
        buffer_size = 16 if buffer_size is None else buffer_size
        if warmup not in WARMUPS:
            raise ValueError(f"{name}: warmup must be one of {WARMUPS}, got {warmup!r}")
        if warmup_iters is None:
            warmup_iters = 100 if warmup == "formal" else 2
        if renorm_warmup_iters is None:
            renorm_warmup_iters = max(1000, warmup_iters) if warmup == "formal" else 99
        for label, value in (("num_features", num_features), ("buffer_size", buffer_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {label} must be a positive integer, got {value!r}")
        check_norm_batch_size(name, norm_batch_size)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{name}: momentum (EMA keep-rate) must be in [0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"{name}: eps must be positive, got {eps}")
        if not r_max >= 1:
            raise ValueError(f"{name}: r_max must be at least 1, got {r_max}")
        if warmup_iters < 0 or renorm_warmup_iters < 0:
            raise ValueError(f"{name}: warm-up lengths must be non-negative")

        self.backend = check_backend(backend, name)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.buffer_size = buffer_size
        self.norm_batch_size = norm_batch_size
        self.warmup = warmup
        self.warmup_iters = int(warmup_iters)
        self.renorm_warmup_iters = int(renorm_warmup_iters)
        self.r_max = float(r_max)
        self.forward_sma = forward_sma
        self.backward_sma = backward_sma
        self.reduced_stats = reduced_stats
        self.renorm = renorm
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

        full = not reduced_stats
        self.register_buffer("running_var", torch.empty(num_features, **factory))
        self.register_buffer("running_mean", torch.empty(num_features, **factory) if full else None)
        self.register_buffer("num_steps", torch.empty((), dtype=torch.long, device=device))
        self.register_buffer("num_norm_batches", torch.empty((), dtype=torch.long, device=device))
        # Windows hold the last m per-normalization-batch statistics, oldest first.
        self.register_buffer("window_var", torch.empty(buffer_size, num_features, **factory))
        self.register_buffer("window_mean", torch.empty(buffer_size, num_features, **factory) if full else None)
        self.register_buffer("window_psi", torch.empty(buffer_size, num_features, **factory))
        self.register_buffer("window_grad_mean", torch.empty(buffer_size, num_features, **factory) if full else None)
        register_counter(self, device)
        self._skip_warning = SkipWarning()
        self.reset_parameters()

        self._last_plan: Optional[tuple[int, Plan]] = None
        self._pending: Optional[weakref.ref] = None
        self._wrapping_checked = False

    # The attributes and methods of nn.modules.batchnorm._BatchNorm that ecosystem helpers use (README, "MABN
    # and code written for BatchNorm"). MABN always keeps inference statistics.
    track_running_stats = True

    def reset_running_stats(self) -> None:
        """Back to a fresh layer's statistics: nu = 1 (and mean 0), empty windows, step counters at 0."""
        self.running_var.fill_(1.0)
        self.num_steps.zero_()
        self.num_norm_batches.zero_()
        # The classification release seeds the chi^2 window with ones (and Psi with zeros).
        self.window_var.fill_(1.0 if self.warmup == "classification" else 0.0)
        self.window_psi.zero_()
        self.num_nonfinite_skipped.zero_()
        for buffer in (self.running_mean, self.window_mean, self.window_grad_mean):
            if buffer is not None:
                buffer.zero_()

    def reset_parameters(self) -> None:
        """Statistics reset and gamma = 1, beta = 0, as ``nn.BatchNorm2d.reset_parameters``."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def __getstate__(self):
        # The pending-backward weakref and the last plan belong to one live autograd graph, not to the model.
        state = self.__dict__.copy()
        state["_pending"] = None
        state["_last_plan"] = None
        state["_wrapping_checked"] = False  # a copy may be wrapped differently
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training:
            return self._inference(x)
        if x.shape[0] == 0:
            # e.g. a mask head that received no RoI: nothing to normalize, nothing to learn from.
            return self._inference(x)
        if not self.__dict__.get("_wrapping_checked", False):  # (absent in layers pickled before it existed)
            self._wrapping_checked = True
            warn_if_buffers_broadcast(self)
        groups = num_groups(type(self).__name__, x.shape[0], self.norm_batch_size)
        plan = None
        if _recomputing_in_backward():
            plan = self._replay(groups)  # same statistics as the original forward, no state update
        else:
            self._check_no_pending_backward()
        token = _BackwardToken()
        y, plan = train_step(
            x, self.weight, self.bias, select(self.backend, x.device), MovingAverageStatistics, self._state(),
            self._config(), groups, plan, functools.partial(self._on_backward, token),
        )
        # into __dict__ directly: nn.Module.__setattr__ looks for a parameter, buffer or submodule of the name
        # first (~5 us per attribute, on every training step), and these are none of them
        self.__dict__["_last_plan"] = (groups, plan)
        if y.requires_grad:
            self.__dict__["_pending"] = weakref.ref(token)
        self._skip_warning.after_training_forward(self, f"{type(self).__name__}({self.num_features})")
        return y

    def _state(self) -> MovingAverageStatistics.State:
        b = self._buffers  # not eight trips through nn.Module.__getattr__: this runs on every training step
        return MovingAverageStatistics.State(
            running_var=b["running_var"], running_mean=b["running_mean"], num_steps=b["num_steps"],
            num_norm_batches=b["num_norm_batches"], window_var=b["window_var"], window_mean=b["window_mean"],
            window_psi=b["window_psi"], window_grad_mean=b["window_grad_mean"],
            num_nonfinite_skipped=b["num_nonfinite_skipped"],
        )

    def _config(self) -> MovingAverageStatistics.Config:
        return MovingAverageStatistics.Config(
            eps=self.eps, momentum=self.momentum, buffer_size=self.buffer_size, warmup=self.warmup,
            warmup_iters=self.warmup_iters, renorm_warmup_iters=self.renorm_warmup_iters, r_max=self.r_max,
            forward_sma=self.forward_sma, backward_sma=self.backward_sma, reduced_stats=self.reduced_stats,
            renorm=self.renorm,
        )

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.running_mean if self.running_mean is not None else torch.zeros_like(self.running_var)
        return F.batch_norm(x, mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if x.dim() not in self._input_ranks:
            raise ValueError(f"{name}: expected {self._rank_help} input, got a {x.dim()}D tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels (dim 1), got input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            # nn.BatchNorm2d's error for the same input; the training step would otherwise return integers
            raise NotImplementedError(f"{name}: expected a floating-point input, got {x.dtype}")

    def _check_no_pending_backward(self) -> None:
        token = self._pending() if self._pending is not None else None
        if token is not None and not token.done:
            raise RuntimeError(
                f"{type(self).__name__}: a second training forward ran before the backward of the previous one. "
                "MABN's SMA windows are ordered by normalization batch, so several forwards sharing one backward "
                "(e.g. two crops through one model) would corrupt them: call backward after each forward, or run the "
                "extra forward in eval mode or under torch.no_grad()."
            )

    def _replay(self, groups: int) -> Plan:
        if self._last_plan is None or self._last_plan[0] != groups:
            raise RuntimeError(
                f"{type(self).__name__}: forward recomputed during backward (activation checkpointing) without a "
                "matching earlier forward of this layer"
            )
        return self._last_plan[1]

    def _on_backward(self, token: _BackwardToken) -> None:
        """First thing in the backward of the forward that created ``token``: it may push Psi only once."""
        if token.done:
            raise RuntimeError(
                f"{type(self).__name__}: backward ran twice through the same forward (retain_graph=True); "
                "it would push its Psi into the SMA window twice"
            )
        token.done = True

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, buffer_size={self.buffer_size}, "
            f"norm_batch_size={self.norm_batch_size}, warmup={self.warmup!r}, warmup_iters={self.warmup_iters}, "
            f"renorm_warmup_iters={self.renorm_warmup_iters}, r_max={self.r_max}"
        )
        ablations = [
            f"{k}=False" for k in ("forward_sma", "backward_sma", "reduced_stats", "renorm", "affine") if not getattr(self, k)
        ]
        return ", ".join([text] + ablations)


class MABN1d(MovingAverageBatchNorm):
    """MABN for ``(N, C)`` or ``(N, C, L)`` inputs."""

    _input_ranks = (2, 3)
    _rank_help = "2D (N, C) or 3D (N, C, L)"


class MABN2d(MovingAverageBatchNorm):
    """MABN for ``(N, C, H, W)`` inputs; place it after a :class:`~mabn.CenConv2d`."""

    _input_ranks = (4,)
    _rank_help = "4D (N, C, H, W)"


class MABN3d(MovingAverageBatchNorm):
    """MABN for ``(N, C, D, H, W)`` inputs."""

    _input_ranks = (5,)
    _rank_help = "5D (N, C, D, H, W)"
