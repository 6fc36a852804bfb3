"""Swap the norms (and optionally the convs) of any model, torchvision's included, keeping its keys.

    model = torchvision.models.resnet50()
    mabn.convert_model(model, norm="mabn", conv="cen", norm_options={"norm_batch_size": 2})

Module names do not change, parameters are carried over (the same ``nn.Parameter`` objects), and
running statistics are translated where the target keeps any (BN's ``mean / var`` become MABN's
second moment ``var + mean^2``; :func:`mabn.transfer_state_dict` does it), so a converted pretrained
model starts from its statistics.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import nn

from .layers.cen_conv import CenConv2d
from .layers.moving_average_bn import MovingAverageBatchNorm
from .layers.registry import build_norm, converts_from
from .norm_inputs import ACTIVATION, CONCATENATION, CONV, POOLING, norm_inputs
from .transfer import STATISTICS, transfer_state_dict


def convert_model(
    model: nn.Module,
    norm: Optional[str] = None,
    conv: Optional[str] = None,
    norm_options: Optional[dict] = None,
    conv_filter: Optional[Callable[[str, nn.Conv2d], bool]] = None,
) -> nn.Module:
    """Replace, in place, every 2d batch norm by ``build_norm(norm, C, **norm_options)`` and, with
    ``conv='cen'``, every ``nn.Conv2d`` whose output feeds a norm (found as :mod:`mabn.norm_inputs`
    describes, also where tracing fails) and for which ``conv_filter(name, module)`` is true by a
    :class:`~mabn.CenConv2d`; convs no norm follows (squeeze-excitation, RPN and head convs) stay plain.
    ``norm=None`` leaves the norms alone. Returns ``model``. Warns when it found nothing to replace (a model
    converted already, a norm type ``convert_model`` does not know, a filter that accepts no conv), and,
    naming the layers, where an MABN with reduced statistics ends up after a conv that is not
    weight-centered, a ReLU, a pooling or a concatenation."""
    if conv not in (None, "plain", "cen"):
        raise ValueError(f"conv must be None, 'plain' or 'cen', got {conv!r}")
    norm_options = dict(norm_options or {})
    inputs = norm_inputs(model)
    normed_convs = {source.conv for source in inputs.values() if source.conv is not None}
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            replacement = None
            if norm is not None and converts_from(child):
                replacement = _convert_norm(child, norm, norm_options)
            elif (conv == "cen" and type(child) is nn.Conv2d and full_name in normed_convs
                  and (conv_filter is None or conv_filter(full_name, child))):
                replacement = _centered_conv(child)
            if replacement is not None:
                setattr(module, child_name, replacement)
                replaced += 1
    if not replaced:
        wanted = [f"2d batch norms to turn into {norm!r}"] if norm is not None else []
        if conv == "cen":
            wanted.append("nn.Conv2d layers" + (" accepted by conv_filter" if conv_filter is not None else ""))
        found = " or ".join(wanted) if wanted else "nothing was asked for (norm=None, conv=None)"
        warnings.warn(f"convert_model: nothing to convert in this {type(model).__name__}: "
                      + (f"no {found}" if wanted else found) + "; the model is returned unchanged", UserWarning, stacklevel=2)
    _warn_about_reduced_statistics(model, inputs)
    return model


_CAUSES = {
    CONV: "a conv that is not weight-centered (convert with conv='cen')",
    ACTIVATION: "an activation (ReLU)",
    POOLING: "a pooling",
    CONCATENATION: "a concatenation",
}


def _warn_about_reduced_statistics(model: nn.Module, inputs: dict) -> None:
    """MABN's reduced statistics take the second moment for the variance: right only for inputs of mean ~0."""
    misplaced: dict[str, list[str]] = {}
    for name, source in inputs.items():
        layer = model.get_submodule(name)
        if not (isinstance(layer, MovingAverageBatchNorm) and layer.reduced_stats) or source.kind not in _CAUSES:
            continue
        if source.kind == CONV and isinstance(model.get_submodule(source.conv), CenConv2d):
            continue
        misplaced.setdefault(source.kind, []).append(name)
    for kind, names in misplaced.items():
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        warnings.warn(
            f"MABN with reduced statistics follows {_CAUSES[kind]} at {len(names)} layer(s): {shown}. The second "
            "moment it normalizes by stands in for the variance only for inputs of mean near zero; there, build the "
            "norm with norm_options={'reduced_stats': False}, or convert with conv='cen' where a conv precedes it.",
            stacklevel=3,
        )


def _centered_conv(conv: nn.Conv2d) -> CenConv2d:
    new = CenConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
    )
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


def _convert_norm(old: nn.Module, norm: str, options: dict) -> nn.Module:
    channels = old.num_features if hasattr(old, "num_features") else old.weight.shape[0]
    new = build_norm(norm, channels, **options)
    reference = old.weight if isinstance(old.weight, torch.Tensor) else old.running_var
    new = new.to(device=reference.device, dtype=reference.dtype)
    weight, bias = getattr(old, "weight", None), getattr(old, "bias", None)
    if isinstance(getattr(new, "weight", None), nn.Parameter) and weight is not None:
        new.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().clone())
        new.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
    elif getattr(new, "weight", None) is not None and weight is not None:  # frozen target: buffers
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
    _carry_running_stats(old, new)
    new.train(old.training)
    return new


def _carry_running_stats(old: nn.Module, new: nn.Module) -> None:
    statistics = {key: value for key, value in old.state_dict().items() if key in STATISTICS}
    if len(statistics) == len(STATISTICS):
        transfer_state_dict(new, statistics)
