"""Recording the four batch statistics of the paper for chosen norm layers during training.

For a layer's first normalization batch (the first ``b`` samples of the device batch), per channel:

* forward:  ``mu_B = mean(x)``, ``sigma_B^2 = var(x)``;
* backward: ``g_B = mean(dL/dy_hat)``, ``Psi_B = mean(y_hat * dL/dy_hat)`` with ``y_hat = (x - mu_B) / sigma_B``
  and ``dL/dy_hat = gamma * dL/dy``.

They are computed from the layer's input and output gradient, whatever the layer is, so a BN-32 and a
BN-2 run (or BN and MABN) can be compared on the same footing (the paper's statistics figure). The
values of one channel are written to TensorBoard as ``batch_stats/<layer>/<statistic>``.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .layers.registry import uses_batch_statistics

STATISTICS = ("mu", "sigma2", "g", "psi")


def norm_layer_names(model: nn.Module) -> list[str]:
    """Names of the norm layers of ``model`` that train on batch statistics (BN, SyncBN, BRN, MABN of every rank;
    not frozen BN, GN, LN or IN), in order."""
    return [name for name, m in model.named_modules() if uses_batch_statistics(m)]


class BatchStatisticsRecorder:
    """Hooks on ``layers`` of ``model``; call :meth:`write` after each backward you want recorded.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``).
        layers: layer names (default: every batch-statistics norm layer).
        channel: which channel's statistics to write.
        eps: added to sigma_B^2 in y_hat.
    """

    def __init__(self, model: nn.Module, writer, layers: Optional[Iterable[str]] = None, channel: int = 0, eps: float = 1e-5):
        self.writer = writer
        self.channel = channel
        self.eps = eps
        self.layers = list(layers) if layers is not None else norm_layer_names(model)
        modules = dict(model.named_modules())
        unknown = [name for name in self.layers if name not in modules]
        if unknown:
            raise ValueError(f"BatchStatisticsRecorder: no layer named {unknown} in the model")
        self.latest: dict[str, dict[str, float]] = {}
        self._handles = [modules[name].register_forward_hook(self._forward_hook(name)) for name in self.layers]

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if not module.training or x.shape[0] == 0 or not torch.is_grad_enabled():
                return
            b = getattr(module, "norm_batch_size", None) or x.shape[0]
            with torch.no_grad():
                xb = x[:b, self.channel].detach().double()
                mu, var = xb.mean(), xb.var(unbiased=False)
                y_hat = (xb - mu) / torch.sqrt(var + self.eps)
            stats = self.latest.setdefault(name, {})
            stats.update(mu=mu.item(), sigma2=var.item())
            gamma = module.weight[self.channel].detach().double() if getattr(module, "weight", None) is not None else 1.0

            def grad_hook(grad):
                with torch.no_grad():
                    dy_hat = grad[:b, self.channel].double() * gamma
                    stats.update(g=dy_hat.mean().item(), psi=(y_hat * dy_hat).mean().item())

            if output.requires_grad:
                output.register_hook(grad_hook)

        return hook

    def write(self, step: int) -> None:
        """Write what the last forward/backward recorded, then forget it."""
        for name, stats in self.latest.items():
            for key in STATISTICS:
                if key in stats:
                    self.writer.add_scalar(f"batch_stats/{name}/{key}", stats[key], step)
        self.latest.clear()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
