"""Weight-centered convolution, the companion of MABN's reduced statistics.

Each output filter's weights minus their own mean over (in_channels, kh, kw) keep pre-activation
means near zero, which lets the quadratic mean chi^2 stand in for the variance. A subclass of
``nn.Conv2d`` with the same constructor and ``state_dict`` keys: the stored weight is the raw one,
centering happens in ``forward`` (and is folded away for inference by :func:`mabn.fold_model`).
"""
from __future__ import annotations

import torch
from torch import nn


def centered_weight(weight: torch.Tensor) -> torch.Tensor:
    return weight - weight.mean(dim=(1, 2, 3), keepdim=True)


class CenConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, centered_weight(self.weight), self.bias)
