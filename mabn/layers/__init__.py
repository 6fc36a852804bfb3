"""Normalization layers and the weight-centered convolution."""
from .batch_norm import BatchNorm2d
from .batch_renorm import BatchRenorm2d
from .cen_conv import CenConv2d
from .moving_average_bn import MABN1d, MABN2d, MABN3d, MovingAverageBatchNorm
from .registry import (
    NORMS,
    NormType,
    build_norm,
    norm_options,
    norm_type,
    option_meaning,
    register_norm,
    register_norm_type,
)
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "BatchNorm2d",
    "BatchRenorm2d",
    "CenConv2d",
    "MABN1d",
    "MABN2d",
    "MABN3d",
    "MovingAverageBatchNorm",
    "NORMS",
    "NormType",
    "SyncBatchNorm",
    "build_norm",
    "norm_options",
    "norm_type",
    "option_meaning",
    "register_norm",
    "register_norm_type",
]
