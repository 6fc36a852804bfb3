"""Inference folding: conv + (MABN | BN | BRN | frozen BN) -> one plain ``nn.Conv2d`` with bias.

In eval mode all those norms are per-channel affine maps ``y = x * scale + shift`` and weight
centering is a linear map of the weights, so ``norm(conv(x))`` is a single convolution with
``W' = centered(W) * scale`` and ``b' = b * scale + shift``. This is why MABN costs nothing at
inference. Conv -> norm pairs are found on the traced graph (torch.fx); where a module cannot be
traced (detection models branch on data), its children are traced one by one.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.fx
from torch import nn

from .layers.cen_conv import CenConv2d, centered_weight
from .layers.moving_average_bn import MABN1d, MABN3d
from .layers.registry import is_foldable
from .norm_inputs import traced_parts


def inference_affine(norm: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` in float64 such that ``norm(x) == x * scale + shift`` in eval mode, or None."""
    if not is_foldable(norm):  # e.g. a BN without running statistics: batch statistics even in eval mode
        return None
    var = norm.running_var.double()
    mean = norm.running_mean.double() if getattr(norm, "running_mean", None) is not None else torch.zeros_like(var)
    weight = norm.weight.double() if getattr(norm, "weight", None) is not None else torch.ones_like(var)
    bias = norm.bias.double() if getattr(norm, "bias", None) is not None else torch.zeros_like(var)
    scale = weight / torch.sqrt(var + norm.eps)
    return scale.detach(), (bias - mean * scale).detach()


def find_conv_norm_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Qualified names ``(conv, norm)`` where the conv's output feeds only that norm, each used once."""
    pairs = []
    for prefix, part, graph in traced_parts(module):
        if graph is not None:
            pairs += [(prefix + conv, prefix + norm) for conv, norm in _pairs_in(part, graph)]
    return pairs


def _pairs_in(module: nn.Module, graph: torch.fx.Graph) -> list[tuple[str, str]]:
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_foldable(module.get_submodule(node.target)):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and isinstance(module.get_submodule(source.target), nn.Conv2d)
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def _folded_conv(conv: nn.Conv2d, affine: Optional[tuple[torch.Tensor, torch.Tensor]]) -> nn.Conv2d:
    weight = conv.weight.double()
    if isinstance(conv, CenConv2d):
        weight = centered_weight(weight)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
    if affine is not None:
        scale, shift = affine
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    plain = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, affine is not None or conv.bias is not None, conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    plain.weight.copy_(weight)
    if plain.bias is not None:
        plain.bias.copy_(bias)
    return plain


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def _plain_batch_norm(norm: nn.Module) -> nn.modules.batchnorm._BatchNorm:
    """The torch BatchNorm (eval mode) that computes what ``norm`` computes in eval mode: the same
    ``F.batch_norm`` call on the same statistics, so the result is identical."""
    kind = nn.BatchNorm1d if isinstance(norm, MABN1d) else nn.BatchNorm3d if isinstance(norm, MABN3d) else nn.BatchNorm2d
    weight = getattr(norm, "weight", None)
    plain = kind(norm.num_features, eps=norm.eps, affine=weight is not None,
                 device=norm.running_var.device, dtype=norm.running_var.dtype).eval()
    plain.running_var.copy_(norm.running_var)
    mean = getattr(norm, "running_mean", None)
    plain.running_mean.copy_(mean if mean is not None else torch.zeros_like(norm.running_var))
    if weight is not None:
        plain.weight.copy_(weight)
        plain.bias.copy_(norm.bias)
    return plain


def _is_ours(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "mabn"


def fold_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference (eval mode) in which every conv + foldable norm pair is one
    ``nn.Conv2d`` with bias, every remaining :class:`~mabn.CenConv2d` is a plain ``nn.Conv2d``, and every
    remaining norm of this package (one that follows no conv: densenet's norms after a concatenation) is a
    torch ``nn.BatchNorm{1,2,3}d`` in eval mode holding its inference statistics. The result needs no ``mabn``."""
    folded = copy.deepcopy(model).eval()
    for conv_name, norm_name in find_conv_norm_pairs(folded):
        affine = inference_affine(folded.get_submodule(norm_name))
        if affine is None:
            continue
        _set_submodule(folded, conv_name, _folded_conv(folded.get_submodule(conv_name), affine))
        _set_submodule(folded, norm_name, nn.Identity())
    for name, module in list(folded.named_modules()):
        if isinstance(module, CenConv2d):
            _set_submodule(folded, name, _folded_conv(module, None))
        elif _is_ours(module) and is_foldable(module):
            _set_submodule(folded, name, _plain_batch_norm(module))
    return folded
