"""Moving Average Batch Normalization (Yan et al., ICLR 2020) and the baselines it is compared with.

    from mabn import MABN2d, CenConv2d
    model = mabn.convert_model(torchvision.models.resnet50(), norm="mabn", conv="cen")
    deployable = mabn.fold_model(model)

This package is the layer library and needs torch and torchvision only. The trainers' machinery (config,
checkpoints, distributed runs, logging) is the separate subpackage :mod:`mabn.engine`, which
``import mabn`` does not load; ``pip install '.[train]'`` installs what it needs.
"""
from . import layers
from .authors_checkpoint import load_authors_state_dict
from .batch_statistics import BatchStatisticsRecorder
from .convert import convert_model
from .fold import fold_model
from .inference_statistics import update_bn
from .layers import *  # noqa: F401,F403  (the layers and the norm registry, as listed in mabn.layers.__all__)
from .transfer import TransferReport, transfer_state_dict

__version__ = "0.1.0"

__all__ = [*layers.__all__, "BatchStatisticsRecorder", "convert_model", "fold_model", "load_authors_state_dict",
           "TransferReport", "transfer_state_dict", "update_bn"]
