"""ImageNet ResNet-50 weights onto the body of a detection model built by :func:`det.model.build_mask_rcnn`.

    report = load_backbone_weights(model, "resnet50_mabn.pth")
    print(f"loaded {len(report['loaded'])} body tensors; new: {len(report['new'])} (FPN, RPN, heads)")

Accepted sources: a torchvision-format ResNet-50 ``state_dict`` (``conv1.weight``, ``bn1.running_mean``,
``layer1.0.conv1.weight``, ..., ``fc.*``) or a checkpoint of the classification trainer
``{'model': state_dict, ...}``, possibly saved from DistributedDataParallel (``module.`` prefix), with
BN-format norms or MABN-format ones (``running_var``, ``num_steps``, ``num_norm_batches``, windows).

Each norm of the body takes what its type can use, as :func:`mabn.transfer_state_dict` translates it (BN's
statistics become MABN's second moment ``var + mean^2``; GN / LN / IN take gamma and beta only; a MABN layer
does not go into a BN-type one). Training-progress state (MABN's ``num_steps``, ``num_norm_batches`` and SMA
windows, BN / BRN's ``num_batches_tracked``) is reset by default, so that MABN's warm-up (and BRN's r/d ramp)
reruns on detection data; ``reset_norm_state=False`` carries it over where source and target formats agree.
"""
from __future__ import annotations

import os
from typing import Mapping, Union

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import mabn
from mabn.transfer import IncompatibleStateDictError

BODY_PREFIX = "backbone.body."
CLASSIFIER_PREFIX = "fc."  # the ImageNet classifier has no counterpart in a detector

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def load_backbone_weights(model: nn.Module, checkpoint_or_state_dict: Source, reset_norm_state: bool = True) -> dict:
    """Copy a ResNet-50 ``state_dict`` (or a path / classification checkpoint holding one) into
    ``model.backbone.body``.

    Returns ``{'loaded': [...], 'new': [...], 'reset': [...]}``: the model keys taken from the checkpoint,
    the model keys it does not cover by design (FPN, RPN, box and mask heads), and the progress buffers of
    the body's norms left at their initial values. Raises ``ValueError`` listing every checkpoint key that
    has no place in the body (unknown module, shape mismatch, incompatible norm) and every body key the
    checkpoint does not provide; the classifier (``fc.*``) is dropped silently.
    """
    origin = str(checkpoint_or_state_dict) if isinstance(checkpoint_or_state_dict, (str, os.PathLike)) else "the given state_dict"
    source = _read_state_dict(checkpoint_or_state_dict, origin)
    body = _body_of(model)
    try:
        report = mabn.transfer_state_dict(body, source, strict=True, reset_progress=reset_norm_state, model_name="the ResNet body")
    except IncompatibleStateDictError as e:
        raise ValueError(f"cannot load backbone weights from {origin} into the ResNet body:\n" + "\n".join(e.problems)) from None
    return {
        "loaded": [BODY_PREFIX + key for key in report.model_keys if key not in report.reset],
        "new": [key for key in model.state_dict() if not key.startswith(BODY_PREFIX)],
        "reset": [BODY_PREFIX + key for key in report.reset],
    }


def _read_state_dict(source: Source, origin: str) -> dict:
    """A flat ``{key: tensor}`` with any ``module.`` prefix and the classifier removed."""
    if isinstance(source, (str, os.PathLike)):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # missing, truncated, not a torch file, or pickled objects beyond tensors
            raise RuntimeError(f"cannot read backbone checkpoint {origin}: {type(exc).__name__}: {exc}") from exc
    if isinstance(source, Mapping) and isinstance(source.get("model"), Mapping):
        source = source["model"]  # a checkpoint of the classification trainer
    if not isinstance(source, Mapping) or not source or not all(isinstance(v, torch.Tensor) for v in source.values()):
        found = sorted(source)[:8] if isinstance(source, Mapping) else type(source).__name__
        raise ValueError(
            f"{origin} holds no ResNet-50 state_dict: expected {{name: tensor}} or a checkpoint "
            f"{{'model': state_dict, ...}}, found {found}"
        )
    state = dict(source)
    consume_prefix_in_state_dict_if_present(state, "module.")  # saved from DistributedDataParallel
    return {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIX)}


def _body_of(model: nn.Module) -> nn.Module:
    body = getattr(getattr(model, "backbone", None), "body", None)
    if body is None:
        raise TypeError(
            f"load_backbone_weights needs a detection model with backbone.body (build_mask_rcnn's), got "
            f"{type(model).__name__}; unwrap DistributedDataParallel first"
        )
    return body
