"""Moving Average Batch Normalization (Yan et al., ICLR 2020) and the baselines it is compared with."""
from .layers import (
    NORMS,
    BatchNorm2d,
    BatchRenorm2d,
    CenConv2d,
    MABN1d,
    MABN2d,
    MABN3d,
    SyncBatchNorm,
    build_norm,
    norm_options,
    register_norm,
)

__version__ = "0.1.0"
