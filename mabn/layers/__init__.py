"""Normalization layers and the weight-centered convolution."""
from .batch_norm import BatchNorm2d
from .batch_renorm import BatchRenorm2d
from .cen_conv import CenConv2d
from .factory import NORMS, build_norm, norm_options, register_norm
from .moving_average_bn import MABN1d, MABN2d, MABN3d
from .sync_batch_norm import SyncBatchNorm

__all__ = [
    "BatchNorm2d",
    "BatchRenorm2d",
    "CenConv2d",
    "MABN1d",
    "MABN2d",
    "MABN3d",
    "NORMS",
    "SyncBatchNorm",
    "build_norm",
    "norm_options",
    "register_norm",
]
