"""Normalization layers by name, the way detectron2 picks a norm: ``build_norm('mabn', 256, buffer_size=16)``."""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .batch_norm import BatchNorm2d
from .batch_renorm import BatchRenorm2d
from .moving_average_bn import MABN2d, _MovingAverageBatchNorm
from .sync_batch_norm import SyncBatchNorm


def group_norm(num_channels: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """GN (Wu & He, 2018), 32 groups by default."""
    if num_channels % num_groups != 0:
        raise ValueError(f"gn: {num_channels} channels cannot be split into num_groups={num_groups} groups")
    return nn.GroupNorm(num_groups, num_channels, eps=eps, affine=affine)


def layer_norm(num_channels: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """LN over (C, H, W) with a per-channel affine map: GroupNorm with one group."""
    return nn.GroupNorm(1, num_channels, eps=eps, affine=affine)


def instance_norm(num_channels: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """IN over (H, W) per sample and channel, with a per-channel affine map: GroupNorm with C groups."""
    return nn.GroupNorm(num_channels, num_channels, eps=eps, affine=affine)


NORMS: Dict[str, Callable[..., nn.Module]] = {
    "bn": BatchNorm2d,
    "brn": BatchRenorm2d,
    "syncbn": SyncBatchNorm,
    "gn": group_norm,
    "ln": layer_norm,
    "in": instance_norm,
    "mabn": MABN2d,
    "frozenbn": FrozenBatchNorm2d,
}


# Every normalization layer type (of torch and of this package), e.g. to exempt their parameters from weight decay.
NORM_TYPES = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, BatchRenorm2d, _MovingAverageBatchNorm, FrozenBatchNorm2d,
)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def register_norm(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder(channels, **options)`` available to :func:`build_norm` (and every config) as ``name``."""
    NORMS[name] = builder


def norm_options(name: str) -> list[str]:
    """Keyword options that the norm called ``name`` accepts."""
    builder = _builder(name)
    params = list(inspect.signature(builder).parameters.values())[1:]  # the first one is the channel count
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("device", "dtype")]


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in NORMS:
        close = difflib.get_close_matches(str(name), NORMS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown norm {name!r}{hint}; known norms: {', '.join(NORMS)}")
    return NORMS[name]


def build_norm(name: str, channels: int, **options) -> nn.Module:
    """A 2d normalization layer for ``channels`` feature maps, by name (see ``NORMS``)."""
    builder = _builder(name)
    accepted = norm_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"norm {name!r} does not accept option(s) {unknown}; it accepts {accepted}")
    return builder(channels, **options)
