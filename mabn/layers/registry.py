"""The one list of normalization layers: by name (the way detectron2 picks a norm: ``build_norm('mabn', 256)``),
and by module type, with what each type can do.

Everything that must know which modules are norms asks here: the factory and the configs (names),
``convert_model`` (which norms to replace), ``fold_model`` (which fold into a conv), the batch-statistics
recorder (which normalize with batch statistics), the rank-averaging of inference statistics, weight-decay
exemptions, and the detection backbone loader. A new norm type is one :func:`register_norm_type` call.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .batch_norm import BatchNorm2d
from .batch_renorm import BatchRenorm2d
from .moving_average_bn import MABN2d, MovingAverageBatchNorm
from .sync_batch_norm import SyncBatchNorm


# ----------------------------------------------------------------------------- by module type
@dataclass(frozen=True)
class NormType:
    """What a kind of norm layer does, independent of its instance options.

    batch_statistics: trains on the statistics of its normalization batch (BN, SyncBN, BRN, MABN): the
        layers whose behaviour depends on the batch size, the subject of the paper.
    running_statistics: keeps inference statistics (in eval mode a fixed per-channel affine map, when the
        instance tracks them: ``running_var`` is not None).
    foldable: that affine map folds into a preceding convolution.
    sma_windows: keeps per-rank SMA windows and counters (MABN), which must not be averaged or broadcast.
    groupable: accepts ``norm_batch_size`` (a device batch cut into normalization batches of b).
    converts_from: ``convert_model`` replaces it (the 2d batch norms of torch and torchvision models).
    """

    batch_statistics: bool = False
    running_statistics: bool = False
    foldable: bool = False
    sma_windows: bool = False
    groupable: bool = False
    converts_from: bool = False


_NORM_TYPES: Dict[type, NormType] = {}


def register_norm_type(module_type: type, **traits) -> None:
    """Declare ``module_type`` (and its subclasses, unless they are registered themselves) a norm with ``traits``."""
    _NORM_TYPES[module_type] = NormType(**traits)


register_norm_type(nn.modules.batchnorm._BatchNorm, batch_statistics=True, running_statistics=True, foldable=True)
# the 2d batch norms of torchvision's models (our BatchNorm2d and SyncBatchNorm are nn.BatchNorm2d subclasses)
register_norm_type(nn.BatchNorm2d, batch_statistics=True, running_statistics=True, foldable=True, converts_from=True)
register_norm_type(nn.SyncBatchNorm, batch_statistics=True, running_statistics=True, foldable=True, converts_from=True)
register_norm_type(BatchNorm2d, batch_statistics=True, running_statistics=True, foldable=True, groupable=True,
                   converts_from=True)
register_norm_type(FrozenBatchNorm2d, running_statistics=True, foldable=True, converts_from=True)
register_norm_type(BatchRenorm2d, batch_statistics=True, running_statistics=True, foldable=True, groupable=True)
register_norm_type(MovingAverageBatchNorm, batch_statistics=True, running_statistics=True, foldable=True,
                   sma_windows=True, groupable=True)
register_norm_type(nn.GroupNorm)  # also LN and IN as built by build_norm
register_norm_type(nn.LayerNorm)
register_norm_type(nn.modules.instancenorm._InstanceNorm)


def norm_type(module: nn.Module) -> Optional[NormType]:
    """The traits of ``module``'s type (its nearest registered base class), or None for a module that is no norm."""
    for cls in type(module).__mro__:
        if cls in _NORM_TYPES:
            return _NORM_TYPES[cls]
    return None


def is_norm(module: nn.Module) -> bool:
    return norm_type(module) is not None


def _trait(module: nn.Module, name: str) -> bool:
    kind = norm_type(module)
    return kind is not None and getattr(kind, name)


def has_running_statistics(module: nn.Module) -> bool:
    """Keeps inference statistics (a BN built with ``track_running_stats=False`` does not)."""
    return _trait(module, "running_statistics") and getattr(module, "running_var", None) is not None


def uses_batch_statistics(module: nn.Module) -> bool:
    return _trait(module, "batch_statistics")


def learns_running_statistics(module: nn.Module) -> bool:
    """Updates its inference statistics from training batches (what ranks average before evaluating)."""
    return uses_batch_statistics(module) and has_running_statistics(module)


def is_foldable(module: nn.Module) -> bool:
    """In eval mode a per-channel affine map that folds into a preceding conv."""
    return _trait(module, "foldable") and has_running_statistics(module)


def has_sma_windows(module: nn.Module) -> bool:
    return _trait(module, "sma_windows")


def is_groupable(module: nn.Module) -> bool:
    return _trait(module, "groupable")


def converts_from(module: nn.Module) -> bool:
    return _trait(module, "converts_from")


# ----------------------------------------------------------------------------- by name
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


def register_norm(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make ``builder(channels, **options)`` available to :func:`build_norm` (and every config) as ``name``.
    A builder that returns a new module type should also :func:`register_norm_type` it."""
    NORMS[name] = builder


def norm_options(name: str) -> list[str]:
    """Keyword options that the norm called ``name`` accepts."""
    builder = _builder(name)
    params = list(inspect.signature(builder).parameters.values())[1:]  # the first one is the channel count
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("device", "dtype")]


# Options that two norms accept under one name but read differently: {option: {norm name: meaning}}; a norm not
# listed that accepts the option reads it as "default". One value must never reach two norms that disagree.
OPTION_MEANINGS: Dict[str, Dict[str, str]] = {
    "momentum": {
        "mabn": "the keep-rate of the inference EMA (MABN's convention, default 0.98)",
        "default": "the update rate of the running statistics (nn.BatchNorm2d's convention, default 0.1)",
    },
}


def option_meaning(name: str, option: str) -> Optional[str]:
    """What ``option`` means to the norm called ``name``, where norms disagree about it (else None)."""
    meanings = OPTION_MEANINGS.get(option)
    return None if meanings is None else meanings.get(name, meanings["default"])


def groupable_norms() -> list[str]:
    """Names of the norms that accept a normalization batch smaller than the device batch (``norm_batch_size``)."""
    return [name for name in NORMS if "norm_batch_size" in norm_options(name)]


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
