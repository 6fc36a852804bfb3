"""What feeds each norm of a model: the wiring that weight centering, MABN's reduced statistics and folding rely on.

MABN's reduced statistics (``chi^2 = mean(x^2)`` in place of the variance) assume inputs of mean near zero,
which a weight-centered conv provides; a plain conv, a ReLU, a pooling or a concatenation does not. The model
is traced with torch.fx, norms and convs kept opaque (only their wiring matters). Where a module cannot be
traced (data-dependent control flow, as in detection models), its children are traced one by one, and
among the children of the module that failed, a conv counts as feeding the norm registered right after it
(the order of ``nn.Sequential``, and of most hand-written blocks); what feeds the other norms there is unknown.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .layers.registry import norm_type

CONV, ACTIVATION, POOLING, CONCATENATION, OTHER, UNKNOWN = "conv", "activation", "pooling", "concatenation", "other", "unknown"

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish)
_POOLING_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                    nn.modules.pooling._AdaptiveMaxPoolNd)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish}
_POOLING_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d}
_CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}


@dataclass(frozen=True)
class NormInput:
    """What produces a norm's input: ``kind`` (one of CONV ... UNKNOWN) and, for a conv, its qualified name."""

    kind: str
    conv: Optional[str] = None


class LeafTracer(torch.fx.Tracer):
    """Keeps norms and convs opaque: only how they are wired matters here."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return norm_type(m) is not None or isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def traced_parts(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, Optional[torch.fx.Graph]]]:
    """``(prefix, part, graph)`` for the largest traceable parts of ``module``; ``graph`` is None for a part that
    could not be traced (its children follow)."""
    try:
        graph = LeafTracer().trace(module)
    except Exception:  # data-dependent control flow: look one level down
        yield prefix, module, None
        for name, child in module.named_children():
            yield from traced_parts(child, f"{prefix}{name}.")
        return
    yield prefix, module, graph


def _kind(node, part: nn.Module) -> NormInput:
    if not isinstance(node, torch.fx.Node) or node.op == "placeholder":
        return NormInput(UNKNOWN)  # the input of a part traced on its own
    if node.op == "call_module":
        producer = part.get_submodule(node.target)
        if isinstance(producer, nn.Conv2d):
            return NormInput(CONV, node.target)
        if isinstance(producer, _ACTIVATION_MODULES):
            return NormInput(ACTIVATION)
        if isinstance(producer, _POOLING_MODULES):
            return NormInput(POOLING)
    elif node.op == "call_function":
        if node.target in _ACTIVATION_FUNCTIONS:
            return NormInput(ACTIVATION)
        if node.target in _POOLING_FUNCTIONS:
            return NormInput(POOLING)
        if node.target in _CONCATENATIONS:
            return NormInput(CONCATENATION)
        if node.target is operator.getitem:
            return NormInput(OTHER)
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return NormInput(ACTIVATION)
    return NormInput(OTHER)


def norm_inputs(model: nn.Module) -> dict[str, NormInput]:
    """For each norm of ``model`` (by qualified name), what produces its input."""
    found: dict[str, NormInput] = {}
    for prefix, part, graph in traced_parts(model):
        if graph is None:
            children = list(part.named_children())
            for (before_name, before), (name, child) in zip([("", None)] + children, children):
                if norm_type(child) is not None:
                    is_conv = isinstance(before, nn.Conv2d)
                    found[prefix + name] = NormInput(CONV, prefix + before_name) if is_conv else NormInput(UNKNOWN)
            continue
        for node in graph.nodes:
            if node.op == "call_module" and norm_type(part.get_submodule(node.target)) is not None:
                source = _kind(node.args[0] if node.args else None, part)
                if source.conv is not None:
                    source = NormInput(CONV, prefix + source.conv)
                found[prefix + node.target] = source
    return found
